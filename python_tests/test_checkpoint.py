"""Medusa heads layouts (heads-only and inside the base model) and load_model's checks: the
config against the tensors, file errors naming the file, heads tensors."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import VOCAB, make_hf_model, save_random_heads

from medusa_kernels import MedusaHeads, load_medusa_heads, load_model, save_medusa_heads
from medusa_kernels.checkpoint import heads_state_dict


def public_state(num_heads, num_layers, d=64, vocab=VOCAB):
    """A heads state dict written by hand with the Medusa repo's key names."""
    state = {}
    for h in range(num_heads):
        for i in range(num_layers):
            state[f"{h}.{i}.linear.weight"] = torch.randn(d, d)
            state[f"{h}.{i}.linear.bias"] = torch.randn(d)
        state[f"{h}.{num_layers}.weight"] = torch.randn(vocab, d)
    return state


def assert_heads_equal(heads, state):
    for key, value in heads_state_dict(heads).items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


@pytest.mark.parametrize("num_layers", [1, 2])
def test_round_trip(tmp_path, num_layers):
    heads = MedusaHeads(3, num_layers, 64, VOCAB)
    torch.nn.init.normal_(heads.w1)
    save_medusa_heads(heads, tmp_path, "some/base")
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["medusa_num_heads"], config["medusa_num_layers"]) == (3, num_layers)
    assert config["base_model_name_or_path"] == "some/base"
    loaded = load_medusa_heads(tmp_path, dtype=torch.float32)
    assert_heads_equal(loaded, heads_state_dict(heads))
    assert sorted(load_file(tmp_path / "medusa_lm_head.safetensors")) == sorted(
        heads_state_dict(heads)
    )


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_heads_only_layout_written_by_hand(tmp_path, fmt):
    state = public_state(4, 1)
    (tmp_path / "config.json").write_text(json.dumps(
        {"medusa_num_heads": 4, "medusa_num_layers": 1, "base_model_name_or_path": "x"}))
    if fmt == "pt":
        torch.save(state, tmp_path / "medusa_lm_head.pt")
    else:
        save_file(state, tmp_path / "medusa_lm_head.safetensors")
    heads = load_medusa_heads(tmp_path, dtype=torch.float32)
    assert (heads.num_heads, heads.num_layers) == (4, 1)
    assert_heads_equal(heads, state)


def test_heads_inside_the_base_model(tmp_path):
    make_hf_model("llama-mha", path=tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    state = public_state(2, 1)
    weights.update({f"medusa_head.{k}": v for k, v in state.items()})
    save_file(weights, tmp_path / "model.safetensors")
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(medusa_num_heads=2, medusa_num_layers=1)
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = load_model(tmp_path, dtype=torch.float32)  # heads found in the base dir
    assert model.heads is not None and model.heads.num_heads == 2
    assert_heads_equal(model.heads, state)


def test_config_claiming_more_heads_than_the_file_holds(tmp_path):
    save_file(public_state(2, 1), tmp_path / "medusa_lm_head.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"medusa_num_heads": 5,
                                                      "medusa_num_layers": 1}))
    with pytest.raises(ValueError, match="medusa_num_heads = 5 but the weights hold heads"):
        load_medusa_heads(tmp_path)


def test_heads_that_do_not_fit_the_base_model(tmp_path):
    make_hf_model("llama-mha", path=tmp_path / "base")
    save_random_heads(tmp_path / "heads", d=32)
    with pytest.raises(ValueError, match="heads are d=32"):
        load_model(tmp_path / "base", medusa=tmp_path / "heads")


