"""The config audit: a transformers ``config.json`` dict -> ``ModelConfig`` keyword arguments.

The rule is transformers' own: a key can change a family's math only if that family's code
reads it. Every key of the dict is one of: read here (the decoder implements it), known not to
change a forward pass although transformers reads it (metadata, generation settings, dropout:
``NOT_MATH``), read by transformers but harmless at the value it has (``IGNORED``), read by
transformers and not implemented here (refused: a ValueError / TypeError naming the key and its
value), or not read by transformers' code for that family at all (``READS``): ignored, as
transformers ignores it (``unk_token_id``, ``is_llama_config``, ``rope_interleaved``...).
``READS`` lists, per family, the config attributes that transformers 5.25's modeling and
configuration code of the family reads (its ``modeling_*.py`` / ``configuration_*.py`` and the
shared rope, mask, cache and config utilities); python_tests/test_config_audit.py derives it
again from the installed transformers and fails when the two differ.

Defaults are those of transformers 5.24's config classes (a config.json may leave any key out;
``defaulted_sizes`` names the size keys whose default was taken, so a loader can say so), and
so are the derived settings (Qwen2/3's ``use_sliding_window`` / ``max_window_layers``, Gemma's
local/global ``layer_types``, Gemma-3's rope per layer type, Phi-3's
``original_max_position_embeddings``).

Supported ``model_type``: llama, mistral, qwen2, qwen3, phi3, gemma2, gemma3_text.
"""

from __future__ import annotations

import math
from typing import Any, NoReturn

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text")

# transformers' ACT2FN names the decoder implements (model.ACTIVATIONS holds the functions)
ACTIVATIONS = ("silu", "swish", "gelu", "gelu_python", "gelu_new", "gelu_fast", "gelu_accurate",
               "gelu_pytorch_tanh", "gelu_python_tanh", "gelu_10", "quick_gelu", "relu", "relu2",
               "relu6", "leaky_relu", "sigmoid", "tanh", "linear", "mish", "laplace",
               "sqrtsoftplus", "hardswish")

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
_ROPE_KEYS = {  # keys a rope dict may hold, per type (as transformers' validators list them)
    "default": set(),
    "linear": {"factor"},
    "dynamic": {"factor"},
    "yarn": {"factor", "original_max_position_embeddings", "attention_factor", "beta_fast",
             "beta_slow", "mscale", "mscale_all_dim", "truncate"},
    "longrope": {"short_factor", "long_factor", "original_max_position_embeddings",
                 "attention_factor", "factor"},
    "llama3": {"factor", "original_max_position_embeddings", "low_freq_factor",
               "high_freq_factor"},
}
_ROPE_COMMON = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
MAX_LAYERS = 4096  # a bound that keeps a corrupt num_hidden_layers from building a huge list

# config attributes transformers 5.25 reads for each family (its modeling_<family>.py and
# configuration_<family>.py, plus modeling_rope_utils, masking_utils, cache_utils and
# configuration_utils): python_tests/test_config_audit.py re-derives the table from the
# installed transformers. A config.json key outside it cannot change transformers' math.
_READS_COMMON = frozenset({
    "_attn_implementation", "_attn_implementation_internal", "_auto_class",
    "_experts_implementation", "_experts_implementation_internal", "_name_or_path",
    "_output_attentions", "_post_init_done", "_rope_type_labels", "attention_chunk_size",
    "attention_dropout", "config", "config_class", "default_rope_type", "default_theta",
    "dtype", "embed_dim", "first_k_dense_replace", "head_dim", "hidden_size", "id2label",
    "ignore_keys_at_rope_validation", "init_kwargs", "intermediate_size", "is_causal",
    "is_heterogeneous", "json", "kv_sharing_modes", "layer_types", "max_position_embeddings",
    "max_seq_len_cached", "mlp_layer_types", "model_type", "mtp_layer_types",
    "mtp_mlp_layer_types", "mtp_per_layer_config", "num_attention_heads", "num_heads",
    "num_hidden_layers", "num_key_value_heads", "num_labels", "num_mtp_layers",
    "number_of_conv_states", "original_inv_freq", "original_max_position_embeddings",
    "original_max_seq_len", "output_attentions", "pad_token_id", "partial_rotary_factor",
    "per_layer_config", "problem_type", "quantization_config", "return_dict", "rms_norm_eps",
    "rope_parameters", "rope_theta", "rope_type", "sliding_window", "sub_config_name",
    "sub_configs", "sub_configs_defaults", "validate", "vocab_size"})
