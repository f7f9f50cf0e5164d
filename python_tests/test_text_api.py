"""Text in, text out: prompts as strings, text results and streamed text pieces (never a split
character), the checkpoint's EOS/BOS/pad as transformers takes them, max_position_embeddings,
and the one device-aware default tree the API and the CLI share."""

from __future__ import annotations

import json
import os
import random
import shutil

import pytest
import torch
from tiny_models import make_hf_model, save_random_heads

from medusa_kernels import demo, generate, load_model
from medusa_kernels.text import IncrementalDetokenizer
from medusa_kernels.tree import CPU_DEFAULT_TREE, DEFAULT_TREE, TREES, default_tree

shipped = pytest.mark.skipif(not os.path.isfile(os.path.join(demo.ASSETS, "model", "config.json")),
                             reason="no demo checkpoint shipped in medusa_kernels/assets/demo")


@pytest.fixture(scope="module")
def demo_model():
    return demo.load(dtype=torch.float32)


@shipped
def test_text_round_trip_on_the_demo(demo_model):
    tok = demo_model.cached_tokenizer()
    out = generate(demo_model, "def parse(", max_new_tokens=24)
    ids = tok.encode("def parse(").ids
    assert out.tokens == generate(demo_model, [ids], max_new_tokens=24, medusa=False).tokens
    assert out.text == [tok.decode(out.tokens[0], skip_special_tokens=True)]
    assert isinstance(out.text[0], str) and len(out.text[0]) > 0
    batch = generate(demo_model, ["def parse(", "import os\n"], max_new_tokens=12)
    assert batch.tokens[0] == out.tokens[0][:12]  # batching changes nothing (lossless, greedy)
    assert len(batch.text) == 2 and batch.text[1] == tok.decode(batch.tokens[1])


@shipped
def test_stream_yields_text_pieces_that_add_up(demo_model):
    stream = generate(demo_model, ["class Stack:", "for i in range("], max_new_tokens=30,
                      stream=True)
    pieces, tokens = ["", ""], [[], []]
    for step in stream:
        assert len(step) == 2 and len(step.text) == 2
        for b in range(2):
            pieces[b] += step.text[b]
            tokens[b] += step[b]
    assert tokens == stream.result.tokens
    assert pieces == stream.result.text


