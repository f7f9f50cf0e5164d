"""The decoder matches transformers (the peer) in fp32: prefill, step-by-step decode, greedy."""

import json

import pytest
import torch
from tiny_models import ARCHS, VOCAB, make_hf_model

from medusa_kernels import generate, load_model


@pytest.fixture(scope="module", params=sorted(ARCHS))
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = make_hf_model(request.param, path=path)
    return hf, load_model(path, dtype=torch.float32)


def test_prefill_logits_match(pair):
    hf, ours = pair
    ids = torch.randint(0, VOCAB, (2, 13))
    with torch.no_grad():
        ref = hf(ids).logits
        cache = ours.base.new_cache(2, 16)
        got = ours.base.logits(ours.base.prefill(ids, torch.tensor([13, 13], dtype=torch.int32), cache))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_step_by_step_decode_matches_full_forward(pair):
    hf, ours = pair
    ids = torch.randint(0, VOCAB, (2, 20))
    base = ours.base
    one = torch.ones(1, 1, dtype=torch.bool)
    zero = torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        ref = hf(ids).logits
        cache = base.new_cache(2, 24)
        base.prefill(ids[:, :5], torch.tensor([5, 5], dtype=torch.int32), cache)
        for t in range(5, 20):
            got = base.logits(base.step(ids[:, t : t + 1], cache, one, zero))[:, 0]
            cache.seqlens += 1
            torch.testing.assert_close(got, ref[:, t], atol=1e-4, rtol=1e-4)


def test_plain_greedy_equals_transformers_generate(pair):
    hf, ours = pair
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (1, 9))
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                      do_sample=False, eos_token_id=None, pad_token_id=0)
    got = generate(ours, ids, max_new_tokens=24, medusa=False)
    assert got.tokens[0] == ref[0, 9:].tolist()


def test_sharded_checkpoint_loads(tmp_path):
    hf = make_hf_model("llama-mha", path=tmp_path, max_shard_size="60KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ours = load_model(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (1, 7))
    with torch.no_grad():
        cache = ours.base.new_cache(1, 8)
        got = ours.base.logits(ours.base.prefill(ids, torch.tensor([7], dtype=torch.int32), cache))
        torch.testing.assert_close(got, hf(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_close_to_fp32(tmp_path, dtype):
    make_hf_model("llama-gqa-llama3rope", path=tmp_path)
    full = load_model(tmp_path, dtype=torch.float32)
    half = load_model(tmp_path, dtype=dtype)
    ids = torch.randint(0, VOCAB, (1, 11))
    lens = torch.tensor([11], dtype=torch.int32)
    with torch.no_grad():
        ref = full.base.logits(full.base.prefill(ids, lens, full.base.new_cache(1, 12)))
        got = half.base.logits(half.base.prefill(ids, lens, half.base.new_cache(1, 12)))
    assert got.dtype == dtype
    assert (got.float() - ref).abs().max() < 0.05 * ref.abs().max()