READS = {
    "llama": _READS_COMMON | {"attention_bias", "hidden_act", "mlp_bias"},
    "mistral": _READS_COMMON | {"hidden_act"},
    "qwen2": _READS_COMMON | {"hidden_act", "max_window_layers", "use_sliding_window"},
    "qwen3": _READS_COMMON | {"attention_bias", "hidden_act", "max_window_layers",
                              "use_sliding_window"},
    "phi3": _READS_COMMON | {"hidden_act", "resid_pdrop"},
    "gemma2": _READS_COMMON | {"attention_bias", "attn_logit_softcapping",
                               "final_logit_softcapping", "hidden_activation",
                               "query_pre_attn_scalar", "use_bidirectional_attention"},
    "gemma3_text": _READS_COMMON | {"_sliding_window_pattern", "attention_bias",
                                    "attn_logit_softcapping", "final_logit_softcapping",
                                    "hidden_activation", "image_token_id", "mm_tokens_per_image",
                                    "query_pre_attn_scalar", "text_config",
                                    "use_bidirectional_attention", "vision_config"},
}
# the sizes a checkpoint's tensors must agree with: a missing one takes the family's default
SIZE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "head_dim")

_GENERATION = ("bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id",
               "decoder_start_token_id", "use_cache", "cache_implementation", "max_length",
               "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
               "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
               "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
               "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences",
               "output_scores", "return_dict_in_generate", "forced_bos_token_id",
               "forced_eos_token_id", "remove_invalid_values",
               "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens")
_METADATA = ("_name_or_path", "architectures", "transformers_version", "torch_dtype", "dtype",
             "auto_map", "_commit_hash", "attn_implementation", "_attn_implementation",
             "_attn_implementation_autoset", "output_attentions", "output_hidden_states",
             "return_dict", "use_return_dict", "torchscript", "id2label", "label2id",
             "num_labels", "problem_type", "finetuning_task", "tokenizer_class", "prefix",
             "task_specific_params", "use_bfloat16", "tf_legacy_loss", "is_decoder",
             "tie_encoder_decoder", "cross_attention_hidden_size", "initializer_range",
             "model_type")
NOT_MATH = {
    **dict.fromkeys(_METADATA, "metadata or initialisation"),
    **dict.fromkeys(_GENERATION, "a generation setting, not the forward pass"),
    **dict.fromkeys(("attention_dropout", "resid_pdrop", "embd_pdrop", "hidden_dropout",
                     "dropout"), "dropout, inactive at inference"),
    "chunk_size_feed_forward": "chunks the MLP over positions: the same math",
    "pretraining_tp": "transformers 5 does not split the matmuls any more: the same math",
    "medusa_num_heads": "read by the Medusa heads loader",
    "medusa_num_layers": "read by the Medusa heads loader",
    "base_model_name_or_path": "read by the Medusa heads loader",
}
# keys that must hold their neutral value (absent counts as neutral), for every family
NEUTRAL = {"pruned_heads": ({},), "is_encoder_decoder": (False,), "add_cross_attention": (False,)}
REFUSED = {
    "quantization_config": "quantized weights are not supported (load an unquantized checkpoint)",
}

_LLAMA = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
              num_attention_heads=32, num_key_value_heads=None, head_dim=None, hidden_act="silu",
              max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
              rope_theta=10000.0, attention_bias=False, mlp_bias=False)
