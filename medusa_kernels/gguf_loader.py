"""GGUF files (llama.cpp's format) -> a transformers-style config dict, named float tensors, the
tokenizer, the chat template and the special token ids.

Read with the ``gguf`` package (llama.cpp's own reader: ``pip install medusa_kernels[gguf]``),
as transformers' GGUF loading reads them (its ``integrations/ggml.py`` and
``modeling_gguf_pytorch_utils.py``), without depending on transformers:

- config: ``{arch}.block_count`` -> num_hidden_layers, ``embedding_length`` -> hidden_size, ...
  (``CONFIG_KEYS``); ``tie_word_embeddings`` when there is no ``output.weight``; ``vocab_size``
  from the token list when the file does not say it. The dict then goes through the config
  audit like any config.json.
- tensors: GGUF names -> transformers names (``TENSOR_NAMES``), dequantized by
  ``gguf.quants.dequantize`` from any of ``TYPES`` to the asked dtype; Llama's q/k rows are
  un-permuted (llama.cpp's converter interleaves the rotary halves of each head; transformers
  undoes it the same way).
- tokenizer: ``tokenizer.ggml.*`` -> a ``tokenizers.Tokenizer`` built as transformers'
  GGUF converter builds it (byte-level BPE for ``gpt2`` vocabularies: the vocabulary, merges,
  the pre-tokenizer split of ``tokenizer.ggml.pre``, control tokens as special added tokens).
- ``tokenizer.chat_template``, bos / eos / unk / pad ids and ``add_bos_token``.

Anything else is refused by name: an architecture outside ``ARCHITECTURES``, a tensor type
outside ``TYPES``, a tensor name it does not map, metadata that changes the math which it does
not implement (rope scaling, experts, a head size other than hidden / heads).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

ARCHITECTURES = ("llama", "qwen2")
TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
TOKENIZER_MODELS = ("gpt2",)

CONFIG_KEYS = {  # GGUF "{arch}.<key>" -> config.json key (transformers' GGUF_CONFIG_MAPPING)
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "rope.freq_base": "rope_theta",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "vocab_size": "vocab_size",
}
# "{arch}.<key>" that change the math and are not implemented here (refused when present and
# not neutral); any other metadata key is descriptive (names, licence, file type, ...)
_UNSUPPORTED_KEYS = ("rope.scaling.type", "rope.scaling.factor", "expert_count",
                     "attention.sliding_window", "attention.clamp_kqv", "logit_scale",
                     "attention.causal", "attn_logit_softcapping", "final_logit_softcapping")
_NEUTRAL = {"rope.scaling.type": ("none",), "rope.scaling.factor": (1.0,), "expert_count": (0,),
            "attention.causal": (True,)}

TENSOR_NAMES = {  # GGUF -> transformers (per layer: blk.{i}.X -> model.layers.{i}.Y)
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# tokenizer.ggml.pre -> the split regex its merges were learned with (transformers'
# GGUF_PRE_TOKENIZER_SPLITS); others keep the byte-level pre-tokenizer's own (GPT-2's) regex
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                     "midm-2.0", "lfm2", "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    "tekken": _TEKKEN_SPLIT,
    "qwen35": _QWEN35_SPLIT,
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values


def _require_gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("loading a .gguf file needs the gguf package (llama.cpp's reader): "
                          "pip install 'medusa_kernels[gguf]'") from None
    return gguf


def is_gguf(path) -> bool:
    """Whether ``path`` names a GGUF file (by its magic number, not its name)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except (OSError, TypeError):
        return False


