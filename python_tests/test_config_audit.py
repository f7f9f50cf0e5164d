"""The config audit: every config.json key that changes the math is implemented or refused.

For each family, a list of keys with non-default values: a tiny checkpoint saved by transformers
with that value either decodes as transformers does (logits at every position, prefill then
one token at a time; the config also rewritten in the v4 layout that hub checkpoints carry:
rope_theta / rope_scaling, no layer_types) or is refused with an error naming the key, its value
and the file. A parity case also checks that the value changes transformers' own logits (else
the case could not fail), unless it is listed as harmless."""

import copy
import dataclasses
import json
import math
import pathlib
import re

import pytest
import torch
import transformers
from tiny_models import VOCAB, make_hf_model

from medusa_kernels import load_model
from medusa_kernels.hf_config import ACTIVATIONS, DEFAULTS, IGNORED, READS, audit

CLASSES = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
           "phi3": transformers.Phi3Config, "gemma2": transformers.Gemma2Config,
           "gemma3_text": transformers.Gemma3TextConfig}
TINY = {  # each family's tiny base config (on top of tiny_models' sizes)
    "llama": dict(num_key_value_heads=2),
    "mistral": dict(num_key_value_heads=2),
    "qwen2": dict(num_key_value_heads=2),
    "qwen3": dict(num_key_value_heads=2, head_dim=16),
    "phi3": dict(num_key_value_heads=2),
    "gemma2": dict(num_key_value_heads=2, head_dim=16, sliding_window=4,
                   attn_logit_softcapping=1.0, final_logit_softcapping=1.5),
    "gemma3_text": dict(num_key_value_heads=2, head_dim=16, sliding_window=4,
                        sliding_window_pattern=2),
}
LONG6 = dict(short_factor=[1.0 + 0.1 * i for i in range(6)],
             long_factor=[1.5 + 0.4 * i for i in range(6)])