DEFAULTS = {  # transformers 5.24's config class defaults (test_config_audit checks them)
    "llama": _LLAMA,
    "mistral": dict(_LLAMA, intermediate_size=14336, num_key_value_heads=8,
                    max_position_embeddings=4096 * 32, sliding_window=4096),
    "qwen2": dict(_LLAMA, vocab_size=151936, intermediate_size=22016, num_key_value_heads=32,
                  max_position_embeddings=32768, use_sliding_window=False, sliding_window=4096,
                  max_window_layers=28, layer_types=None),
    "qwen3": dict(_LLAMA, vocab_size=151936, intermediate_size=22016, num_key_value_heads=32,
                  head_dim=128, max_position_embeddings=32768, use_sliding_window=False,
                  sliding_window=4096, max_window_layers=28, layer_types=None),
    "phi3": dict(_LLAMA, vocab_size=32064, hidden_size=3072, intermediate_size=8192,
                 max_position_embeddings=4096, original_max_position_embeddings=4096,
                 rms_norm_eps=1e-5, sliding_window=None, partial_rotary_factor=1.0),
    "gemma2": dict(_LLAMA, vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                   num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                   head_dim=256, hidden_activation="gelu_pytorch_tanh",
                   max_position_embeddings=8192, tie_word_embeddings=True,
                   query_pre_attn_scalar=256, sliding_window=4096, layer_types=None,
                   final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                   use_bidirectional_attention=None),
    "gemma3_text": dict(_LLAMA, vocab_size=262208, hidden_size=2304, intermediate_size=9216,
                        num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                        head_dim=256, hidden_activation="gelu_pytorch_tanh",
                        max_position_embeddings=131072, tie_word_embeddings=True,
                        query_pre_attn_scalar=256, sliding_window=4096, layer_types=None,
                        final_logit_softcapping=None, attn_logit_softcapping=None,
                        use_bidirectional_attention=False, rope_theta=1_000_000.0,
                        rope_local_base_freq=10_000.0, sliding_window_pattern=6),
}
for _gemma in ("gemma2", "gemma3_text"):
    del DEFAULTS[_gemma]["hidden_act"], DEFAULTS[_gemma]["mlp_bias"]
for _name in ("mistral", "qwen2", "phi3"):
    del DEFAULTS[_name]["attention_bias"]
for _name in ("mistral", "qwen2", "qwen3", "phi3"):
    del DEFAULTS[_name]["mlp_bias"]


def _same_window_everywhere(value, kw) -> bool:
    """layer_types that say what transformers does anyway (one window for every layer)."""
    windows = kw["layer_windows"] or (None,) * kw["num_layers"]
    return value is None or value == [
        "full_attention" if w is None else "sliding_attention" for w in windows]


# keys transformers' code for the family reads that this decoder does not: accepted at the value
# given here (predicate of (value, the audited kwargs)), refused otherwise, with the reason
# (a key it does not read at all is ignored whatever its value; a test checks every key here is
# in READS)
IGNORED = {
    "llama": {
        "sliding_window": (lambda v, kw: v is None, "LlamaForCausalLM has no sliding window"),
        "layer_types": (lambda v, kw: v is None or set(v) <= {"full_attention"},
                        "LlamaForCausalLM has full attention in every layer"),
    },
    "mistral": {
        "layer_types": (_same_window_everywhere, "MistralForCausalLM applies sliding_window "
                        "to every layer and ignores layer_types"),
    },
    "phi3": {
        "layer_types": (_same_window_everywhere, "Phi3ForCausalLM applies sliding_window to "
                        "every layer and ignores layer_types"),
    },
    "gemma3_text": {
        "attn_logit_softcapping": (lambda v, kw: v is None, "transformers' Gemma3 does not apply "
                                   "attention soft-capping"),
    },
}


def defaulted_sizes(cfg: dict) -> list[tuple[str, Any]]:
    """(key, default taken) for each size key (``SIZE_KEYS``) config.json leaves out, in the
    family's defaults: a checkpoint whose tensors do not fit is then explained by the missing key,
    not by a shape."""
    family = cfg.get("model_type", "llama") if isinstance(cfg, dict) else None
    if family not in DEFAULTS:
        return []
    return [(k, DEFAULTS[family][k]) for k in SIZE_KEYS
            if k not in cfg and k in DEFAULTS[family]]


def defaulted_note(cfg: dict) -> str:
    """'' or "config.json has no num_attention_heads (transformers' llama default 32 taken)"."""
    missing = defaulted_sizes(cfg)
    if not missing:
        return ""
    family = cfg.get("model_type", "llama")
    keys = ", ".join(f"{k} (transformers' {family} default {v!r} taken)" for k, v in missing)
    return f"config.json has no {keys}"