def byte_tokenizer():
    """A byte-level BPE with no merges: every UTF-8 byte is its own token, so a character of
    2 to 4 bytes spans 2 to 4 tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


TEXTS = ["héllo wörld", "日本語のテキスト", "emoji 🙂👍🏽 end", "mixed: añ 中 😀 z\n\tq", "ascii only"]


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_detokenizer_never_splits_a_character(text):
    tok = byte_tokenizer()
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text
    rng = random.Random(len(text))
    for chunking in ("ones", "random", "all"):
        detok, pieces, i = IncrementalDetokenizer(tok), [], 0
        while i < len(ids):
            n = 1 if chunking == "ones" else len(ids) if chunking == "all" else rng.randint(1, 4)
            pieces.append(detok.push(ids[i:i + n]))
            i += n
        pieces.append(detok.flush())
        assert "".join(pieces) == text
        assert not any("\ufffd" in p for p in pieces), pieces  # no half character shown


@shipped
def test_incremental_detokenizer_on_the_demo_tokenizer(demo_model):
    tok = demo_model.cached_tokenizer()
    text = "def f(x):\n    return 'naïve café ✓ 東京'  # ünïcode\n"
    ids = tok.encode(text).ids
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push([t]) for t in ids] + [detok.flush()]
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


def test_unfinished_character_comes_out_at_the_end():
    tok = byte_tokenizer()
    ids = tok.encode("ab€").ids[:-1]  # the euro sign cut after 2 of its 3 bytes
    detok = IncrementalDetokenizer(tok)
    assert detok.push(ids[:2]) == "ab"
    assert detok.push(ids[2:]) == ""  # held back: the character is not finished
    assert detok.flush() == tok.decode(ids)[2:]  # at the end: what a whole decode shows
    assert detok.flush() == ""


# --- the checkpoint's EOS / BOS / pad --------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eos")
    make_hf_model("llama-mha", seed=4, path=root / "base")
    save_random_heads(root / "heads", num_heads=3, seed=4)
    return root


def variant(tiny_dirs, name, config_json=None, generation_config=None):
    """A copy of the tiny base with config.json keys changed and/or a generation_config.json."""
    path = tiny_dirs / name
    if not path.exists():
        shutil.copytree(tiny_dirs / "base", path)
        cfg = json.loads((path / "config.json").read_text())
        cfg.update(config_json or {})
        (path / "config.json").write_text(json.dumps(cfg))
        gen = path / "generation_config.json"
        if gen.exists():
            gen.unlink()
        if generation_config is not None:
            gen.write_text(json.dumps(generation_config))
    return load_model(path, medusa=tiny_dirs / "heads", dtype=torch.float32)


def test_generation_stops_at_the_checkpoints_eos_by_default(tiny_dirs):
    ids = [[4, 8, 15], [16, 23]]
    free = generate(variant(tiny_dirs, "none"), ids, max_new_tokens=20, medusa=False).tokens
    assert all(len(t) == 20 for t in free)  # no EOS anywhere: full length
    eos_a, eos_b = free[0][5], free[1][9]
    expect_a = [t[: t.index(eos_a) + 1] if eos_a in t else t for t in free]
    expect_b = [t[: t.index(eos_b) + 1] if eos_b in t else t for t in free]
    both = [t[: min([t.index(e) + 1 for e in (eos_a, eos_b) if e in t], default=20)]
            for t in free]
    cases = [  # (name, config.json changes, generation_config.json, expected)
        ("config", {"eos_token_id": eos_a}, None, expect_a),
        ("config-list", {"eos_token_id": [eos_a, eos_b]}, None, both),
        ("generation", {}, {"eos_token_id": eos_b}, expect_b),
        # generation_config.json, when there, is the source (transformers): config.json's EOS
        # does not apply even when generation_config.json has none
        ("generation-wins", {"eos_token_id": eos_a}, {"eos_token_id": eos_b}, expect_b),
        ("generation-empty", {"eos_token_id": eos_a}, {"temperature": 0.7}, free),
    ]
    for name, cfg, gen, expected in cases:
        m = variant(tiny_dirs, name, cfg, gen)
        for medusa in (False, True):
            assert generate(m, ids, max_new_tokens=20, medusa=medusa).tokens == expected, name
        assert generate(m, ids, max_new_tokens=20, eos_token_id=[]).tokens == free, name


def test_bad_eos_in_a_checkpoint_names_the_file(tiny_dirs):
    m = variant(tiny_dirs, "bad-eos", {}, {"eos_token_id": "</s>"})
    with pytest.raises(TypeError, match=r"eos_token_id \(from .*generation_config.json\)"):
        generate(m, [[1, 2]], max_new_tokens=2)


def test_broken_generation_config_names_the_file(tiny_dirs):
    m = variant(tiny_dirs, "broken-gen", {}, None)
    (tiny_dirs / "broken-gen" / "generation_config.json").write_text('{"eos_token_id": ')
    with pytest.raises(ValueError, match=r"broken-gen/generation_config.json: not valid JSON"):
        generate(m, [[1, 2]], max_new_tokens=2)


def test_pad_and_padded_result(tiny_dirs):
    m = variant(tiny_dirs, "pad", {"pad_token_id": 3, "eos_token_id": 7})
    r = generate(m, [[1, 2], [5]], max_new_tokens=6, medusa=False, eos_token_id=[])
    assert r.pad_token_id == 3
    padded = r.padded()
    assert padded.shape == (2, 6) and padded[0].tolist() == r.tokens[0]
    m = variant(tiny_dirs, "pad-from-eos", {"eos_token_id": 7})
    assert generate(m, [[1]], max_new_tokens=2).pad_token_id == 7  # no pad: EOS, as HF does


def test_bos_added_when_the_tokenizer_config_asks_for_it(tiny_dirs):
    m = variant(tiny_dirs, "bos", {"bos_token_id": 1})
    from medusa_kernels.text import prompt_token_lists

    tok = byte_tokenizer()
    ids, was_text = prompt_token_lists("hi", tok, 500, bos_token_id=1)
    assert was_text and ids == [[1] + tok.encode("hi").ids]
    assert prompt_token_lists("hi", tok, 500)[0] == [tok.encode("hi").ids]
    (tiny_dirs / "bos" / "tokenizer_config.json").write_text('{"add_bos_token": true}')
    assert m.generation_defaults()["add_bos_token"] is True


def test_max_position_embeddings_is_enforced(tiny_dirs):
    m = variant(tiny_dirs, "short", {"max_position_embeddings": 32})
    assert m.base.cfg.max_position_embeddings == 32
    assert len(generate(m, [[1] * 12], max_new_tokens=20, medusa=False).tokens[0]) == 20
    with pytest.raises(ValueError, match=r"prompt \(30 tokens\) \+ max_new_tokens \(8\) = 38 "
                                         r"exceeds the model's max_position_embeddings = 32"):
        generate(m, [[1] * 30], max_new_tokens=8)


# --- one default tree policy -----------------------------------------------------------------

def test_default_tree_policy(tmp_path):
    assert default_tree("cpu") == CPU_DEFAULT_TREE == "small_7"
    assert default_tree("cuda") == default_tree("cuda:1") == DEFAULT_TREE == "mc_sim_7b_63"
    assert TREES["small_7"] == TREES["mc_sim_7b_63"][:7]
    model_dir = tmp_path / "ckpt" / "model"
    model_dir.mkdir(parents=True)
    assert default_tree("cpu", model_dir) == "small_7"
    (tmp_path / "ckpt" / "calibrated_tree_cpu.json").write_text('{"choices": [[0]]}')
    assert default_tree("cpu", model_dir) == str(tmp_path / "ckpt" / "calibrated_tree_cpu.json")
    assert default_tree("cuda", model_dir) == "mc_sim_7b_63"
    (model_dir / "calibrated_tree.json").write_text('[[0], [1]]')
    assert default_tree("cuda", model_dir) == str(model_dir / "calibrated_tree.json")


@shipped
def test_api_and_cli_use_the_same_default_tree(demo_model, capsys):
    """On a CPU the demo decodes with the online policy through the API and the CLI."""
    from medusa_kernels.generate import main

    r = generate(demo_model, "def ", max_new_tokens=8)
    assert r.tree == "online"
    assert main(["--device", "cpu", "--max-new-tokens", "8"]) == 0
    assert "[medusa, tree online (" in capsys.readouterr().err


def test_default_tree_is_cut_to_the_heads(tiny_dirs):
    """A 2-head model decodes with the default (small_7, 3 deep) cut to 2 levels, losslessly;
    the same tree asked for by name is used whole, so it is an error naming it."""
    save_random_heads(tiny_dirs / "heads2", num_heads=2, seed=5)
    m = load_model(tiny_dirs / "base", medusa=tiny_dirs / "heads2", dtype=torch.float32)
    plain = generate(m, [[2, 7], [1]], max_new_tokens=12, medusa=False).tokens
    r = generate(m, [[2, 7], [1]], max_new_tokens=12, tree="fixed")
    assert r.tokens == plain and r.tree == "small_7"
    assert max(max(step) for step in r.accepted_per_step) <= 3  # root + 2 levels
    r = generate(m, [[2, 7], [1]], max_new_tokens=12)  # the online policy's trees: cut too
    assert r.tokens == plain and r.tree == "online"
    assert max(len(p) for t in r.step_trees for p in t) <= 2
    with pytest.raises(ValueError, match="tree 'small_7'.* only 2 Medusa heads"):
        generate(m, [[2, 7]], max_new_tokens=4, tree="small_7")