# (family, overrides, "harmless" (parity, and transformers' logits do not change either))
PARITY = [
    *[("llama", dict(hidden_act=a), a == "swish") for a in ACTIVATIONS if a != "silu"],
    ("llama", dict(rms_norm_eps=0.5), False),
    ("llama", dict(attention_bias=True), False),
    ("llama", dict(mlp_bias=True), False),
    ("llama", dict(head_dim=32), False),
    ("llama", dict(num_key_value_heads=1), False),
    ("llama", dict(tie_word_embeddings=True), False),
    ("llama", dict(rope_theta=50.0), False),
    ("llama", dict(rope_scaling=dict(rope_type="linear", factor=3.0)), False),
    ("llama", dict(rope_scaling=dict(rope_type="dynamic", factor=2.0),
                   max_position_embeddings=32), True),  # the default rope up to 32 positions
    ("llama", dict(rope_scaling=dict(rope_type="yarn", factor=4.0,
                                     original_max_position_embeddings=64)), False),
    ("llama", dict(rope_scaling=dict(rope_type="yarn", factor=8.0, beta_fast=16, beta_slow=2,
                                     mscale=1.0, mscale_all_dim=0.5, truncate=False,
                                     original_max_position_embeddings=32)), False),
    ("llama", dict(rope_scaling=dict(rope_type="yarn", factor=2.0, attention_factor=1.3,
                                     original_max_position_embeddings=100)), False),
    ("llama", dict(rope_scaling=dict(rope_type="longrope", original_max_position_embeddings=256,
                                     short_factor=[1.0 + 0.1 * i for i in range(8)],
                                     long_factor=[2.0] * 8)), False),
    ("llama", dict(rope_scaling=dict(rope_type="llama3", factor=4.0, low_freq_factor=2.0,
                                     high_freq_factor=8.0,
                                     original_max_position_embeddings=32)), False),
    ("llama", dict(attention_dropout=0.3, pretraining_tp=2, initializer_range=0.5), True),
    ("mistral", dict(sliding_window=3), False),
    ("mistral", dict(sliding_window=None), True),  # 4096 (the default) exceeds the sequence
    ("mistral", dict(head_dim=8, hidden_act="gelu"), False),
    ("qwen2", dict(use_sliding_window=True, sliding_window=3, max_window_layers=1), False),
    ("qwen2", dict(use_sliding_window=True, sliding_window=3, max_window_layers=0), False),
    ("qwen2", dict(use_sliding_window=True, sliding_window=3,
                   layer_types=["sliding_attention", "full_attention"]), False),
    ("qwen2", dict(max_window_layers=0, sliding_window=3), True),  # use_sliding_window false
    ("qwen2", dict(rope_scaling=dict(rope_type="yarn", factor=4.0,
                                     original_max_position_embeddings=64)), False),
    ("qwen3", dict(attention_bias=True), False),
    ("qwen3", dict(head_dim=8), False),
    ("qwen3", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1), False),
    ("qwen3", dict(rms_norm_eps=0.3), False),
    ("phi3", dict(partial_rotary_factor=0.5), False),
    ("phi3", dict(sliding_window=3), False),
    ("phi3", dict(rope_scaling=dict(type="longrope", **LONG6),
                  original_max_position_embeddings=256, partial_rotary_factor=0.75), False),
    ("phi3", dict(rope_scaling=dict(type="su", short_factor=[1.2] * 8, long_factor=[3.0] * 8,
                                    original_max_position_embeddings=128),
                  original_max_position_embeddings=256), False),  # the top-level 256 wins
    ("phi3", dict(rope_scaling=dict(type="longrope", short_factor=[1.2] * 8,
                                    long_factor=[3.0] * 8, attention_factor=0.7),
                  original_max_position_embeddings=128), False),
    ("phi3", dict(hidden_act="gelu_new", rms_norm_eps=0.2), False),
    ("phi3", dict(resid_pdrop=0.3, embd_pdrop=0.2), True),
    ("gemma2", dict(query_pre_attn_scalar=7), False),
    ("gemma2", dict(attn_logit_softcapping=None), False),
    ("gemma2", dict(final_logit_softcapping=None), False),
    ("gemma2", dict(attn_logit_softcapping=0.7, final_logit_softcapping=1.5), False),
    ("gemma2", dict(sliding_window=2), False),
    ("gemma2", dict(layer_types=["full_attention", "sliding_attention"]), False),
    ("gemma2", dict(hidden_activation="gelu"), False),
    ("gemma2", dict(tie_word_embeddings=False), False),
    ("gemma2", dict(attention_bias=True), False),
    ("gemma2", dict(rope_scaling=dict(rope_type="linear", factor=2.0)), False),
    ("gemma3_text", dict(rope_local_base_freq=50.0), False),
    ("gemma3_text", dict(rope_theta=1000.0), False),
    ("gemma3_text", dict(rope_scaling=dict(rope_type="linear", factor=4.0)), False),
    ("gemma3_text", dict(rope_scaling=dict(rope_type="yarn", factor=2.0,
                                           original_max_position_embeddings=64)), False),
    ("gemma3_text", dict(rope_parameters={
        "full_attention": dict(rope_type="linear", factor=3.0, rope_theta=500.0),
        "sliding_attention": dict(rope_type="linear", factor=0.5, rope_theta=20.0)}), False),
    ("gemma3_text", dict(sliding_window_pattern=3, num_hidden_layers=3), False),
    ("gemma3_text", dict(sliding_window=2, query_pre_attn_scalar=5), False),
    ("gemma3_text", dict(final_logit_softcapping=1.0), False),
    ("gemma3_text", dict(hidden_activation="silu"), False),
    # keys transformers' code for the family never reads: ignored, whatever their value (the
    # first four are the published SmolLM2 configs' and transformers' GGUF export's)
    ("llama", dict(unk_token_id=0, _model_name_or_path="x/y", is_llama_config=True,
                   rope_interleaved=False, foo=1), True),
    ("mistral", dict(attention_bias=True, mlp_bias=True), True),
    ("qwen2", dict(mlp_bias=True, rope_interleaved=True), True),
    ("phi3", dict(full_attn_mod=2, lm_head_bias=True, interpolate_factor=3), True),
    ("gemma2", dict(hidden_act="relu", sliding_window_size=99), True),
]