class _Reader:
    """Reads keys of one config dict, with the family's defaults; remembers what it read."""

    def __init__(self, cfg: dict, family: str):
        self.cfg, self.family, self.defaults = cfg, family, DEFAULTS[family]
        self.read: set[str] = set()

    def fail(self, key: str, value: Any, expected: str, error=ValueError) -> NoReturn:
        raise error(f"config.json {key} = {value!r}: {expected}")

    def has(self, key: str) -> bool:
        return key in self.cfg

    def raw(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return self.cfg.get(key, self.defaults.get(key, default))

    def int(self, key: str, lo: int = 1, hi: int = 2**31 - 1, none_ok=False, default=None):
        value = self.raw(key, default)
        if value is None and none_ok:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, value, "must be an int", TypeError)
        if not lo <= value <= hi:
            self.fail(key, value, f"must lie in [{lo}, {hi}]")
        return value

    def number(self, key: str, positive=True, none_ok=False, default=None):
        return number(key, self.raw(key, default), positive, none_ok)

    def flag(self, key: str, default=None) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            self.fail(key, value, "must be true or false", TypeError)
        return value

    def choice(self, key: str, choices, default=None) -> str:
        value = self.raw(key, default)
        if not isinstance(value, str):
            self.fail(key, value, f"must be a string, one of {list(choices)}", TypeError)
        if value not in choices:
            self.fail(key, value, f"is not supported (supported: {', '.join(choices)})")
        return value


def number(key: str, value: Any, positive=True, none_ok=False) -> float | None:
    """A finite int/float (> 0 when ``positive``, else >= 0), or None when ``none_ok``."""
    if value is None and none_ok:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"config.json {key} = {value!r}: must be a number")
    if not math.isfinite(value) or (value <= 0 if positive else value < 0):
        raise ValueError(f"config.json {key} = {value!r}: must be a finite number "
                         f"{'> 0' if positive else '>= 0'}")
    return float(value)


def audit(cfg: Any) -> dict:
    """Check a config.json dict and return the ``ModelConfig`` keyword arguments it describes.

    Raises TypeError / ValueError naming the key and its value for anything that is not
    implemented exactly (see the module docstring)."""
    if not isinstance(cfg, dict):
        raise TypeError(f"config.json must hold a JSON object, got {type(cfg).__name__}")
    family = cfg.get("model_type", "llama")
    if family == "gemma3":
        raise ValueError("config.json model_type = 'gemma3' is the multimodal Gemma-3 "
                         "(language_model.* weights): only the text model, model_type "
                         "'gemma3_text' (Gemma3ForCausalLM), is supported")
    if family not in FAMILIES:
        raise ValueError(f"config.json model_type = {family!r} is not supported (supported: "
                         f"{', '.join(FAMILIES)})")
    r = _Reader(cfg, family)
    gemma = family in ("gemma2", "gemma3_text")
    layers = r.int("num_hidden_layers", hi=MAX_LAYERS)
    heads = r.int("num_attention_heads")
    hidden = r.int("hidden_size")
    kv_heads = r.int("num_key_value_heads", none_ok=True) or heads
    if heads % kv_heads:
        r.fail("num_key_value_heads", kv_heads,
               f"must divide num_attention_heads = {heads}")
    head_dim = r.int("head_dim", none_ok=family not in ("gemma2", "gemma3_text", "qwen3"))
    if head_dim is None:
        if hidden % heads and family in ("llama", "mistral"):
            r.fail("hidden_size", hidden, f"is not a multiple of num_attention_heads = {heads} "
                   "and config.json has no head_dim")
        head_dim = hidden // heads
        if head_dim < 1:
            r.fail("hidden_size", hidden, f"must be >= num_attention_heads = {heads}")
    act_key = "hidden_activation" if gemma else "hidden_act"
    kw = dict(
        vocab_size=r.int("vocab_size"),
        hidden_size=hidden,
        intermediate_size=r.int("intermediate_size"),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=r.number("rms_norm_eps", positive=False),
        max_position_embeddings=r.int("max_position_embeddings"),
        tie_word_embeddings=r.flag("tie_word_embeddings"),
        hidden_act=r.choice(act_key, ACTIVATIONS),
        model_type=family,
    )
    # biases (the tensors must agree: the loader checks them)
    if family in ("llama", "qwen3", "gemma2", "gemma3_text"):
        kw["qkv_bias"] = kw["o_bias"] = r.flag("attention_bias")
    elif family == "qwen2":
        kw["qkv_bias"] = True
    if family == "llama":
        kw["mlp_bias"] = r.flag("mlp_bias")
    # per-family structure
    if family == "qwen3":
        kw["qk_norm"] = True
    if gemma:
        kw.update(norm_unit_offset=True, sandwich_norms=True, embed_scale=hidden**0.5,
                  qk_norm=family == "gemma3_text",
                  query_pre_attn_scalar=r.number("query_pre_attn_scalar"),
                  final_softcap=r.number("final_logit_softcapping", none_ok=True))
        if family == "gemma2":
            kw["attn_softcap"] = r.number("attn_logit_softcapping", none_ok=True)
        if r.raw("use_bidirectional_attention") not in (None, False):
            r.fail("use_bidirectional_attention", cfg["use_bidirectional_attention"],
                   "bidirectional attention (an embedding model) is not a causal decoder")
    kw["layer_windows"], kw["_sliding_window"] = _windows(r, layers)
    kw.update(_rope(r, kw, head_dim))
    _leftovers(r, kw)
    del kw["_sliding_window"]
    return kw


