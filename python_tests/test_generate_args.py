"""Every malformed argument of ``generate`` is one clear error naming it, before any work
(issue 14's and issue 18's cases, one regression test each), and GenerationConfig's contract."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from tiny_models import VOCAB, make_hf_model, save_random_heads

from medusa_kernels import GenerationConfig, generate, load_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    base, heads = tmp_path_factory.mktemp("base"), tmp_path_factory.mktemp("heads")
    make_hf_model("llama-gqa-llama3rope", seed=3, path=base)
    save_random_heads(heads, num_heads=4, seed=3)
    return load_model(base, medusa=heads, dtype=torch.float32)


def raises(exc, *parts):
    """pytest.raises whose message must hold every part (plain text, not a regex)."""

    class Check:
        def __enter__(self):
            self.ctx = pytest.raises(exc)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *a):
            out = self.ctx.__exit__(*a)
            msg = str(self.info.value)
            assert "\n" not in msg, msg
            for part in parts:
                assert part in msg, (part, msg)
            return out

    return Check()


# --- prompts ---------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt,exc,parts", [
    ([[1, 2.0, 3]], TypeError, ["prompt[0][1]", "2.0", "int token id"]),
    ([1.0, 2.0], TypeError, ["prompt[0]", "1.0 (float)"]),
    ([[1, True]], TypeError, ["prompt[0][1]", "True (bool)"]),
    ([True, 3], TypeError, ["prompt[0]", "bool"]),
    ([[1, VOCAB + 3]], ValueError, ["prompt[0][1]", str(VOCAB + 3), f"vocab_size = {VOCAB}"]),
    ([[5, -1]], ValueError, ["prompt[0][1]", "-1"]),
    ([[]], ValueError, ["prompt[0] is empty"]),
    ([], ValueError, ["prompt is empty"]),
    ([[1, 2], 3], TypeError, ["prompt[1]", "list of token ids"]),
    (["text", [1, 2]], TypeError, ["prompt[0]", "list of token ids"]),
    (3, TypeError, ["prompt must be"]),
    (None, TypeError, ["prompt must be"]),
    (b"bytes", TypeError, ["prompt must be"]),
    (torch.tensor([[1.0, 2.0]]), TypeError, ["prompt", "torch.float32"]),
    (torch.tensor([True, False]), TypeError, ["prompt", "torch.bool"]),
    (torch.zeros(1, 2, 3, dtype=torch.long), ValueError, ["prompt", "(1, 2, 3)"]),
    (torch.zeros(1, 0, dtype=torch.long), ValueError, ["prompt[0] is empty"]),
    ("def f(", ValueError, ["prompt is text", "no tokenizer.json"]),
], ids=lambda v: None)
def test_bad_prompt_names_the_offending_id(model, prompt, exc, parts):
    with raises(exc, *parts):
        generate(model, prompt, max_new_tokens=2)


def test_prompt_forms_agree(model):
    """A flat list, a list of lists, 1-D and 2-D tensors, numpy: the same ids, the same output."""
    ids = [5, 6, 7]
    ref = generate(model, [ids], max_new_tokens=6, medusa=False).tokens
    assert len(ref) == 1 and len(ref[0]) == 6
    for form in (ids, torch.tensor(ids), torch.tensor([ids]), np.array(ids), np.array([ids]),
                 [np.int64(5), np.int64(6), np.int64(7)], torch.tensor(ids, dtype=torch.int32)):
        assert generate(model, form, max_new_tokens=6, medusa=False).tokens == ref


# --- every knob ------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,exc,parts", [
    ({"max_new_tokens": 2.5}, TypeError, ["max_new_tokens", "2.5 (float)"]),
    ({"max_new_tokens": True}, TypeError, ["max_new_tokens", "True (bool)"]),
    ({"max_new_tokens": "8"}, TypeError, ["max_new_tokens", "'8' (str)"]),
    ({"max_new_tokens": 0}, ValueError, ["max_new_tokens", "got 0"]),
    ({"max_new_tokens": 10**12}, ValueError, ["max_new_tokens", str(10**12)]),
    ({"max_new_tokens": 1000}, ValueError, ["max_new_tokens (1000)", "max_position_embeddings"]),
    ({"temperature": float("nan")}, ValueError, ["temperature", "nan"]),
    ({"temperature": -1}, ValueError, ["temperature", "-1"]),
    ({"temperature": float("inf")}, ValueError, ["temperature", "inf"]),
    ({"temperature": "0.7"}, TypeError, ["temperature", "'0.7' (str)"]),
    ({"temperature": True}, TypeError, ["temperature", "bool"]),
    ({"posterior_threshold": 1.5}, ValueError, ["posterior_threshold", "1.5"]),
    ({"posterior_threshold": "a"}, TypeError, ["posterior_threshold"]),
    ({"posterior_alpha": -0.1}, ValueError, ["posterior_alpha"]),
    ({"posterior_alpha": float("nan")}, ValueError, ["posterior_alpha"]),
    ({"medusa": 1}, TypeError, ["medusa", "1 (int)"]),
    ({"medusa": "yes"}, TypeError, ["medusa"]),
    ({"stream": 1}, TypeError, ["stream", "1 (int)"]),
    ({"cuda_graph": 0}, TypeError, ["cuda_graph", "0 (int)"]),
    ({"cuda_graph": True}, ValueError, ["cuda_graph=True needs a model on CUDA"]),
    ({"seed": "abc"}, TypeError, ["seed", "'abc' (str)"]),
    ({"seed": -1}, ValueError, ["seed", "-1"]),
    ({"seed": 2**64}, ValueError, ["seed"]),
    ({"seed": 1.5}, TypeError, ["seed", "1.5"]),
    ({"max_seq_len": 0}, ValueError, ["max_seq_len"]),
    ({"max_seq_len": "64"}, TypeError, ["max_seq_len"]),
    ({"max_seq_len": 16}, ValueError, ["exceeds max_seq_len = 16"]),
    ({"eos_token_id": "2"}, TypeError, ["eos_token_id", "'2' (str)"]),
    ({"eos_token_id": "</s>"}, TypeError, ["eos_token_id", "'</s>'"]),
    ({"eos_token_id": ["a"]}, TypeError, ["eos_token_id[0]", "'a' (str)"]),
    ({"eos_token_id": [None]}, TypeError, ["eos_token_id[0]", "None"]),
    ({"eos_token_id": [2, 3.0]}, TypeError, ["eos_token_id[1]", "3.0 (float)"]),
    ({"eos_token_id": True}, TypeError, ["eos_token_id", "True (bool)"]),
    ({"eos_token_id": -2}, ValueError, ["eos_token_id", "-2"]),
    ({"eos_token_id": VOCAB}, ValueError, ["eos_token_id", f"vocab_size = {VOCAB}"]),
    ({"tree": 5}, TypeError, ["tree", "5 (int)"]),
    ({"tree": "no-such-tree"}, ValueError, ["tree", "no-such-tree", "neither a known tree"]),
    ({"tree": [[0], [0, 0.5]]}, ValueError, ["tree", "[0, 0.5]"]),
    ({"tree": [[0], [True]]}, ValueError, ["tree", "non-negative int"]),
    ({"tree": [[0], [1, 0]]}, ValueError, ["tree", "no parent [1]"]),
    ({"tree": [[0]] + [[0] * n for n in range(2, 6)]}, ValueError,
     ["tree 'custom'", "[0, 0, 0, 0, 0]", "only 4 Medusa heads"]),
    ({"tree": [[0], [VOCAB]]}, ValueError, ["tree 'custom'", f"V = {VOCAB}"]),
    ({"propose": "oracle"}, TypeError, ["propose"]),
    ({"config": {"temperature": 0}}, TypeError, ["config", "dict"]),
], ids=lambda v: None)
def test_bad_knob_names_the_argument(model, kwargs, exc, parts):
    with raises(exc, *parts):
        generate(model, [[1, 2, 3]], **{"max_new_tokens": 4, **kwargs})


def test_bad_stream_call_fails_before_the_first_step(model):
    """A malformed argument with stream=True raises at the call, not at the first next()."""
    with raises(ValueError, "temperature"):
        generate(model, [[1, 2]], stream=True, temperature=-0.5)


def test_model_must_be_a_medusa_model(model):
    with raises(TypeError, "model must be a MedusaModel"):
        generate(model.base, [[1, 2]])


def test_no_heads_names_the_fix(model):
    plain_only = load_model(model.model_dir, dtype=torch.float32)
    with raises(ValueError, "medusa=True needs Medusa heads", "medusa=False"):
        generate(plain_only, [[1, 2]], max_new_tokens=4)
    assert len(generate(plain_only, [[1, 2]], max_new_tokens=4, medusa=False).tokens[0]) == 4


@pytest.mark.parametrize("bad,exc,parts", [
    (lambda g: g.float(), TypeError, ["propose must return integer token ids"]),
    (lambda g: g.tolist(), TypeError, ["propose must return a tensor"]),
    (lambda g: g[:, :1], ValueError, ["propose must return token ids [B = 1, K >= 3"]),
    (lambda g: g + VOCAB, ValueError, ["propose returned token id", f"vocab_size = {VOCAB}"]),
    (lambda g: g - 1000, ValueError, ["propose returned token id -"]),
], ids=["float", "list", "shape", "too-big", "negative"])
def test_propose_output_is_checked(model, bad, exc, parts):
    def propose(last_hidden, root, num_generated):
        return bad(torch.randint(0, VOCAB, (root.shape[0], 4, 10)))

    with raises(exc, *parts):
        generate(model, [[1, 2, 3]], max_new_tokens=6, tree="small_15", propose=propose)


def test_named_tree_wider_than_the_vocabulary_names_the_tree(tmp_path):
    """A tree asking a head for more ranks than the vocabulary names the tree (not the op's
    "k must be in [1, V]"); the default tree is cut to fit, so a V = 8 model decodes."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=8, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        eos_token_id=None, bos_token_id=None, pad_token_id=None)  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    save_random_heads(tmp_path / "heads", num_heads=4, vocab=8, seed=1)
    m = load_model(tmp_path / "base", medusa=tmp_path / "heads", dtype=torch.float32)
    with raises(ValueError, "tree 'mc_sim_7b_63'", "top-10", "V = 8"):
        generate(m, [[1, 2]], max_new_tokens=4, tree="mc_sim_7b_63")
    plain = generate(m, [[1, 2], [3]], max_new_tokens=12, medusa=False)
    for tree in (None, "small_15"):  # small_15's ranks are < 4: fits whole
        assert generate(m, [[1, 2], [3]], max_new_tokens=12, tree=tree).tokens == plain.tokens
    # wide_8's ranks 0..7 fit V = 8 exactly: used whole
    assert generate(m, [[1, 2]], max_new_tokens=4, tree="wide_8").tokens == \
        generate(m, [[1, 2]], max_new_tokens=4, medusa=False).tokens