# (family, config.json overrides (written by hand: transformers may refuse some itself), the
# key and value the message must name)
REFUSED = [
    ("llama", dict(hidden_act="prelu"), "hidden_act", "prelu"),
    ("llama", dict(hidden_act="xielu"), "hidden_act", "xielu"),
    ("llama", dict(sliding_window=8), "sliding_window", 8),
    ("llama", dict(layer_types=["sliding_attention", "full_attention"]), "layer_types",
     ["sliding_attention", "full_attention"]),
    ("llama", dict(rope_parameters=dict(rope_type="default", rope_theta=1e4,
                                        partial_rotary_factor=0.5)),
     "partial_rotary_factor", 0.5),
    ("llama", dict(rope_scaling=dict(rope_type="proportional", rope_theta=1e4)), "rope_type",
     "proportional"),
    ("llama", dict(rope_scaling=dict(rope_type="linear")), "factor", "linear"),
    ("llama", dict(rope_scaling=dict(rope_type="default", mrope_section=[1, 2])),
     "mrope_section", "default"),
    ("llama", dict(quantization_config={"quant_method": "gptq", "bits": 4}),
     "quantization_config", {"quant_method": "gptq", "bits": 4}),
    ("llama", dict(pruned_heads={"0": [1]}), "pruned_heads", {"0": [1]}),
    ("llama", dict(model_type="gpt2"), "model_type", "gpt2"),
    # read by transformers (masking_utils, cache_utils), not implemented here
    ("llama", dict(attention_chunk_size=4), "attention_chunk_size", 4),
    ("llama", dict(mlp_layer_types=["sparse", "dense"]), "mlp_layer_types", ["sparse", "dense"]),
    ("qwen2", dict(attention_chunk_size=8), "attention_chunk_size", 8),
    ("llama", dict(model_type="gemma3"), "model_type", "gemma3"),
    ("llama", dict(original_max_position_embeddings=77,
                   rope_scaling=dict(rope_type="yarn", factor=2.0)),
     "original_max_position_embeddings", 77),
    ("mistral", dict(layer_types=["sliding_attention", "full_attention"]), "layer_types",
     ["sliding_attention", "full_attention"]),
    ("qwen2", dict(layer_types=["sliding_attention", "full_attention"]), "sliding_window",
     None),  # sliding layers, but use_sliding_window is false: no window
    ("qwen2", dict(layer_types=["full_attention"]), "layer_types", ["full_attention"]),
    ("qwen3", dict(head_dim=None), "head_dim", None),
    ("phi3", dict(rope_scaling=dict(type="linear", factor=2.0)), "rope_type", "linear"),
    ("phi3", dict(rope_scaling=dict(type="longrope", short_factor=[1.0] * 3,
                                    long_factor=[1.0] * 8)), "short_factor", [1.0] * 3),
    ("phi3", dict(partial_rotary_factor=0.5), "partial_rotary_factor", 0.5),  # vs the rope dict
    ("phi3", dict(rope_parameters=dict(rope_type="default", rope_theta=1e4,
                                       partial_rotary_factor=0.1)),
     "partial_rotary_factor", 0.1),  # 1.6 rotary dims
    ("gemma2", dict(use_bidirectional_attention=True), "use_bidirectional_attention", True),
    ("gemma2", dict(sliding_window=None), "sliding_window", None),
    ("gemma2", dict(final_logit_softcapping=0), "final_logit_softcapping", 0),
    ("gemma3_text", dict(attn_logit_softcapping=5.0), "attn_logit_softcapping", 5.0),
    ("gemma3_text", dict(use_bidirectional_attention=True), "use_bidirectional_attention",
     True),
    ("gemma3_text", dict(rope_parameters=dict(rope_type="default", rope_theta=1e4)),
     "rope_parameters", dict(rope_type="default", rope_theta=1e4)),
]