def _layer_types(r: _Reader, layers: int, default: list[str]) -> list[str]:
    value = r.raw("layer_types")
    if value is None:
        return default
    if not isinstance(value, list) or len(value) != layers or not all(
            t in ("full_attention", "sliding_attention") for t in value):
        r.fail("layer_types", value, f"must be a list of {layers} (num_hidden_layers) entries, "
               "each 'full_attention' or 'sliding_attention'")
    return value


def _windows(r: _Reader, layers: int) -> tuple[tuple[int | None, ...] | None, int | None]:
    """Per-layer sliding windows as transformers derives them (None: full attention), and the
    config's effective sliding_window."""
    family = r.family
    if family == "llama":
        return None, None
    window = r.int("sliding_window", none_ok=True)
    if family in ("mistral", "phi3"):  # one window for every layer
        return (None if window is None else (window,) * layers), window
    if family in ("qwen2", "qwen3"):
        if not r.flag("use_sliding_window"):
            window = None  # transformers' __post_init__: the window only with use_sliding_window
        first = r.int("max_window_layers", lo=0)
        default = ["sliding_attention" if window is not None and i >= first else "full_attention"
                   for i in range(layers)]
    elif family == "gemma2":
        default = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
    else:  # gemma3_text: every pattern-th layer is global
        pattern = r.int("sliding_window_pattern")
        saved = r.raw("_sliding_window_pattern")  # what save_pretrained writes next to layer_types
        if saved is not None and saved != pattern and r.raw("layer_types") is None:
            r.fail("_sliding_window_pattern", saved, f"disagrees with sliding_window_pattern = "
                   f"{pattern} and there are no layer_types to settle it")
        default = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                   for i in range(layers)]
    types = _layer_types(r, layers, default)
    if window is None and (family.startswith("gemma") or "sliding_attention" in types):
        why = "use_sliding_window is false" if family.startswith("qwen") else "it is null"
        r.fail("sliding_window", r.cfg.get("sliding_window"),
               f"layer_types has sliding layers but {why}: transformers cannot build their mask"
               if not family.startswith("gemma") else
               "Gemma needs a window for its local layers (transformers' mask builder raises "
               "without one)")
    windows = tuple(window if t == "sliding_attention" else None for t in types)
    return (windows if any(w is not None for w in windows) else None), window


