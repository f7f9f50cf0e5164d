"""Self-distillation that keeps the greedy decoder's hidden states (``save_hidden``): the same
replies as ``generate``, and the states the heads train on are the backbone's own."""

import random

import pytest
import torch
from tiny_models import VOCAB, make_hf_model

from medusa_kernels import generate, load_model
from medusa_kernels.training import load_dataset
from medusa_kernels.training.distill import (
    DistillConfig,
    greedy_with_hidden,
    load_hidden,
    self_distill,
)
from medusa_kernels.training.objectives import causal_hidden


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    make_hf_model("llama-gqa-llama3rope", seed=5, path=path)
    return str(path)


def _prompts(n, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(rng.randint(1, 9))] for _ in range(n)]


@pytest.mark.parametrize("eos", [None, "frequent"])
def test_greedy_with_hidden_matches_generate_and_teacher_forcing(base_dir, eos):
    model = load_model(base_dir)
    prompts = _prompts(7)
    if eos == "frequent":  # a token the greedy replies hit, so rows finish at different steps
        free = generate(model, prompts, max_new_tokens=24, medusa=False, eos_token_id=[]).tokens
        counts = torch.bincount(torch.tensor([t for r in free for t in r[3:]]), minlength=VOCAB)
        eos = int(counts.argmax())
    ref = generate(model, prompts, max_new_tokens=24, medusa=False,
                   eos_token_id=[] if eos is None else eos).tokens
    tokens, hidden = greedy_with_hidden(model.base, prompts, 24, eos)
    assert tokens == ref
    if eos is not None:
        assert len({len(t) for t in tokens}) > 1  # some rows left the batch early
    for p, t, h in zip(prompts, tokens, hidden, strict=True):
        assert h.dtype == torch.float16 and h.shape == (len(t), model.base.cfg.hidden_size)
        forced = causal_hidden(model.base, torch.tensor(p + t)[None])[0, len(p) - 1:-1]
        torch.testing.assert_close(h.float(), forced.half().float(), atol=2e-3, rtol=2e-3)
        # row j chose reply token j
        assert model.base.greedy(forced).tolist() == t


def test_self_distill_saves_hidden_for_every_sample_and_resumes(base_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(f"{p}\n" for p in _prompts(11, seed=1)))
    out = str(tmp_path / "data")
    cfg = DistillConfig(base_dir, str(prompts), out, max_new_tokens=10, batch_size=4,
                        progress=False, device="cpu", save_hidden=True)
    self_distill(cfg)
    samples, meta = load_dataset(out)
    hidden = load_hidden(out)
    assert meta["save_hidden"] is True and sorted(hidden) == [s.index for s in samples]
    assert len(samples) == 11
    for s in samples:
        assert hidden[s.index].shape[0] == len(s) - s.prompt_len
    self_distill(cfg)  # a finished dataset resumes to itself
    assert len(load_dataset(out)[0]) == 11 and len(load_hidden(out)) == 11


def test_save_hidden_refuses_sampling(base_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("[1, 2, 3]\n")
    cfg = DistillConfig(base_dir, str(prompts), str(tmp_path / "d"), max_new_tokens=4,
                        temperature=0.7, progress=False, device="cpu", save_hidden=True)
    with pytest.raises(ValueError, match="save_hidden needs greedy"):
        self_distill(cfg)
