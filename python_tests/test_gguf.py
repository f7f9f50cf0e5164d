"""GGUF loading: tiny random files written with llama.cpp's writer (gguf.GGUFWriter) load to the
same logits and greedy tokens as transformers' own GGUF loading of the same file, for llama and
qwen2 and every supported tensor type; tokenizer and chat template from the metadata match
transformers'; what the loader does not handle is refused by name."""

import json
import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the [gguf] extra (gguf package) is not installed")
transformers = pytest.importorskip("transformers")

from gguf_files import TEMPLATE, vocabulary, write_tiny  # noqa: E402
from tiny_models import save_random_heads  # noqa: E402

from medusa_kernels import generate, load_model  # noqa: E402
from medusa_kernels.chat import render  # noqa: E402
from medusa_kernels.gguf_loader import TYPES, read_gguf, unpermute  # noqa: E402

V = len(vocabulary()[0])
CASES = [("llama", t) for t in TYPES] + [("qwen2", t) for t in ("F16", "Q8_0", "Q4_K", "Q6_K")]


def hf_load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()


@pytest.mark.parametrize("arch,qtype", CASES, ids=[f"{a}-{t}" for a, t in CASES])
def test_logits_and_greedy_tokens_match_transformers(arch, qtype, tmp_path):
    path = write_tiny(tmp_path / f"{arch}-{qtype}.gguf", arch, qtype, seed=len(qtype))
    ours, hf = load_model(path, dtype=torch.float32), hf_load(path)
    ids = torch.randint(0, V, (2, 13), generator=torch.Generator().manual_seed(3))
    base = ours.base
    with torch.no_grad():
        ref = hf(ids).logits
        got = base.logits(base.prefill(ids, torch.tensor([13, 13], dtype=torch.int32),
                                       base.new_cache(2, 16)))
    assert ref.abs().max() > 1  # not a degenerate model
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    out = generate(ours, ids.tolist(), max_new_tokens=6, medusa=False, eos_token_id=[])
    with torch.no_grad():
        want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                           do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out.tokens == want[:, 13:].tolist()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequantized_to_the_asked_dtype(dtype, tmp_path):
    path = write_tiny(tmp_path / "m.gguf", "llama", "Q4_0")
    full, low = load_model(path, dtype=torch.float32), load_model(path, dtype=dtype)
    for (name, a), (_, b) in zip(full.base.named_parameters(), low.base.named_parameters(),
                                 strict=True):
        assert b.dtype == dtype, name
        assert torch.equal(a.to(dtype), b), name


def test_unpermute_inverts_llama_cpp_permutation():
    """llama.cpp's converter: w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2)."""
    rng = np.random.default_rng(0)
    for n_head, rows, cols in ((4, 64, 7), (3, 18, 5), (1, 8, 1)):
        w = rng.standard_normal((rows, cols))
        permuted = w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(w.shape)
        np.testing.assert_array_equal(unpermute(permuted, n_head), w)


def test_config_and_special_ids_from_metadata(tmp_path):
    path = write_tiny(tmp_path / "m.gguf", "qwen2", "F32", layers=3, kv_heads=1)
    ckpt = read_gguf(path)
    assert ckpt.config == dict(model_type="qwen2", max_position_embeddings=256,
                               num_hidden_layers=3, intermediate_size=512, hidden_size=256,
                               rope_theta=10000.0, num_attention_heads=4,
                               num_key_value_heads=1, rms_norm_eps=pytest.approx(1e-5),
                               vocab_size=V, tie_word_embeddings=True)
    model = load_model(path)
    assert model.eos_token_id() == 2 and model.chat_template() == TEMPLATE
    assert model.generation_defaults()["bos_token_id"] == 1
    assert model.special_tokens() == {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                                      "pad_token": "<|endoftext|>"}


TEXTS = ["the cat in the hat", "  hello\n\nworld 12345 <|im_start|>user\nhi<|im_end|>",
         "héllo wörld ☃ 🐍", "It's 2026; don't\tstop"]
CHATS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "  Be brief. "}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "tool", "content": "x"},
     {"role": "user", "content": "Bye"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": None, "x": 1},
     {"role": "user", "content": "é\n"}],
]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tokenizer_and_chat_template_match_transformers(arch, tmp_path):
    path = write_tiny(tmp_path / "m.gguf", arch, "F32", layers=1)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    model = load_model(path)
    ours = model.cached_tokenizer()
    for text in TEXTS:
        want = tok(text, add_special_tokens=False).input_ids
        assert ours.encode(text, add_special_tokens=False).ids == want, text
        assert ours.encode(text).ids == tok(text).input_ids, text
        assert ours.decode(want, skip_special_tokens=True) == \
            tok.decode(want, skip_special_tokens=True)
    hf = hf_load(path)
    for chat in CHATS:
        want = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        assert render(model.chat_template(), [[{k: v for k, v in m.items() if v is not None}
                                               for m in chat]], model.special_tokens()) == [want]
        ids = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        out = generate(model, chat, max_new_tokens=1, medusa=False, eos_token_id=[])
        with torch.no_grad():
            assert out.tokens[0][0] == int(hf(torch.tensor([ids])).logits[0, -1].argmax())