def _case_id(case):
    return f"{case[0]}-" + "-".join(f"{k}={v}" for k, v in case[1].items())[:60]


_BASE_LOGITS = {}


def build(family, overrides, path, seed=0):
    return make_hf_model((CLASSES[family], dict(TINY[family], **overrides)), seed=seed,
                         path=path)


def ids_for(n=24):
    return torch.randint(0, VOCAB, (2, n), generator=torch.Generator().manual_seed(7))


def assert_decodes_as(hf_logits, model, ids, start=5):
    """Our logits at every position (prefill of ``start`` tokens, then one token at a time)."""
    base = model.base
    n = ids.shape[1]
    one, zero = torch.ones(1, 1, dtype=torch.bool), torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        cache = base.new_cache(2, n)
        got = base.logits(base.prefill(ids[:, :start], torch.tensor([start] * 2,
                                                                    dtype=torch.int32), cache))
        torch.testing.assert_close(got, hf_logits[:, :start], atol=1e-4, rtol=1e-4)
        for t in range(start, n):
            got = base.logits(base.step(ids[:, t:t + 1], cache, one, zero))[:, 0]
            cache.seqlens += 1
            torch.testing.assert_close(got, hf_logits[:, t], atol=1e-4, rtol=1e-4,
                                       msg=f"position {t}")


def v4_layout(cfg: dict, keep_layer_types: bool) -> dict:
    """The config as hub checkpoints carry it: rope_theta / rope_scaling at the top level
    (Gemma-3: rope_local_base_freq), partial_rotary_factor at the top, layer_types derived
    (from use_sliding_window / max_window_layers / sliding_window_pattern)."""
    cfg = copy.deepcopy(cfg)
    if not keep_layer_types:
        cfg.pop("layer_types", None)
    if "_sliding_window_pattern" in cfg:
        cfg["sliding_window_pattern"] = cfg.pop("_sliding_window_pattern")
    rope = cfg.pop("rope_parameters", None)
    if cfg["model_type"] == "gemma3_text":
        full, local = rope["full_attention"], rope["sliding_attention"]
        if local.get("rope_type", "default") != "default":
            return None  # a local scaling has no v4 spelling
        cfg["rope_theta"], cfg["rope_local_base_freq"] = full.pop("rope_theta"), local["rope_theta"]
        rope = full
    else:
        cfg["rope_theta"] = rope.pop("rope_theta")
        if "partial_rotary_factor" in rope:
            cfg["partial_rotary_factor"] = rope.pop("partial_rotary_factor")
    if rope.get("rope_type", "default") != "default":
        cfg["rope_scaling"] = rope
    return cfg


@pytest.mark.parametrize("case", PARITY, ids=[_case_id(c) for c in PARITY])
def test_key_is_implemented_exactly(case, tmp_path):
    family, overrides, harmless = case
    hf = build(family, overrides, tmp_path)
    ids = ids_for()
    with torch.no_grad():
        ref = hf(ids).logits
    if family not in _BASE_LOGITS:
        with torch.no_grad():
            _BASE_LOGITS[family] = build(family, {}, None)(ids).logits
    base = _BASE_LOGITS[family]
    changed = ref.shape != base.shape or not torch.allclose(ref, base, atol=1e-4, rtol=1e-4)
    assert changed != harmless, "the value does not change transformers' logits" if not \
        harmless else "a 'harmless' value changes transformers' logits"
    assert_decodes_as(ref, load_model(tmp_path, dtype=torch.float32), ids)
    # the same checkpoint as the hub spells it
    v4 = v4_layout(json.loads((tmp_path / "config.json").read_text()),
                   keep_layer_types="layer_types" in overrides)
    if v4 is not None:
        (tmp_path / "config.json").write_text(json.dumps(v4))
        assert_decodes_as(ref, load_model(tmp_path, dtype=torch.float32), ids)


