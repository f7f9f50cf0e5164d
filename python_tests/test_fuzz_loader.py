"""Loader fuzz (hypothesis, bounded): malformed checkpoints are answered with a ValueError,
TypeError or FileNotFoundError that names the file (or, for the config audit alone, the key),
never with another exception type, a crash or a hang.

Mutations of a valid sharded checkpoint with layout (a) heads: config.json values set to any
JSON value or deleted, config.json replaced by arbitrary bytes, shards truncated or with bytes
flipped (header or data), the shard index replaced or a shard removed, the heads' config or
file broken. A mutation that leaves a loadable checkpoint (a flipped data byte) may load."""

import json
import os
import shutil
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import make_hf_model, save_random_heads

from medusa_kernels import load_model
from medusa_kernels.hf_config import audit

ANSWERS = (ValueError, TypeError, FileNotFoundError)
KEYS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
        "rope_parameters", "rope_scaling", "rope_theta", "max_position_embeddings",
        "tie_word_embeddings", "hidden_act", "attention_bias", "mlp_bias", "model_type",
        "sliding_window", "layer_types", "partial_rotary_factor", "torch_dtype", "foo"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=6)
    | st.sampled_from([0, 1, 2, 16, 64, 101, 4096, 2**31, "llama", "qwen3", "gemma2", "silu",
                       {"rope_type": "yarn", "factor": 2.0}, ["sliding_attention"] * 2]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=6,
)
mutations = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(KEYS), json_values),
    st.tuples(st.just("delete"), st.sampled_from(KEYS)),
    st.tuples(st.just("config_bytes"), st.binary(max_size=40)),
    st.tuples(st.just("truncate"), st.integers(0, 2**20)),
    st.tuples(st.just("flip"), st.integers(0, 2**20), st.integers(1, 255), st.booleans()),
    st.tuples(st.just("index"), json_values),
    st.tuples(st.just("remove_shard"), st.integers(0, 10)),
    st.tuples(st.just("heads_config"), st.sampled_from(["medusa_num_heads",
                                                        "medusa_num_layers"]), json_values),
    st.tuples(st.just("heads_bytes"), st.binary(max_size=40)),
)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    make_hf_model("llama-gqa-llama3rope", path=root / "base", max_shard_size="40KB")
    save_random_heads(root / "heads", num_heads=2)
    load_model(root / "base", medusa=root / "heads")  # loads before it is broken
    return root


def _shards(base):
    return sorted(f for f in os.listdir(base) if f.endswith(".safetensors"))


def _json_dict(path):
    try:
        cfg = json.loads(open(path, "rb").read())
    except ValueError:
        return None
    return cfg if isinstance(cfg, dict) else None


def apply(root, mutation):
    base, heads = os.path.join(root, "base"), os.path.join(root, "heads")
    kind, *args = mutation
    config = os.path.join(base, "config.json")
    if kind in ("set", "delete"):
        cfg = _json_dict(config)
        if cfg is None:  # an earlier mutation replaced it already
            return
        if kind == "set":
            cfg[args[0]] = args[1]
        else:
            cfg.pop(args[0], None)
        with open(config, "w") as f:
            json.dump(cfg, f)
    elif kind == "config_bytes":
        open(config, "wb").write(args[0])
    elif kind in ("truncate", "flip"):
        shards = _shards(base)
        path = os.path.join(base, shards[args[0] % len(shards)])
        data = bytearray(open(path, "rb").read())
        if not data:
            return
        if kind == "truncate":
            data = data[: args[0] % len(data)]
        else:  # the header (its first 300 bytes) or anywhere
            at = args[0] % (min(300, len(data)) if args[2] else len(data))
            data[at] ^= args[1]
        open(path, "wb").write(bytes(data))
    elif kind == "index":
        with open(os.path.join(base, "model.safetensors.index.json"), "w") as f:
            json.dump(args[0], f)
    elif kind == "remove_shard":
        shards = _shards(base)
        os.remove(os.path.join(base, shards[args[0] % len(shards)]))
    elif kind == "heads_config":
        path = os.path.join(heads, "config.json")
        cfg = _json_dict(path)
        cfg[args[0]] = args[1]
        with open(path, "w") as f:
            json.dump(cfg, f)
    elif kind == "heads_bytes":
        open(os.path.join(heads, "medusa_lm_head.safetensors"), "wb").write(args[0])


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 40)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow],
          derandomize=not os.environ.get("FUZZ_EXAMPLES"), database=None)
@given(changes=st.lists(mutations, min_size=1, max_size=3))
def test_malformed_checkpoints_get_a_clear_error(pristine, changes):
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(pristine, tmp, dirs_exist_ok=True)
        for change in changes:
            apply(tmp, change)
        try:
            model = load_model(os.path.join(tmp, "base"), medusa=os.path.join(tmp, "heads"),
                               dtype=torch.float32)
        except ANSWERS as e:
            assert tmp in str(e), f"{type(e).__name__}: {e}"
        else:  # what loaded is a whole model
            assert model.heads is not None and model.base.cfg.num_layers == 2


GOOD = [  # valid configs of several families, each with a rope scaling
    dict(model_type="qwen3", vocab_size=16, hidden_size=8, intermediate_size=8,
         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=4,
         use_sliding_window=True, sliding_window=3, max_window_layers=1,
         rope_parameters=dict(rope_type="yarn", factor=2.0, rope_theta=100.0,
                              original_max_position_embeddings=32)),
    dict(model_type="gemma3_text", vocab_size=16, hidden_size=8, intermediate_size=8,
         num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=4,
         sliding_window=3, sliding_window_pattern=2, rope_scaling=dict(rope_type="linear",
                                                                       factor=2.0)),
    dict(model_type="phi3", vocab_size=16, hidden_size=16, intermediate_size=8,
         num_hidden_layers=2, num_attention_heads=2, partial_rotary_factor=0.5,
         original_max_position_embeddings=8, rope_scaling=dict(
             type="longrope", short_factor=[1.0, 1.5], long_factor=[2.0, 3.0])),
]


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 300)), deadline=None,
          derandomize=not os.environ.get("FUZZ_EXAMPLES"), database=None)
@given(good=st.sampled_from(GOOD),
       changes=st.dictionaries(st.sampled_from(KEYS + ["use_sliding_window", "max_window_layers",
                                                      "sliding_window_pattern",
                                                      "rope_local_base_freq",
                                                      "original_max_position_embeddings",
                                                      "final_logit_softcapping"]),
                               json_values, min_size=1, max_size=3))
def test_audit_answers_any_value_with_an_error_naming_a_key(good, changes):
    for key in GOOD[0], GOOD[1], GOOD[2]:
        audit(key)  # the unchanged configs are valid
    cfg = dict(good, **changes)
    try:
        kwargs = audit(cfg)
    except (ValueError, TypeError) as e:
        assert any(key in str(e) for key in cfg), str(e)
    else:
        assert kwargs["num_layers"] >= 1 and kwargs["head_dim"] >= 1