def test_gguf_with_medusa_heads_decodes_as_plain_greedy(tmp_path):
    path = write_tiny(tmp_path / "m.gguf", "llama", "Q8_0")
    save_random_heads(tmp_path / "heads", num_heads=3, d=256, vocab=V)
    model = load_model(path, medusa=tmp_path / "heads", dtype=torch.float32)
    chat = [{"role": "user", "content": "the cat"}]
    plain = generate(model, [chat, CHATS[1]], max_new_tokens=12, medusa=False, eos_token_id=[])
    fast = generate(model, [chat, CHATS[1]], max_new_tokens=12, eos_token_id=[])
    assert fast.tokens == plain.tokens


def test_unsupported_architecture_is_refused_by_name(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "phi3")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32) + 1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"m\.gguf: GGUF architecture 'phi3' is not supported"):
        load_model(tmp_path / "m.gguf")


@pytest.mark.parametrize("qtype", ["Q5_0", "Q5_1"])
def test_unsupported_tensor_type_is_refused_by_name(qtype, tmp_path):
    path = write_tiny(tmp_path / "m.gguf", "llama", qtype, layers=1)
    with pytest.raises(ValueError, match=f"token_embd.weight has type {qtype}, which is not "
                                         "supported"):
        load_model(path)


def test_unknown_tensor_and_math_metadata_are_refused_by_name(tmp_path):
    path = write_tiny(tmp_path / "a.gguf", "llama", "F32", layers=1,
                      extra_tensors={"blk.0.attn_qkv.weight": np.ones((8, 8), np.float32)})
    with pytest.raises(ValueError, match=r"tensor blk\.0\.attn_qkv\.weight \(F32\) is not one"):
        load_model(path)
    path = write_tiny(tmp_path / "b.gguf", "llama", "F32", layers=1,
                      extra_tensors={"rope_freqs.weight": np.ones(32, np.float32)})
    with pytest.raises(ValueError, match=r"rope_freqs\.weight"):
        load_model(path)
    path = write_tiny(tmp_path / "c.gguf", "llama", "F32", layers=1,
                      extra_kv={"add_rope_scaling_type": gguf.RopeScalingType.LINEAR,
                                "add_rope_scaling_factor": 4.0})
    with pytest.raises(ValueError, match=r"llama\.rope\.scaling\.type = 'linear'"):
        load_model(path)


def test_metadata_size_that_does_not_fit_the_tensors_is_named(tmp_path):
    path = write_tiny(tmp_path / "m.gguf", "llama", "F32", layers=1,
                      extra_kv={"add_key_length": 32})
    with pytest.raises(ValueError, match=r"llama\.attention\.key_length = 32"):
        load_model(path)


def test_not_a_gguf_file_and_no_template(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="without GGUF's magic number"):
        load_model(bad)
    path = write_tiny(tmp_path / "m.gguf", "llama", "F32", layers=1, template=None)
    model = load_model(path)
    assert model.chat_template() is None
    with pytest.raises(ValueError, match="has no chat template"):
        generate(model, [{"role": "user", "content": "hi"}], max_new_tokens=2, medusa=False)


def test_hf_dir_template_from_tokenizer_config_and_jinja_file(tmp_path):
    """An HF directory's template: tokenizer_config.json's chat_template (a string, or named
    templates), chat_template.jinja winning over it, as transformers loads them."""
    from medusa_kernels.chat import chat_files

    cfg = {"bos_token": {"content": "<s>", "special": True}, "eos_token": "</s>",
           "chat_template": [{"name": "tool_use", "template": "T"},
                             {"name": "default", "template": "D{{ bos_token }}"}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert chat_files(tmp_path) == ("D{{ bos_token }}", {"bos_token": "<s>", "eos_token": "</s>"})
    (tmp_path / "chat_template.jinja").write_text("J")
    assert chat_files(tmp_path)[0] == "J"


def test_truncated_or_corrupted_files_fail_cleanly(tmp_path):
    """Cut or flipped bytes: a ValueError / TypeError naming the file, or (flips inside the
    tensor data) a model that loads: never another exception."""
    import random

    data = open(write_tiny(tmp_path / "m.gguf", "llama", "Q8_0", layers=1), "rb").read()
    rng, bad = random.Random(0), tmp_path / "bad.gguf"
    for i in range(30):
        b = bytearray(data)
        if i < 12:
            b = b[:rng.randrange(4, len(b))]
        else:
            for _ in range(rng.randrange(1, 20)):
                b[rng.randrange(8, 30000 if i % 2 else len(b))] = rng.randrange(256)
        bad.write_bytes(bytes(b))
        try:
            load_model(bad, dtype=torch.float32)
        except (ValueError, TypeError) as e:
            assert str(bad) in str(e), str(e)
