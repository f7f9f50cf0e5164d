"""Training: causal forward, label shift, fresh heads, resumable self-distillation, Medusa-1
(frozen backbone, loss falls, saved heads decode), Medusa-2 (KL 0 at step 0, backbone moves,
saved base loads), 2-process DDP == 1 process."""

import glob
import json
import os
import random
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import VOCAB, make_hf_model

from medusa_kernels import MedusaHeads, generate, load_model
from medusa_kernels import train as train_cli
from medusa_kernels.checkpoint import load_base_model, read_json
from medusa_kernels.training import (
    DistillConfig,
    Sample,
    TrainConfig,
    causal_hidden,
    collate,
    head_logits,
    kl_sum,
    load_dataset,
    lr_factor,
    pack,
    ramp,
    self_distill,
    shifted_targets,
    topk_kl_sum,
    train,
)
from medusa_kernels.training import distill as distill_mod

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    make_hf_model("llama-gqa-llama3rope", seed=3, path=path)
    return str(path)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    with open(path, "w") as f:
        for i in range(24):
            ids = [rng.randrange(VOCAB) for _ in range(rng.randint(2, 7))]
            f.write(json.dumps({"input_ids": ids} if i % 2 else ids) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def data_dir(base_dir, prompts_file, tmp_path_factory):
    """Greedy self-distilled data with the base model's top-8 log-probs."""
    out = str(tmp_path_factory.mktemp("data"))
    self_distill(DistillConfig(base_dir, prompts_file, out, max_new_tokens=20, batch_size=8,
                               top_logits=8, progress=False, device="cpu"))
    return out


def base_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- forward, labels


def test_causal_hidden_matches_prefill_packs_and_has_grads(base_dir):
    model = load_base_model(base_dir, torch.float32)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, VOCAB, (9,), generator=g), torch.randint(0, VOCAB, (5,), generator=g)
    tokens = torch.zeros(2, 9, dtype=torch.long)
    tokens[0], tokens[1, :5] = a, b
    with torch.no_grad():
        ref = model.prefill(tokens, torch.tensor([9, 5], dtype=torch.int32), model.new_cache(2, 9))
        mine = causal_hidden(model, tokens)
        torch.testing.assert_close(mine[0], ref[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mine[1, :5], ref[1, :5], atol=1e-5, rtol=1e-5)
        # packed: a then b in one row, positions restart, no attention across the boundary
        row = torch.cat([a, b])[None]
        pos = torch.cat([torch.arange(9), torch.arange(5)])[None]
        seg = torch.tensor([0] * 9 + [1] * 5)[None]
        packed = causal_hidden(model, row, pos, seg)
        torch.testing.assert_close(packed[0, :9], ref[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed[0, 9:], ref[1, :5], atol=1e-5, rtol=1e-5)
    causal_hidden(model, tokens).square().mean().backward()
    for name, p in model.named_parameters():
        if name != "lm_head.weight":  # not used by the hidden state
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    model.zero_grad()
    causal_hidden(model, tokens, frozen_layers=1).square().mean().backward()
    assert model.layers[0].mlp.w2.weight.grad is None and model.embed.weight.grad is None
    assert model.layers[1].mlp.w2.weight.grad.abs().sum() > 0


def test_head_k_label_shift_on_a_hand_made_sequence():
    # row: sample A = 10..15 (prompt 2) then sample B = 20..23 (prompt 1), then padding
    samples = [Sample(torch.arange(10, 16, dtype=torch.int32), 2),
               Sample(torch.arange(20, 24, dtype=torch.int32), 1)]
    batch = collate(samples, [[0, 1]], seq_len=16)
    assert batch["tokens"][0, :10].tolist() == list(range(10, 16)) + list(range(20, 24))
    assert batch["positions"][0, :10].tolist() == list(range(6)) + list(range(4))
    assert batch["segments"][0].tolist() == [0] * 6 + [1] * 4 + [-1] * 6
    # targets: A's response 12..15, B's response 21..23

    def pairs(shift):
        valid, labels = shifted_targets(batch, shift)
        return [(t, int(labels[0, t])) for t in range(16) if valid[0, t]]

    # base lm_head (shift 1): hidden t -> token t + 1
    assert pairs(1) == [(1, 12), (2, 13), (3, 14), (4, 15), (6, 21), (7, 22), (8, 23)]
    # head 0 (shift 2): hidden t -> token t + 2, never across the sample boundary
    assert pairs(2) == [(0, 12), (1, 13), (2, 14), (3, 15), (6, 22), (7, 23)]
    # head 2 (shift 4)
    assert pairs(4) == [(0, 14), (1, 15)]
    # with the prompt trained on too
    batch = collate(samples, [[0, 1]], seq_len=16, train_on_prompt=True)
    valid, labels = shifted_targets(batch, 2)
    assert [int(labels[0, t]) for t in range(16) if valid[0, t]] == [12, 13, 14, 15, 22, 23]
    valid, labels = shifted_targets(batch, 1)
    assert [int(labels[0, t]) for t in range(16) if valid[0, t]] == \
        [11, 12, 13, 14, 15, 21, 22, 23]


def test_fresh_heads_predict_what_the_base_lm_head_predicts(base_dir):
    model = load_base_model(base_dir, torch.float32)
    heads = MedusaHeads(4, 2, model.cfg.hidden_size, model.cfg.vocab_size)
    heads.init_from_lm_head(model.lm_head.weight)
    tokens = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = causal_hidden(model, tokens).flatten(0, 1)
        base = model.logits(hidden)
        full = heads(hidden)  # [N, K, V]
        _, idx = heads.topk(hidden, 5)
        for k in range(4):
            assert torch.equal(head_logits(heads, hidden, k), base)
            torch.testing.assert_close(full[:, k], base)
            assert torch.equal(idx[:, k], base.topk(5).indices)


def test_pack_collate_and_schedules():
    lengths = [5, 9, 3, 12, 7, 2, 30]
    rows = pack(lengths, 16)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(min(lengths[i], 16) for i in r) <= 16 for r in rows)
    assert pack(lengths, 16, packed=False) == [[i] for i in range(len(lengths))]
    long = Sample(torch.arange(30, dtype=torch.int32), 4)
    batch = collate([long], [[0]], seq_len=16)
    assert batch["tokens"].shape == (1, 16) and bool(batch["target"][0, 4:].all())
    assert [round(lr_factor(s, 100, 10), 4) for s in (0, 9, 10, 55, 100)] == \
        [0.1, 1.0, 1.0, 0.5, 0.0]
    assert ramp(0, 10, "sine") == 0 and ramp(10, 10, "sine") == 1 and ramp(5, 10, "linear") == 0.5


def test_topk_kl_is_exact_on_the_coarsened_distribution():
    g = torch.Generator().manual_seed(2)
    t, s = torch.randn(6, 50, generator=g) * 2, torch.randn(6, 50, generator=g) * 2
    lp = t.log_softmax(-1)
    for k in (1, 8, 50):
        v, i = lp.topk(k, -1)
        assert abs(topk_kl_sum(t, i, v).item()) < 1e-5  # same distribution: 0
        assert topk_kl_sum(s, i, v).item() > 0
    v, i = lp.topk(50, -1)
    torch.testing.assert_close(topk_kl_sum(s, i, v), kl_sum(s, t), atol=1e-4, rtol=1e-4)
    assert kl_sum(t, t).item() == 0.0


# ----------------------------------------------------------------------------- self-distillation


@pytest.mark.parametrize("fmt", ["jsonl", "safetensors"])
def test_self_distillation_resumes_without_losing_samples(base_dir, prompts_file, tmp_path, fmt,
                                                          monkeypatch):
    cfg = dict(max_new_tokens=12, batch_size=5, top_logits=3, format=fmt, progress=False,
               device="cpu")
    full = str(tmp_path / "full")
    self_distill(DistillConfig(base_dir, prompts_file, full, **cfg))
    calls, crash = [], [True]
    real = distill_mod.generate

    def crashing(*args, **kwargs):
        calls.append(len(args[1]))
        if len(calls) == 3 and crash[0]:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    part = str(tmp_path / "part")
    monkeypatch.setattr(distill_mod, "generate", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        self_distill(DistillConfig(base_dir, prompts_file, part, **cfg))
    assert len(load_dataset(part)[0]) == 10  # two finished batches are on disk
    if fmt == "jsonl":  # a crash in the middle of a write leaves half a line
        with open(os.path.join(part, "part-000.jsonl"), "a") as f:
            f.write('{"index": 99, "prompt_len": 1, "input_')
    calls.clear()
    crash[0] = False
    self_distill(DistillConfig(base_dir, prompts_file, part, **cfg))
    assert sum(calls) == 24 - 10  # only the prompts not yet done
    a, meta = load_dataset(full)
    b, _ = load_dataset(part)
    assert meta["self_distilled"] and meta["format"] == fmt
    assert [s.index for s in a] == [s.index for s in b] == list(range(24))
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.ids, y.ids) and x.prompt_len == y.prompt_len
        assert torch.equal(x.top_ids, y.top_ids)
        assert x.top_ids.shape == (len(x) - x.prompt_len, 3)
    with pytest.raises(ValueError, match="other settings"):
        self_distill(DistillConfig(base_dir, prompts_file, part, **dict(cfg, temperature=0.7)))


def test_self_distillation_refuses_to_resume_with_other_weights_or_prompts(base_dir, tmp_path):
    """Same paths, different contents: a resume would mix two models' (or prompt sets') data."""
    cfg = dict(max_new_tokens=4, batch_size=4, progress=False, device="cpu")
    model_dir, prompts = tmp_path / "model", tmp_path / "prompts.jsonl"
    shutil.copytree(base_dir, model_dir)
    prompts.write_text("[1, 2, 3]\n[4, 5]\n")
    out = str(tmp_path / "data")
    self_distill(DistillConfig(str(model_dir), str(prompts), out, **cfg))
    self_distill(DistillConfig(str(model_dir), str(prompts), out, **cfg))  # same: resumes
    prompts.write_text("[1, 2, 3]\n[4, 6]\n")
    with pytest.raises(ValueError, match="prompts_fingerprint"):
        self_distill(DistillConfig(str(model_dir), str(prompts), out, **cfg))
    prompts.write_text("[1, 2, 3]\n[4, 5]\n")
    make_hf_model("llama-gqa-llama3rope", seed=4, path=model_dir)  # other weights, same path
    with pytest.raises(ValueError, match="model_fingerprint"):
        self_distill(DistillConfig(str(model_dir), str(prompts), out, **cfg))


# ----------------------------------------------------------------------------- Medusa-1, -2


def test_medusa1_frozen_backbone_loss_falls_and_heads_decode(base_dir, data_dir, tmp_path):
    before = base_state(load_base_model(base_dir, torch.float32))
    out = str(tmp_path / "m1")
    r = train(TrainConfig(model=base_dir, data=data_dir, out=out, num_heads=3, seq_len=64,
                          batch_size=4, steps=40, lr=1e-2, log_every=1, eval_every=20,
                          eval_data=data_dir, progress=False))  # eval on the training data
    after = base_state(r.base)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical
    assert not any(p.requires_grad for p in r.base.parameters())
    opt_params = {id(p) for g in r.optimizer.param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in r.heads.parameters()}
    losses = [h["loss"] for h in r.history]
    assert len(losses) == 40
    assert sum(losses[-8:]) / 8 < 0.7 * sum(losses[:4]) / 4, losses
    acc = read_json(os.path.join(out, "head_accuracy.json"))
    assert acc["format"] == "medusa_kernels.head_accuracy.v1" and acc["step"] == 40
    assert len(acc["accuracies"]) == 3 and all(len(row) == 10 for row in acc["accuracies"])
    assert [h["step"] for h in acc["history"]] == [0, 20, 40]
    for k in range(3):
        assert acc["top1"][k] == acc["accuracies"][k][0]
        assert abs(acc["top5"][k] - sum(acc["accuracies"][k][:5])) < 1e-5
    assert acc["base"]["top1"] == 1.0  # greedy data: the base model's own argmax
    assert all(a < b for a, b in zip(acc["loss"], acc["history"][0]["loss"], strict=True))
    # the saved heads load with load_model and decode losslessly
    m = load_model(base_dir, medusa=os.path.join(out, "heads"), dtype=torch.float32)
    assert m.heads.num_heads == 3
    torch.testing.assert_close(m.heads.w2, r.heads.w2)
    prompts = [[5, 17, 3], [44, 2, 90, 61, 7]]
    fast = generate(m, prompts, max_new_tokens=16, medusa=True, tree=[[0], [1], [0, 0], [0, 0, 0]])
    assert fast.tokens == generate(m, prompts, max_new_tokens=16, medusa=False).tokens
    assert fast.mean_accepted > 1.0


@pytest.mark.parametrize("teacher", ["model", "stored"])
def test_medusa2_moves_backbone_with_zero_kl_at_step0(base_dir, data_dir, tmp_path, teacher):
    before = base_state(load_base_model(base_dir, torch.float32))
    out = str(tmp_path / "m2")
    extra = dict(unfreeze_last=1, heads_warmup_steps=2) if teacher == "stored" else {}
    r = train(TrainConfig(model=base_dir, data=data_dir, out=out, mode="medusa2", num_heads=2,
                          seq_len=64, batch_size=4, steps=6, lr=1e-3, teacher=teacher,
                          log_every=1, progress=False, **extra))
    joint = [h for h in r.history if h["stage"] == "joint"]
    assert len(joint) == 6 and len(r.history) == 6 + extra.get("heads_warmup_steps", 0)
    if teacher == "model":
        assert joint[0]["backbone_loss"] == 0.0  # KL to the frozen original: exactly 0
    else:
        assert abs(joint[0]["backbone_loss"]) < 1e-5  # stored top-8 log-probs
    assert joint[-1]["backbone_loss"] > 0
    after = base_state(r.base)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    if teacher == "model":
        assert changed == set(before)
    else:  # only the last block and the final norm train
        assert changed == {k for k in before if k.startswith(("layers.1.", "norm."))}
    # heads lr = 4 x backbone lr
    assert r.optimizer.param_groups[0]["initial_lr"] == 4 * r.optimizer.param_groups[1][
        "initial_lr"]
    # the new base in HF layout with the original config, plus the heads
    assert read_json(os.path.join(out, "model", "config.json")) == \
        read_json(os.path.join(base_dir, "config.json"))
    m = load_model(os.path.join(out, "model"), medusa=os.path.join(out, "heads"),
                   dtype=torch.float32)
    for k, v in m.base.state_dict().items():
        torch.testing.assert_close(v, after[k], msg=k)
    ids = [[3, 1, 4, 1, 5]]
    assert generate(m, ids, max_new_tokens=12, tree=[[0], [0, 0]]).tokens == \
        generate(m, ids, max_new_tokens=12, medusa=False).tokens


def test_medusa2_lm_loss_on_plain_data(base_dir, tmp_path):
    path = tmp_path / "plain.jsonl"
    g = torch.Generator().manual_seed(4)
    with open(path, "w") as f:
        for _ in range(12):
            f.write(json.dumps({"input_ids": torch.randint(0, VOCAB, (20,), generator=g).tolist(),
                                "prompt_len": 4}) + "\n")
    r = train(TrainConfig(model=base_dir, data=str(path), out=str(tmp_path / "o"),
                          mode="medusa2", num_heads=2, seq_len=32, batch_size=2, steps=2,
                          eval_fraction=0, log_every=1, progress=False))
    assert r.history[0]["backbone_loss"] > 1.0  # cross-entropy, not a KL
    with pytest.raises(ValueError, match="no top logits"):
        train(TrainConfig(model=base_dir, data=str(path), out=str(tmp_path / "o2"),
                          mode="medusa2", backbone_loss="kl", teacher="stored", steps=1,
                          progress=False))


# ----------------------------------------------------------------------------- DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["medusa1", "medusa2"])
def test_two_process_ddp_matches_one_process(base_dir, data_dir, prompts_file, tmp_path, mode):
    """torchrun, 2 gloo processes vs 1 process on the same global batch, through the CLI.
    medusa1: existing data, 2 micro-batches per process; medusa2: self-distillation sharded
    over the ranks first, then joint training with the frozen-copy KL teacher."""
    args = [mode, "--model", base_dir, "--num-heads", "3", "--seq-len", "64", "--batch-size",
            "4", "--steps", "6", "--eval-every", "3", "--no-progress"]
    if mode == "medusa1":
        args += ["--data", data_dir, "--lr", "1e-2"]
    else:
        args += ["--prompts", prompts_file, "--max-new-tokens", "16", "--distill-batch-size", "4",
                 "--lr", "1e-3", "--heads-warmup-steps", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    p = subprocess.run([sys.executable, "-m", "medusa_kernels.train", *args, "--out", one],
                       env=env, cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    p = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(_free_port()), "-m", "medusa_kernels.train", *args,
         "--out", two] + (["--micro-batch-size", "1"] if mode == "medusa1" else []),
        env=env, cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    a = load_file(os.path.join(one, "heads", "medusa_lm_head.safetensors"))
    b = load_file(os.path.join(two, "heads", "medusa_lm_head.safetensors"))
    fresh = load_base_model(base_dir, torch.float32).lm_head.weight
    assert not torch.equal(a["0.1.weight"], fresh)  # the heads did train
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=5e-5, rtol=1e-4, msg=k)
    if mode == "medusa2":
        da, db = load_dataset(os.path.join(one, "data"))[0], load_dataset(
            os.path.join(two, "data"))[0]
        assert [s.ids.tolist() for s in da] == [s.ids.tolist() for s in db]
        assert len(glob.glob(os.path.join(two, "data", "part-*.jsonl"))) == 2  # one per rank
        a = load_file(os.path.join(one, "model", "model.safetensors"))
        b = load_file(os.path.join(two, "model", "model.safetensors"))
        orig = load_file(os.path.join(base_dir, "model.safetensors"))
        assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"],
                               orig["model.layers.0.mlp.up_proj.weight"])
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=5e-5, rtol=1e-4, msg=k)
    acc1 = read_json(os.path.join(one, "head_accuracy.json"))
    acc2 = read_json(os.path.join(two, "head_accuracy.json"))
    assert acc1["positions"] == acc2["positions"]
    assert read_json(os.path.join(two, "train_report.json"))["world_size"] == 2