@dataclass
class GGUFCheckpoint:
    """What a GGUF file holds, read from its header (tensor data stays mapped until asked)."""

    path: str
    architecture: str
    config: dict  # as a config.json would say it (audited by ModelConfig.from_hf)
    tensors: dict[str, Any]  # transformers name -> gguf ReaderTensor
    shapes: dict[str, tuple[int, ...]]  # transformers name -> (rows, cols) / (n,)
    metadata: dict[str, Any] = field(repr=False)
    chat_template: str | None = None
    add_bos_token: bool | None = None
    special_ids: dict[str, int | None] = field(default_factory=dict)  # bos/eos/unk/pad

    def generation_defaults(self) -> dict:
        """EOS, BOS and pad ids and ``add_bos_token`` from the metadata (``MedusaModel``'s)."""
        return {"eos_token_id": self.special_ids.get("eos_token_id"),
                "bos_token_id": self.special_ids.get("bos_token_id"),
                "pad_token_id": self.special_ids.get("pad_token_id"),
                "add_bos_token": self.add_bos_token, "source": self.path}

    def special_tokens(self) -> dict[str, str]:
        """bos_token / eos_token / unk_token / pad_token strings (what a chat template sees)."""
        tokens = self.metadata.get("tokenizer.ggml.tokens") or []
        out = {}
        for name in ("bos", "eos", "unk", "pad"):
            i = self.special_ids.get(f"{name}_token_id")
            if i is not None and 0 <= i < len(tokens):
                out[f"{name}_token"] = tokens[i]
        return out

    def tokenizer(self):
        """The ``tokenizers.Tokenizer`` the metadata describes, or None without a vocabulary or
        for a tokenizer model outside ``TOKENIZER_MODELS`` (a warning names it: token ids still
        work)."""
        if "tokenizer.ggml.tokens" not in self.metadata:
            return None
        model = self.metadata.get("tokenizer.ggml.model")
        if model not in TOKENIZER_MODELS:
            warnings.warn(f"{self.path}: GGUF tokenizer.ggml.model = {model!r} is not supported "
                          f"(supported: {', '.join(TOKENIZER_MODELS)}): the model has no "
                          "tokenizer here, give prompts as token ids", stacklevel=2)
            return None
        return build_tokenizer(self.metadata, self.path)

    def iter_tensors(self, dtype: torch.dtype, heads: int, kv_heads: int
                     ) -> Iterator[tuple[str, torch.Tensor]]:
        """(transformers name, dequantized tensor in ``dtype``), one at a time; ``heads`` /
        ``kv_heads`` (the audited config's) undo Llama's q / k row permutation."""
        gguf = _require_gguf()
        for name, t in self.tensors.items():
            w = gguf.quants.dequantize(t.data, t.tensor_type)
            w = np.asarray(w, dtype=np.float32).reshape(self.shapes[name])
            if self.architecture == "llama" and ".self_attn.q_proj." in name:
                w = unpermute(w, heads)
            elif self.architecture == "llama" and ".self_attn.k_proj." in name:
                w = unpermute(w, kv_heads)
            if not (w.flags.writeable and w.flags.c_contiguous):  # a view of the mapped file
                w = np.array(w, order="C")
            yield name, torch.from_numpy(w).to(dtype)


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (rows of each head: [x0, x_half, x1, ...] back to
    [x0, x1, ..., x_half, ...]), as transformers' LlamaTensorProcessor does."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _value(f) -> Any:
    v = f.contents()
    if isinstance(v, np.generic):
        v = v.item()
    return v