def _rope_dicts(r: _Reader) -> dict[str, tuple[str, dict]]:
    """The rope dict(s) as transformers standardises them, each with the config key it came
    from: {"global": (key, dict), "local": (key, dict) for Gemma-3}."""
    scaling, params = r.raw("rope_scaling"), r.raw("rope_parameters")
    for key, value in (("rope_scaling", scaling), ("rope_parameters", params)):
        if value is not None and not isinstance(value, dict):
            r.fail(key, value, "must be a JSON object or null", TypeError)

    def fill(rope: dict, key: str, top: str) -> None:  # from the top level, checked there
        if key not in rope:
            rope[key] = number(top, r.raw(top))

    if r.family == "gemma3_text":
        nested = params if params is not None else {}
        if params is not None and (set(params) - {"full_attention", "sliding_attention"}):
            r.fail("rope_parameters", params, "gemma3_text takes it per layer type: "
                   "{'full_attention': {...}, 'sliding_attention': {...}}")
        for name in ("full_attention", "sliding_attention"):
            if not isinstance(nested.get(name) or {}, dict):
                r.fail(f"rope_parameters.{name}", nested[name], "must be a JSON object",
                       TypeError)
        full = dict(nested.get("full_attention") or {"rope_type": "default"})
        local = dict(nested.get("sliding_attention") or {"rope_type": "default"})
        if scaling is not None:
            full.update(scaling)
        fill(full, "rope_theta", "rope_theta")
        fill(local, "rope_theta", "rope_local_base_freq")
        for name, rope in (("full_attention", full), ("sliding_attention", local)):
            if rope.get("truncate", True) is not True:  # yarn reads it at the top of the nest
                raise ValueError(f"config.json rope_parameters.{name}.truncate = "
                                 f"{rope['truncate']!r}: transformers' Gemma-3 ignores it there")
        return {"global": ("rope_scaling" if scaling is not None else
                           "rope_parameters.full_attention", full),
                "local": ("rope_parameters.sliding_attention", local)}
    if scaling is not None and params is not None and scaling != params:
        r.fail("rope_scaling", scaling, f"and rope_parameters = {params!r} disagree (say one)")
    rope = dict(scaling if scaling is not None else params or {})
    for key in ("rope_theta", "partial_rotary_factor"):  # transformers: the rope dict's wins
        if r.has(key) and key in rope and rope[key] != r.raw(key):
            r.fail(key, r.cfg[key], f"disagrees with the rope dict's {key} = {rope[key]!r}")
    fill(rope, "rope_theta", "rope_theta")
    if r.family == "phi3":
        fill(rope, "partial_rotary_factor", "partial_rotary_factor")
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind in ("su", "yarn"):  # Phi-3's legacy names for longrope
            rope["rope_type"] = "longrope"
            rope.pop("type", None)
    elif "partial_rotary_factor" in r.cfg:
        fill(rope, "partial_rotary_factor", "partial_rotary_factor")
    return {"global": ("rope_scaling" if scaling is not None else "rope_parameters", rope)}


def _rope(r: _Reader, kw: dict, head_dim: int) -> dict:
    """rope_theta, rope_scaling, partial_rotary_factor (and Gemma-3's local rope) for
    ModelConfig, every parameter resolved (factors, attention factor, original length)."""
    out = {}
    for which, (where, rope) in _rope_dicts(r).items():
        kind = rope.get("rope_type", rope.get("type", "default"))
        if not isinstance(kind, str) or kind not in ROPE_TYPES or (
                r.family == "phi3" and kind not in ("default", "longrope")):
            allowed = ("default", "longrope") if r.family == "phi3" else ROPE_TYPES
            raise ValueError(f"config.json {where} rope_type = {kind!r} is not supported "
                             f"for {r.family} (supported: {', '.join(allowed)})")
        unknown = set(rope) - _ROPE_COMMON - _ROPE_KEYS[kind] - {"truncate"}
        if unknown:
            raise ValueError(f"config.json {where} has keys {sorted(unknown)} that rope_type "
                             f"{kind!r} does not use")
        theta = number(f"{where}.rope_theta", rope.get("rope_theta"))
        partial = number(f"{where}.partial_rotary_factor", rope.get("partial_rotary_factor", 1.0))
        if partial != 1.0 and r.family != "phi3":
            raise ValueError(f"config.json {where}.partial_rotary_factor = {partial}: "
                             f"transformers' {r.family} rotates the whole head (only phi3 "
                             "applies a partial rotary factor)")
        rotary = int(head_dim * partial)
        if partial > 1 or rotary < 2 or rotary % 2:
            raise ValueError(f"config.json {where}.partial_rotary_factor = {partial}: "
                             f"head_dim {head_dim} x it = {rotary} rotary dims, must be even, "
                             f">= 2 and <= head_dim")
        scaling = _scaling(r, where, kind, rope, kw, rotary)
        prefix = "" if which == "global" else "local_"
        out[prefix + "rope_theta"] = theta
        out[prefix + "rope_scaling"] = scaling
        if which == "global":
            out["partial_rotary_factor"] = partial
    if r.has("original_max_position_embeddings"):  # unused by the default/linear/dynamic ropes
        r.int("original_max_position_embeddings")
    return out