def test_distill_cli(base_dir, prompts_file, tmp_path):
    out = str(tmp_path / "d")
    assert train_cli.main(["distill", "--model", base_dir, "--prompts", prompts_file, "--out", out,
                           "--limit", "6", "--max-new-tokens", "5", "--temperature", "0.8",
                           "--format", "safetensors", "--no-progress", "--device", "cpu"]) == 0
    samples, meta = load_dataset(out)
    assert [s.index for s in samples] == list(range(6)) and meta["temperature"] == 0.8
    assert all(len(s) - s.prompt_len == 5 for s in samples)


@pytest.mark.parametrize("family", ["qwen3", "phi3-longrope", "gemma2", "gemma3"])
def test_train_medusa1_cli_on_each_family(family, prompts_file, tmp_path):
    """`train medusa1` (self-distillation, then a few steps) on a tiny model of each new family;
    the heads it writes load and decode losslessly. The training forward (``causal_hidden``)
    is the decoder's: windows, soft-caps, Gemma's norms and ropes."""
    base = tmp_path / "base"
    make_hf_model(family, seed=2, layers=2, path=base)
    model = load_base_model(base, torch.float32)
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model.prefill(tokens, torch.tensor([12, 12], dtype=torch.int32),
                            model.new_cache(2, 12))
        torch.testing.assert_close(causal_hidden(model, tokens), ref, atol=1e-5, rtol=1e-5)
    out = str(tmp_path / "run")
    assert train_cli.main(["medusa1", "--model", str(base), "--prompts", prompts_file,
                           "--out", out, "--num-heads", "2", "--seq-len", "32",
                           "--batch-size", "4", "--steps", "3", "--max-new-tokens", "6",
                           "--distill-batch-size", "8", "--no-progress", "--device", "cpu"]) == 0
    acc = read_json(os.path.join(out, "head_accuracy.json"))
    assert acc["step"] == 3 and len(acc["top1"]) == 2
    m = load_model(base, medusa=os.path.join(out, "heads"), dtype=torch.float32)
    prompts = [[5, 17, 3], [44, 2, 90, 61, 7]]
    fast = generate(m, prompts, max_new_tokens=10, tree=[[0], [1], [0, 0]])
    assert fast.tokens == generate(m, prompts, max_new_tokens=10, medusa=False).tokens