def read_gguf(path) -> GGUFCheckpoint:
    """The header of a GGUF file, checked: ValueError naming the file and what it does not
    handle (architecture, tensor type or name, metadata key)."""
    gguf = _require_gguf()
    path = os.fspath(path)
    big = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")
    meta = {}
    try:
        reader = gguf.GGUFReader(path)
        for key, f in reader.fields.items():
            if not key.startswith("GGUF."):
                meta[key] = list(f.contents()) if key in big else _value(f)
    except (ValueError, OSError, KeyError, IndexError, TypeError) as e:  # incl. bad UTF-8
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (supported: "
                         f"{', '.join(ARCHITECTURES)})")
    for key in _UNSUPPORTED_KEYS:
        full = f"{arch}.{key}"
        if full in meta and meta[full] not in _NEUTRAL.get(key, ()):
            raise ValueError(f"{path}: GGUF metadata {full} = {meta[full]!r} is not supported "
                             "(this loader implements plain rope, dense layers, full attention)")
    config: dict[str, Any] = {"model_type": arch}
    for key, hf_key in CONFIG_KEYS.items():
        if f"{arch}.{key}" in meta:
            config[hf_key] = meta[f"{arch}.{key}"]
    names = {t.name for t in reader.tensors}
    config["tie_word_embeddings"] = "output.weight" not in names
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in meta:
        config["vocab_size"] = len(meta["tokenizer.ggml.tokens"])
    heads = config.get("num_attention_heads")
    if arch == "llama" and f"{arch}.rope.dimension_count" in meta:
        config["head_dim"] = meta[f"{arch}.rope.dimension_count"]  # as transformers maps it
    for key in ("attention.key_length", "attention.value_length"):
        value = meta.get(f"{arch}.{key}")
        hidden = config.get("hidden_size")
        if value is not None and heads and hidden and value != config.get("head_dim",
                                                                          hidden // heads):
            raise ValueError(f"{path}: GGUF metadata {arch}.{key} = {value}: only head size "
                             f"{config.get('head_dim', hidden // heads)} is supported")
    if arch == "qwen2" and "blk.0.attn_q.bias" not in names:
        raise ValueError(f"{path}: a qwen2 GGUF without blk.0.attn_q.bias: Qwen2 has q/k/v "
                         "biases")
    tensors, shapes = {}, {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        hf = hf_tensor_name(t.name)
        if hf is None:
            raise ValueError(f"{path}: GGUF tensor {t.name} ({kind}) is not one this loader "
                             f"maps for {arch} (supported: {', '.join(TENSOR_NAMES)}, "
                             f"blk.N.{{{', '.join(LAYER_NAMES)}}})")
        if kind not in TYPES:
            raise ValueError(f"{path}: GGUF tensor {t.name} has type {kind}, which is not "
                             f"supported (supported: {', '.join(TYPES)})")
        tensors[hf] = t
        shapes[hf] = tuple(int(n) for n in reversed(t.shape.tolist()))  # ggml: ne0 innermost
    ids = {}
    for gguf_key, name in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                           ("unknown_token_id", "unk_token_id"),
                           ("padding_token_id", "pad_token_id")):
        ids[name] = meta.get(f"tokenizer.ggml.{gguf_key}")
    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    if add_bos is None and meta.get("tokenizer.ggml.model") == "llama":
        add_bos = True  # llama.cpp's default for a sentencepiece vocabulary (and transformers')
    return GGUFCheckpoint(path, arch, config, tensors, shapes, meta,
                          chat_template=meta.get("tokenizer.chat_template"),
                          add_bos_token=add_bos, special_ids=ids)


def hf_tensor_name(name: str) -> str | None:
    """GGUF tensor name -> transformers name (None: not one of ``TENSOR_NAMES`` /
    ``LAYER_NAMES``)."""
    m = re.fullmatch(r"(?:blk\.(\d+)\.)?(\w+)\.(weight|bias)", name)
    if m is None:
        return None
    layer, base, suffix = m.groups()
    if layer is None:
        return f"{TENSOR_NAMES[base]}.{suffix}" if base in TENSOR_NAMES else None
    return f"model.layers.{layer}.{LAYER_NAMES[base]}.{suffix}" if base in LAYER_NAMES else None


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def build_tokenizer(meta: dict, where: str = "GGUF"):
    """A ``tokenizers.Tokenizer`` from ``tokenizer.ggml.*`` metadata, as transformers' GGUF
    converter builds it (``byte_level_tokenizer`` + ``add_gguf_special_tokens`` +
    ``set_split_regex``)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    model = meta.get("tokenizer.ggml.model")
    if model not in TOKENIZER_MODELS:
        raise ValueError(f"{where}: GGUF tokenizer.ggml.model = {model!r} is not supported "
                         f"(supported: {', '.join(TOKENIZER_MODELS)}); pass token ids instead")
    tokens = meta["tokenizer.ggml.tokens"]
    types = list(meta.get("tokenizer.ggml.token_type") or ())
    if types and len(types) != len(tokens):
        raise ValueError(f"{where}: tokenizer.ggml.token_type has {len(types)} entries for "
                         f"{len(tokens)} tokens")
    types = types or [0] * len(tokens)
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {}
    for i, tok in enumerate(tokens):
        key = tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode())
        vocab[key] = i
    merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges") or ()]
    tk = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                       end_of_word_suffix="", fuse_unk=False))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    control = [AddedToken(t, normalized=False, special=True)
               for t, kind in zip(tokens, types, strict=True)
               if kind == _CONTROL and set(t) <= alphabet]
    if control:
        tk.add_special_tokens(control)
    user = [AddedToken(t, normalized=False, special=False)
            for t, kind in zip(tokens, types, strict=True) if kind == _USER_DEFINED and t in vocab]
    if user:
        tk.add_tokens(user)
    split = PRE_TOKENIZER_SPLITS.get(meta.get("tokenizer.ggml.pre"))
    if split is not None:
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return tk