@pytest.fixture(scope="module")
def saved_configs(tmp_path_factory):
    """Each family's tiny config.json as save_pretrained writes it."""
    out = {}
    for family in CLASSES:
        path = tmp_path_factory.mktemp(family)
        CLASSES[family](**dict(TINY[family], vocab_size=VOCAB, hidden_size=64,
                               intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4)).save_pretrained(path)
        out[family] = json.loads((path / "config.json").read_text())
    return out


@pytest.mark.parametrize("case", REFUSED, ids=[_case_id(c) for c in REFUSED])
def test_key_is_refused_by_name(case, saved_configs, tmp_path):
    family, overrides, key, value = case
    cfg = dict(saved_configs[family], **overrides)
    if "rope_scaling" in overrides:
        cfg.pop("rope_parameters", None)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises((ValueError, TypeError)) as err:
        load_model(tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "config.json") in msg and key in msg and repr(value) in msg, msg


def test_dynamic_rope_beyond_max_position_embeddings_is_refused(tmp_path):
    build("llama", dict(rope_scaling=dict(rope_type="dynamic", factor=2.0),
                        max_position_embeddings=32), tmp_path)
    model = load_model(tmp_path, dtype=torch.float32)
    with pytest.raises(ValueError, match="dynamic.*max_position_embeddings = 32"):
        model.base.prefill(ids_for(8), torch.tensor([8, 8], dtype=torch.int32),
                           model.base.new_cache(2, 33))


def test_the_audit_accepts_exactly_the_activations_the_decoder_has():
    from medusa_kernels.model import ACTIVATIONS as IMPLEMENTED

    assert set(IMPLEMENTED) == set(ACTIVATIONS)


def test_every_key_transformers_writes_is_classified(saved_configs):
    """The full to_dict() of each family's config (every field, defaults included) passes the
    audit: no key of transformers' own classes is unknown to it."""
    for family, cls in CLASSES.items():
        full = cls(**dict(TINY[family], vocab_size=VOCAB, hidden_size=64,
                          intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4)).to_dict()
        audit(full)
        audit(saved_configs[family])


def test_defaults_are_transformers_defaults():
    """A config.json may leave keys out: their defaults must be transformers' own."""
    for family, cls in CLASSES.items():
        fields = {f.name: f.default for f in dataclasses.fields(cls)}
        for key, value in DEFAULTS[family].items():
            if key in fields:
                assert fields[key] == value, (family, key, fields[key], value)
            elif key == "rope_theta":
                theta = cls.default_theta
                assert (theta["global"] if isinstance(theta, dict) else theta) == value, family
            elif key == "rope_local_base_freq":
                assert cls.default_theta["local"] == value
            else:  # read from kwargs by __post_init__ / convert_rope_params_to_dict
                assert key in ("sliding_window_pattern", "partial_rotary_factor",
                               "head_dim"), (family, key)
        assert cls.model_type == family


DERIVED = {  # layer count, config kwargs whose layer types transformers derives
    "mistral": (3, dict(sliding_window=3)),
    "phi3": (3, dict(sliding_window=3)),
    "qwen2": (4, dict(use_sliding_window=True, sliding_window=3, max_window_layers=2)),
    "qwen3": (5, dict(use_sliding_window=True, sliding_window=3, max_window_layers=1)),
    "gemma2": (5, dict(sliding_window=3)),
    "gemma3_text": (7, dict(sliding_window=3, sliding_window_pattern=3)),
}


