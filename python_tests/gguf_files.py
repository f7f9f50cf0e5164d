"""Tiny random GGUF files written with ``gguf.GGUFWriter`` (llama.cpp's writer), for the tests.

Sizes are multiples of 256 where a tensor may be K-quantized (a K-quant block is 256 values).
``gguf.quants.quantize`` writes F32, F16, BF16, Q8_0, Q4_0, Q4_1 and Q5_0; the K-quants it does
not write, so their blocks are random bytes with finite scales (any such block is a valid
K-quant block; the values it decodes to are what the tests compare).
"""

from __future__ import annotations

import numpy as np

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "i n", "Ġt he", "a n", "e r", "o n", "Ġ a", "r e", "a t", "Ġ s",
          "e n", "o r", "Ġ w", "Ġ c", "i s", "Ġ i", "l l", "Ġ b", "Ġ o", "Ġ f", "e s",
          "Ġ p", "i t", "a l", "Ġ m", "a r", "Ġ d", "Ġ h", "o u"]
TEMPLATE = (  # our own: system turns trimmed, a BOS, loop controls, the generation prompt
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
    "<|im_start|>system\n{{ m['content'] | trim }}<|im_end|>\n"
    "{% elif m['role'] == 'tool' %}{% continue %}"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_alphabet() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs, strict=True))]


def vocabulary() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of a byte-level BPE vocabulary: 3 control tokens, the 256
    byte characters, one token per merge."""
    tokens = SPECIALS + _byte_alphabet()
    for m in MERGES:
        tokens.append(m.replace(" ", ""))
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    return tokens, types, MERGES


def _k_blocks(rows: int, cols: int, qtype, rng) -> np.ndarray:
    """Random K-quant bytes [rows, bytes per row] with small finite fp16 scales."""
    from gguf.constants import GGML_QUANT_SIZES
    from gguf.constants import GGMLQuantizationType as T

    block, size = GGML_QUANT_SIZES[qtype]
    nb = rows * cols // block
    raw = rng.integers(0, 256, size=(nb, size), dtype=np.uint8)
    scale = lambda lo, hi: rng.uniform(lo, hi, size=nb).astype(np.float16).view(np.uint8)\
        .reshape(nb, 2)  # noqa: E731
    if qtype in (T.Q4_K, T.Q5_K):  # d, dmin first
        raw[:, 0:2], raw[:, 2:4] = scale(5e-5, 2.5e-4), scale(2e-5, 1e-4)
    else:  # Q6_K: d last; int8 sub-block scales before it
        raw[:, -2:] = scale(2e-5, 1.5e-4)
    return raw.reshape(rows, cols // block * size)


def write_tiny(path, arch: str = "llama", qtype: str = "F32", seed: int = 0, layers: int = 2,
               d: int = 256, inter: int = 512, heads: int = 4, kv_heads: int = 2,
               tied: bool | None = None, template: str | None = TEMPLATE, name: str = "tiny",
               extra_kv=None, extra_tensors=None) -> str:
    """A random ``arch`` model with its big matrices in ``qtype`` (norms and biases F32, as
    llama.cpp keeps them). Returns ``path``."""
    import gguf
    from gguf.constants import GGMLQuantizationType as T

    rng = np.random.default_rng(seed)
    tokens, types, merges = vocabulary()
    V, hd = len(tokens), d // heads
    tied = arch == "qwen2" if tied is None else tied
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(d)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    if arch == "llama":
        w.add_rope_dimension_count(hd)
    w.add_vocab_size(V)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2" if arch == "qwen2" else "smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_bos_token(False)
    if template is not None:
        w.add_chat_template(template)
    for key, value in (extra_kv or {}).items():
        getattr(w, key)(value)
    kind = T[qtype]

    def matrix(name, rows, cols, std=0.08):
        x = (rng.standard_normal((rows, cols)) * std).astype(np.float32)
        if kind == T.F32:
            w.add_tensor(name, x)
        elif kind == T.F16:
            w.add_tensor(name, x.astype(np.float16))
        elif kind in (T.Q4_K, T.Q5_K, T.Q6_K):
            w.add_tensor(name, _k_blocks(rows, cols, kind, rng), raw_dtype=kind)
        else:
            w.add_tensor(name, gguf.quants.quantize(x, kind), raw_dtype=kind)

    def vector(name, n, mean=0.0, std=0.1):
        w.add_tensor(name, (mean + rng.standard_normal(n) * std).astype(np.float32))

    matrix("token_embd.weight", V, d, std=0.5)
    for i in range(layers):
        vector(f"blk.{i}.attn_norm.weight", d, 1.0)
        matrix(f"blk.{i}.attn_q.weight", d, d)
        matrix(f"blk.{i}.attn_k.weight", kv_heads * hd, d)
        matrix(f"blk.{i}.attn_v.weight", kv_heads * hd, d)
        if arch == "qwen2":
            vector(f"blk.{i}.attn_q.bias", d)
            vector(f"blk.{i}.attn_k.bias", kv_heads * hd)
            vector(f"blk.{i}.attn_v.bias", kv_heads * hd)
        matrix(f"blk.{i}.attn_output.weight", d, d)
        vector(f"blk.{i}.ffn_norm.weight", d, 1.0)
        matrix(f"blk.{i}.ffn_gate.weight", inter, d)
        matrix(f"blk.{i}.ffn_up.weight", inter, d)
        matrix(f"blk.{i}.ffn_down.weight", d, inter)
    vector("output_norm.weight", d, 1.0)
    if not tied:
        matrix("output.weight", V, d)
    for name, value in (extra_tensors or {}).items():
        w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)