def test_tree_files_errors_name_the_file(model, tmp_path):
    bad_json = tmp_path / "broken.json"
    bad_json.write_text('{"choices": [[0], [1]')
    no_choices = tmp_path / "nochoices.json"
    no_choices.write_text(json.dumps({"expected_accepted": 2.0}))
    number = tmp_path / "number.json"
    number.write_text("3")
    bad_path = tmp_path / "badpath.json"
    bad_path.write_text(json.dumps([[0], [2, 0]]))
    for path, part in ((bad_json, "not a readable JSON file"),
                       (no_choices, 'needs a "choices" key'),
                       (number, "got a JSON int"), (bad_path, "no parent [2]")):
        with raises(ValueError, str(path), part):
            generate(model, [[1, 2]], max_new_tokens=2, tree=path)


# --- GenerationConfig ------------------------------------------------------------------------

def test_config_is_frozen_checked_once_and_overridden_by_keywords(model):
    cfg = GenerationConfig(max_new_tokens=5, medusa=False, eos_token_id=[7, 8])
    assert cfg.eos_token_id == (7, 8) and cfg.greedy
    with pytest.raises(AttributeError):
        cfg.max_new_tokens = 6  # frozen
    with raises(ValueError, "temperature"):
        cfg.replace(temperature=math.nan)
    with raises(TypeError, "unknown generation setting", "top_kk"):
        cfg.replace(top_kk=3)
    a = generate(model, [[1, 2]], config=cfg, eos_token_id=[])
    assert len(a.tokens[0]) == 5 and a.tree == "plain"
    b = generate(model, [[1, 2]], config=cfg, eos_token_id=[], max_new_tokens=3)  # keywords win
    assert b.tokens[0] == a.tokens[0][:3]
    assert GenerationConfig(tree="small_15").tree_choices[0] == (0,)


def test_greedy_output_unchanged_by_the_config_path(model):
    """Keywords, a config, and the two mixed: the same lossless greedy output."""
    ids = [[3, 1, 4, 1, 5], [9, 2]]
    plain = generate(model, ids, max_new_tokens=10, medusa=False).tokens
    cfg = GenerationConfig(max_new_tokens=10, tree="small_15")
    assert generate(model, ids, config=cfg).tokens == plain
    assert generate(model, ids, max_new_tokens=10, tree="small_15").tokens == plain
    assert generate(model, ids, config=cfg.replace(tree=None)).tokens == plain