@pytest.mark.parametrize("family", sorted(DERIVED))
def test_derived_layer_types_match_transformers(family):
    """Configs that leave layer_types out (as hub configs do): windows per layer derived as
    transformers derives them."""
    layers, kwargs = DERIVED[family]
    hf = CLASSES[family](**dict(TINY[family], vocab_size=VOCAB, hidden_size=64,
                                intermediate_size=96, num_hidden_layers=layers,
                                num_attention_heads=4, **kwargs))
    cfg = {k: v for k, v in hf.to_dict().items() if k not in ("layer_types",
                                                              "_sliding_window_pattern")}
    cfg.update({k: v for k, v in kwargs.items() if k == "sliding_window_pattern"})
    windows = audit(cfg)["layer_windows"]
    types = getattr(hf, "layer_types", None) or ["sliding_attention"] * layers
    assert windows == tuple(3 if t == "sliding_attention" else None for t in types)
    assert len(set(windows)) == 2 or family in ("mistral", "phi3")  # both kinds occur


def test_config_values_of_the_wrong_type_or_range_are_refused_by_name():
    good = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=8,
                num_hidden_layers=1, num_attention_heads=2)
    assert audit(good)["num_layers"] == 1
    for key, value in [("rope_theta", -1.0), ("rope_theta", math.inf), ("rms_norm_eps", "1e-6"),
                       ("rms_norm_eps", -1e-6), ("vocab_size", 0), ("vocab_size", 10.0),
                       ("hidden_size", True), ("num_hidden_layers", 10**6),
                       ("num_attention_heads", None), ("num_key_value_heads", 3),
                       ("tie_word_embeddings", "yes"), ("attention_bias", 1),
                       ("hidden_act", ["silu"]), ("rope_scaling", "linear"),
                       ("max_position_embeddings", -5), ("head_dim", 0)]:
        with pytest.raises((TypeError, ValueError)) as err:
            audit(dict(good, **{key: value}))
        assert key in str(err.value) and repr(value) in str(err.value), (key, str(err.value))
    for bad in ([good], "llama", None, 3):
        with pytest.raises(TypeError, match="JSON object"):
            audit(bad)


_COMMON = dict(architectures=["X"], bos_token_id=1, eos_token_id=2, initializer_range=0.02,
               torch_dtype="bfloat16", transformers_version="4.45.0", use_cache=True)
