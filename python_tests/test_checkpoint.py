"""Medusa heads layouts (heads-only and inside the base model) and load_model's checks."""

import json

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