def _scaling(r: _Reader, where: str, kind: str, rope: dict, kw: dict, rotary: int) -> dict | None:
    """The rope scaling dict with every parameter resolved as transformers resolves it."""
    if kind == "default":
        return None

    def need(key):
        if key not in rope:
            raise ValueError(f"config.json {where} rope_type {kind!r} needs {key}")
        return number(f"{where}.{key}", rope[key])

    max_pos = kw["max_position_embeddings"]
    out = {"rope_type": kind}
    if kind in ("llama3", "yarn", "longrope"):
        if r.family == "phi3":  # Phi-3 keeps it at the top level, and that wins
            orig = r.int("original_max_position_embeddings")
        else:
            if "original_max_position_embeddings" in r.cfg:
                top = r.raw("original_max_position_embeddings")
                if top != rope.get("original_max_position_embeddings", max_pos):
                    r.fail("original_max_position_embeddings", top, f"transformers' {r.family} "
                           f"uses {where}.original_max_position_embeddings (or "
                           "max_position_embeddings) instead: ambiguous, put it in the rope dict")
            orig = rope.get("original_max_position_embeddings", max_pos)
            if isinstance(orig, bool) or not isinstance(orig, int) or orig < 1:
                raise TypeError(f"config.json {where}.original_max_position_embeddings = "
                                f"{orig!r}: must be an int >= 1")
        out["original_max_position_embeddings"] = orig
    if kind in ("linear", "dynamic", "llama3"):
        out["factor"] = need("factor")
    if kind == "llama3":
        out["low_freq_factor"] = need("low_freq_factor")
        out["high_freq_factor"] = need("high_freq_factor")
        if out["high_freq_factor"] <= out["low_freq_factor"]:
            raise ValueError(f"config.json {where}.high_freq_factor = {out['high_freq_factor']} "
                             f"must exceed low_freq_factor = {out['low_freq_factor']}")
    if kind == "yarn":
        factor = rope.get("factor")
        factor = max_pos / orig if factor is None else number(f"{where}.factor", factor)
        attention = rope.get("attention_factor")
        mscale, mscale_all = rope.get("mscale"), rope.get("mscale_all_dim")
        for key, value in (("mscale", mscale), ("mscale_all_dim", mscale_all)):
            number(f"{where}.{key}", value, positive=False, none_ok=True)

        def get_mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if attention is None:
            attention = (get_mscale(factor, mscale) / get_mscale(factor, mscale_all)
                         if mscale and mscale_all else get_mscale(factor))
        truncate = rope.get("truncate", True)
        if not isinstance(truncate, bool):
            raise TypeError(f"config.json {where}.truncate = {truncate!r}: must be true/false")
        out.update(factor=factor, attention_factor=number(f"{where}.attention_factor", attention),
                   beta_fast=number(f"{where}.beta_fast", rope.get("beta_fast") or 32),
                   beta_slow=number(f"{where}.beta_slow", rope.get("beta_slow") or 1),
                   truncate=truncate)
    if kind == "longrope":
        for key in ("short_factor", "long_factor"):
            value = rope.get(key)
            if not isinstance(value, list) or len(value) != rotary // 2:
                raise ValueError(f"config.json {where}.{key} = {value!r}: must be a list of "
                                 f"{rotary // 2} numbers (rotary dims / 2)")
            out[key] = [number(f"{where}.{key}[{i}]", x) for i, x in enumerate(value)]
        factor = rope.get("factor")
        factor = max_pos / orig if factor is None else number(f"{where}.factor", factor)
        attention = rope.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(orig))
        out["attention_factor"] = number(f"{where}.attention_factor", attention)
    if kind == "dynamic":
        out["max_position_embeddings"] = max_pos
    return out


def _leftovers(r: _Reader, kw: dict) -> None:
    """Every key not read above: harmless, not read by transformers' code for the family
    (ignored, as transformers ignores it), ignored by it at this value, or refused."""
    ignored = IGNORED.get(r.family, {})
    reads = READS[r.family]
    for key, value in r.cfg.items():
        if key in r.read or key in NOT_MATH:
            continue
        if key in REFUSED:
            r.fail(key, value, REFUSED[key])
        if key in NEUTRAL:
            if value not in NEUTRAL[key]:
                r.fail(key, value, f"only {NEUTRAL[key][0]!r} is supported")
            continue
        if key in ignored:
            accept, why = ignored[key]
            if not accept(value, kw):
                r.fail(key, value, f"not supported: {why}")
            continue
        if key in reads:
            r.fail(key, value, f"transformers' {r.family} code reads it and this decoder does "
                   "not implement it (remove it if the checkpoint does not need it)")