HUB_STYLE = {  # key sets of published configs (as remembered; sizes shrunk, values kept)
    "llama-3.2": dict(_COMMON, model_type="llama", attention_bias=False, attention_dropout=0.0,
                      head_dim=64, hidden_act="silu", hidden_size=2048, intermediate_size=8192,
                      max_position_embeddings=131072, mlp_bias=False, num_attention_heads=32,
                      num_hidden_layers=16, num_key_value_heads=8, pretraining_tp=1,
                      rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
                      vocab_size=128256, rope_scaling=dict(
                          factor=32.0, high_freq_factor=4.0, low_freq_factor=1.0,
                          original_max_position_embeddings=8192, rope_type="llama3")),
    "mistral-7b-v0.1": dict(_COMMON, model_type="mistral", hidden_act="silu", hidden_size=4096,
                            intermediate_size=14336, max_position_embeddings=32768,
                            num_attention_heads=32, num_hidden_layers=32,
                            num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=10000.0,
                            sliding_window=4096, tie_word_embeddings=False, vocab_size=32000),
    "qwen2.5": dict(_COMMON, model_type="qwen2", attention_dropout=0.0, hidden_act="silu",
                    hidden_size=3584, intermediate_size=18944, max_position_embeddings=32768,
                    max_window_layers=28, num_attention_heads=28, num_hidden_layers=28,
                    num_key_value_heads=4, rms_norm_eps=1e-6, rope_scaling=None,
                    rope_theta=1000000.0, sliding_window=131072, tie_word_embeddings=False,
                    use_sliding_window=False, vocab_size=152064),
    "qwen3": dict(_COMMON, model_type="qwen3", attention_bias=False, attention_dropout=0.0,
                  head_dim=128, hidden_act="silu", hidden_size=4096, intermediate_size=12288,
                  max_position_embeddings=40960, max_window_layers=36, num_attention_heads=32,
                  num_hidden_layers=36, num_key_value_heads=8, rms_norm_eps=1e-6,
                  rope_scaling=None, rope_theta=1000000, sliding_window=None,
                  tie_word_embeddings=False, use_sliding_window=False, vocab_size=151936),
    "phi-3-mini-4k": dict(_COMMON, model_type="phi3", auto_map={"AutoConfig": "x"},
                          attention_dropout=0.0, embd_pdrop=0.0, hidden_act="silu",
                          hidden_size=3072, intermediate_size=8192, max_position_embeddings=4096,
                          num_attention_heads=32, num_hidden_layers=32, num_key_value_heads=32,
                          original_max_position_embeddings=4096, pad_token_id=32000,
                          resid_pdrop=0.0, rms_norm_eps=1e-5, rope_scaling=None,
                          rope_theta=10000.0, sliding_window=2047, tie_word_embeddings=False,
                          vocab_size=32064),
    "phi-4-mini": dict(_COMMON, model_type="phi3", attention_bias=False, attention_dropout=0.0,
                       embd_pdrop=0.0, full_attn_mod=1, hidden_act="silu", hidden_size=3072,
                       intermediate_size=8192, interpolate_factor=1, lm_head_bias=False,
                       max_position_embeddings=131072, mlp_bias=False, num_attention_heads=24,
                       num_hidden_layers=32, num_key_value_heads=8,
                       original_max_position_embeddings=4096, pad_token_id=199999,
                       partial_rotary_factor=0.75, resid_pdrop=0.0, rms_norm_eps=1e-5,
                       rope_theta=10000.0, sliding_window=262144, tie_word_embeddings=True,
                       vocab_size=200064, rope_scaling=dict(
                           type="longrope", long_factor=[1.0 + i for i in range(48)],
                           short_factor=[1.0] * 48)),
    "gemma-2-2b": dict(_COMMON, model_type="gemma2", attention_bias=False, attention_dropout=0.0,
                       attn_logit_softcapping=50.0, cache_implementation="hybrid",
                       final_logit_softcapping=30.0, head_dim=256, hidden_act="gelu_pytorch_tanh",
                       hidden_activation="gelu_pytorch_tanh", hidden_size=2304,
                       intermediate_size=9216, max_position_embeddings=8192,
                       num_attention_heads=8, num_hidden_layers=26, num_key_value_heads=4,
                       pad_token_id=0, query_pre_attn_scalar=256, rms_norm_eps=1e-6,
                       rope_theta=10000.0, sliding_window=4096, sliding_window_size=4096,
                       vocab_size=256000),
    "gemma-3-1b": dict(_COMMON, model_type="gemma3_text", attention_bias=False,
                       attention_dropout=0.0, attn_logit_softcapping=None,
                       cache_implementation="hybrid", final_logit_softcapping=None,
                       head_dim=256, hidden_activation="gelu_pytorch_tanh", hidden_size=1152,
                       intermediate_size=6912, max_position_embeddings=32768,
                       num_attention_heads=4, num_hidden_layers=26, num_key_value_heads=1,
                       pad_token_id=0, query_pre_attn_scalar=256, rms_norm_eps=1e-6,
                       rope_local_base_freq=10000, rope_scaling=None, rope_theta=1000000,
                       sliding_window=512, sliding_window_pattern=6, vocab_size=262144),
}


@pytest.mark.parametrize("name", sorted(HUB_STYLE))
def test_hub_style_configs_pass_the_audit(name):
    """The keys published configs carry are all classified (none refused as unknown), and
    transformers reads the same layer layout from them."""
    cfg = HUB_STYLE[name]
    kw = audit(cfg)
    hf = CLASSES[cfg["model_type"]](**{k: v for k, v in cfg.items() if k != "model_type"})
    types = getattr(hf, "layer_types", None)
    windows = kw["layer_windows"] or (None,) * kw["num_layers"]
    if types is not None:
        assert [w is not None for w in windows] == [t == "sliding_attention" for t in types]
    assert kw["head_dim"] == (getattr(hf, "head_dim", None)
                              or hf.hidden_size // hf.num_attention_heads)
    assert kw["num_kv_heads"] == hf.num_key_value_heads


# --- the "reads" table: re-derived from the installed transformers ---------------------------

_FAMILY_DIRS = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
                "phi3": "phi3", "gemma2": "gemma2", "gemma3_text": "gemma3"}