def test_missing_weights_are_reported(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no Medusa heads"):
        load_medusa_heads(tmp_path)


def test_fresh_heads_predict_what_the_base_predicts(tmp_path):
    make_hf_model("llama-mha", path=tmp_path)
    model = load_model(tmp_path, dtype=torch.float32)
    heads = MedusaHeads(3, 1, 64, VOCAB)
    heads.init_from_lm_head(model.base.lm_head.weight)
    hidden = torch.randn(5, 64)
    _, top = heads.topk(hidden, 1)
    assert (top[:, :, 0] == model.base.logits(hidden).argmax(-1)[:, None]).all()


def test_tied_embeddings_stay_one_tensor(tmp_path):
    make_hf_model("qwen2", path=tmp_path)  # tie_word_embeddings=True
    base = load_model(tmp_path, dtype=torch.float32).base
    assert base.lm_head.weight is base.embed.weight


# ----------------------------------------------------------------------------- loader validation


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A tiny Llama checkpoint, sharded (3 shards) and not; tests copy it."""
    root = tmp_path_factory.mktemp("pristine")
    make_hf_model("llama-gqa-llama3rope", path=root / "single")
    make_hf_model("llama-gqa-llama3rope", path=root / "sharded", max_shard_size="40KB")
    return root


@pytest.fixture
def ckpt(pristine, tmp_path):
    shutil.copytree(pristine / "single", tmp_path / "m")
    return tmp_path / "m"


@pytest.fixture
def sharded(pristine, tmp_path):
    shutil.copytree(pristine / "sharded", tmp_path / "s")
    return tmp_path / "s"


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def edit_weights(path, drop=(), add=None):
    weights = load_file(path / "model.safetensors")
    for name in drop:
        del weights[name]
    weights.update(add or {})
    save_file(weights, path / "model.safetensors")


def test_layout_b_heads_are_found_by_their_tensors(ckpt):
    state = public_state(3, 1)
    edit_weights(ckpt, add={f"medusa_head.{k}": v for k, v in state.items()})
    model = load_model(ckpt, dtype=torch.float32)  # no medusa_num_heads in config.json
    assert model.heads is not None and model.heads.num_heads == 3
    assert_heads_equal(model.heads, state)


def test_layout_b_config_claims_heads_the_weights_lack(ckpt):
    edit_config(ckpt, medusa_num_heads=2, medusa_num_layers=1)
    with pytest.raises(FileNotFoundError, match="no Medusa heads"):
        load_model(ckpt)


@pytest.mark.parametrize("layers,word", [(1, "drop"), (3, "invent")])
def test_config_layer_count_must_match_the_checkpoint(ckpt, layers, word):
    edit_config(ckpt, num_hidden_layers=layers)
    with pytest.raises(ValueError, match=f"num_hidden_layers = {layers} but the checkpoint "
                                         f"holds 2 layers.*{word}"):
        load_model(ckpt)


@pytest.mark.parametrize("key,value", [
    ("rope_theta", -10000.0), ("rms_norm_eps", "1e-6"), ("vocab_size", None),
    ("hidden_size", 64.0), ("num_attention_heads", True), ("num_hidden_layers", 0),
    ("intermediate_size", -96), ("max_position_embeddings", "512"), ("rope_scaling", [1, 2]),
    ("tie_word_embeddings", 0), ("hidden_act", None), ("head_dim", "16"),
])
def test_config_types_and_ranges_are_refused_by_name(ckpt, key, value):
    edit_config(ckpt, **{key: value})
    with pytest.raises((TypeError, ValueError)) as err:
        load_model(ckpt)
    msg = str(err.value)
    assert str(ckpt / "config.json") in msg and key in msg and repr(value) in msg, msg


@pytest.mark.parametrize("text,error", [("[1, 2]", TypeError), ('"llama"', TypeError),
                                        ("{not json", ValueError), ("", ValueError),
                                        ("\xff\xfe", ValueError)])
def test_config_json_that_is_not_an_object(ckpt, text, error):
    (ckpt / "config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(error, match=str(ckpt / "config.json")):
        load_model(ckpt)


def test_config_weight_shape_mismatch_names_tensor_and_shapes(ckpt):
    edit_config(ckpt, intermediate_size=100)
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.gate_proj.weight .* has shape "
                                         r"\[96, 64\], config.json implies \[100, 64\]"):
        load_model(ckpt)


def test_missing_tensor_is_named_with_its_shape(ckpt):
    edit_weights(ckpt, drop=["model.layers.1.self_attn.k_proj.weight"])
    with pytest.raises(ValueError, match=r"missing: model.layers.1.self_attn.k_proj.weight "
                                         r"\[32, 64\]"):
        load_model(ckpt)


def test_every_tensor_is_used_or_explained(ckpt):
    edit_weights(ckpt, add={"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)})
    with pytest.raises(ValueError, match="does not use: model.layers.0.self_attn.q_proj.bias"):
        load_model(ckpt)
    # an old checkpoint's saved RoPE buffer is explained: it loads
    edit_weights(ckpt, drop=["model.layers.0.self_attn.q_proj.bias"],
                 add={"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)})
    load_model(ckpt)


def test_tied_lm_head_must_equal_the_embedding(tmp_path):
    make_hf_model("qwen2", path=tmp_path)  # tied: save_pretrained writes no lm_head
    weights = load_file(tmp_path / "model.safetensors")
    edit_weights(tmp_path, add={"lm_head.weight": weights["model.embed_tokens.weight"].clone()})
    load_model(tmp_path)  # the same values: fine
    edit_weights(tmp_path, add={"lm_head.weight": torch.randn(VOCAB, 64)})
    with pytest.raises(ValueError, match="lm_head.weight differs from model.embed_tokens"):
        load_model(tmp_path)


def test_integer_weights_are_refused(ckpt):
    edit_weights(ckpt, add={"model.norm.weight": torch.ones(64, dtype=torch.int8)})
    with pytest.raises(ValueError, match="model.norm.weight .* dtype I8"):
        load_model(ckpt)


@pytest.mark.parametrize("cut", [8, 100, -50])
def test_truncated_safetensors_names_the_file(sharded, cut):
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[:cut] if cut > 0 else data[:cut])
    with pytest.raises(ValueError, match=f"{shard}: not a readable safetensors file"):
        load_model(sharded)


def test_corrupt_header_names_the_file(ckpt):
    path = ckpt / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:20] = b"#" * 12  # the JSON header
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{path}: not a readable safetensors file"):
        load_model(ckpt)


@pytest.mark.parametrize("index,error,match", [
    ("{oops", ValueError, "not valid JSON"),
    ("[]", TypeError, "JSON object"),
    ('{"weight_map": []}', ValueError, "weight_map"),
    ('{"weight_map": {"a": "../model.safetensors"}}', FileNotFoundError, "not a file"),
    ('{"weight_map": {"model.norm.weight": "nowhere.safetensors"}}', FileNotFoundError,
     "nowhere.safetensors"),
])
def test_malformed_index_names_the_file(sharded, index, error, match):
    path = sharded / "model.safetensors.index.json"
    path.write_text(index)
    with pytest.raises(error, match=match) as err:
        load_model(sharded)
    assert str(path) in str(err.value)


def test_index_that_disagrees_with_its_shards(sharded):
    path = sharded / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    first, second = sorted(set(index["weight_map"].values()))[:2]
    moved = next(n for n, f in index["weight_map"].items() if f == first)
    index["weight_map"][moved] = second
    path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"{path}: weight_map disagrees.*{moved}"):
        load_model(sharded)


def test_no_weights_or_no_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        load_model(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_model(tmp_path)


def test_heads_tensors_are_checked(tmp_path):
    cases = [  # (state change, config, message)
        (dict(extra={"foo": torch.zeros(1)}), 2, "'foo' is not a Medusa head tensor"),
        (dict(extra={"2.0.linear.weight": torch.zeros(64, 64)}), 2, "medusa_num_heads = 2"),
        (dict(extra={"0.1.linear.weight": torch.zeros(64, 64)}), 2, "unexpected"),
        (dict(drop=["1.0.linear.bias"]), 2, "missing.*1.0.linear.bias"),
        (dict(extra={"1.0.linear.weight": torch.zeros(64, 32)}), 2,
         r"1.0.linear.weight has shape \[64, 32\], expected \[64, 64\]"),
        (dict(extra={"1.1.weight": torch.zeros(VOCAB, 32)}), 2, r"1.1.weight has shape"),
        (dict(), 0, r"medusa_num_heads = 0 must be an int in \[1, 1024\]"),
    ]
    for i, (change, num_heads, match) in enumerate(cases):
        path = tmp_path / str(i)
        path.mkdir()
        state = public_state(2, 1)
        for k in change.get("drop", ()):
            del state[k]
        state.update(change.get("extra", {}))
        save_file(state, path / "medusa_lm_head.safetensors")
        (path / "config.json").write_text(json.dumps({"medusa_num_heads": num_heads,
                                                      "medusa_num_layers": 1}))
        with pytest.raises(ValueError, match=match):
            load_medusa_heads(path)


@pytest.mark.parametrize("content", [b"", b"garbage", b"PK\x03\x04broken"])
def test_corrupt_heads_files_name_the_file(tmp_path, content):
    (tmp_path / "medusa_lm_head.pt").write_bytes(content)
    with pytest.raises(ValueError, match=f"{tmp_path / 'medusa_lm_head.pt'}: not a readable"):
        load_medusa_heads(tmp_path)
    (tmp_path / "medusa_lm_head.safetensors").write_bytes(content)
    with pytest.raises(ValueError, match=f"{tmp_path / 'medusa_lm_head.safetensors'}: not a"):
        load_medusa_heads(tmp_path)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(base_dir=123), TypeError, r"base_dir must be a directory path .* got int 123"),
    (dict(base_dir=None), TypeError, r"base_dir must be a directory path"),
    (dict(medusa=5), TypeError, r"medusa must be a directory path .* got int 5"),
    (dict(dtype="f16"), ValueError, r"dtype must be one of .* got 'f16'"),
    (dict(dtype=torch.int32), TypeError, r"dtype must be None, a floating torch.dtype"),
    (dict(device="gpu"), ValueError, r"device must be a torch.device or a name .* got 'gpu'"),
], ids=["base_dir-int", "base_dir-none", "medusa-int", "dtype-name", "dtype-int", "device-name"])
def test_load_model_arguments_are_checked_up_front(kwargs, error, match):
    from medusa_kernels.demo import path as demo_path

    base, _ = demo_path()
    with pytest.raises(error, match=match):
        load_model(**{"base_dir": base, **kwargs})


def test_load_model_takes_dtype_names():
    from medusa_kernels.demo import path as demo_path

    base, heads = demo_path()
    assert load_model(base, medusa=heads, dtype="bf16").dtype == torch.bfloat16