_SHARED = ("modeling_rope_utils.py", "masking_utils.py", "cache_utils.py",
           "configuration_utils.py")
_CONFIG_READ = re.compile(r"""\w*config\.(\w+)\b(?!\s*\()"""
                          r"""|getattr\(\s*[\w.]*config\s*,\s*["'](\w+)["']""")
_SELF_READ = re.compile(r"""self\.(\w+)\b(?!\s*\()(?!\s*=[^=])"""
                        r"""|getattr\(\s*self\s*,\s*["'](\w+)["']""")


def transformers_reads(family: str) -> set[str]:
    """The config attributes transformers' code for ``family`` reads: ``config.X`` /
    ``getattr(config, "X")`` in its modeling file and the shared utilities, ``self.X`` in its
    configuration class and the shared config / rope code."""
    root = pathlib.Path(transformers.__file__).parent
    d = _FAMILY_DIRS[family]
    out = set()
    for path in (root / "models" / d / f"modeling_{d}.py", *(root / f for f in _SHARED)):
        out |= {a or b for a, b in _CONFIG_READ.findall(path.read_text())}
    for path in (root / "models" / d / f"configuration_{d}.py", root / "modeling_rope_utils.py",
                 root / "configuration_utils.py"):
        out |= {a or b for a, b in _SELF_READ.findall(path.read_text())}
    return {k for k in out if not k.startswith("__")}


@pytest.mark.parametrize("family", sorted(READS))
def test_reads_table_is_what_the_installed_transformers_reads(family):
    """hf_config.READS[family] is derived from transformers' code: a transformers that starts
    (or stops) reading a key fails here, naming it, before a checkpoint loads silently wrong."""
    derived = transformers_reads(family)
    assert derived == set(READS[family]), (
        f"{family}: transformers {transformers.__version__} reads "
        f"{sorted(derived - READS[family])} that hf_config.READS lacks, and no longer reads "
        f"{sorted(READS[family] - derived)}")


def test_every_ignored_key_is_one_transformers_reads():
    """A key transformers never reads needs no value check (it is ignored): IGNORED holds only
    keys the family's code reads."""
    for family, keys in IGNORED.items():
        assert set(keys) <= READS[family], (family, sorted(set(keys) - READS[family]))


def test_published_smollm2_keys_are_accepted_and_math_keys_refused(saved_configs):
    cfg = dict(saved_configs["llama"], unk_token_id=0, _model_name_or_path="HuggingFaceTB/x",
               is_llama_config=True, rope_interleaved=False)
    assert audit(cfg) == audit(saved_configs["llama"])
    for key, value in (("attention_chunk_size", 8), ("sliding_window", 16),
                       ("kv_sharing_modes", ["shared"]), ("num_mtp_layers", 1)):
        with pytest.raises((TypeError, ValueError), match=f"{key} = {re.escape(repr(value))}"):
            audit(dict(cfg, **{key: value}))


@pytest.mark.parametrize("key", ["num_attention_heads", "vocab_size", "hidden_size",
                                 "intermediate_size", "num_key_value_heads"])
def test_a_missing_size_key_is_named_with_the_default_taken(key, tmp_path):
    """config.json without a size key takes transformers' default (as transformers does); when
    the weights do not fit it, the error names the missing key and the default, not a shape."""
    build("llama", {}, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg[key]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    default = DEFAULTS["llama"][key]
    with pytest.raises(ValueError) as err:
        load_model(tmp_path)
    msg = str(err.value)
    assert msg.startswith(f"{tmp_path / 'config.json'}: config.json has no {key} "
                          f"(transformers' llama default {default!r} taken)"), msg
