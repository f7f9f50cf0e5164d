"""Training shared heads and trimmed vocabularies at tiny scale: a fresh shared head predicts
what the lm_head predicts, only the ResBlocks train (lm_head frozen, bit-identical), the token
map is the N most frequent targets, the saved heads load and decode losslessly (CLI too)."""

import json
import os
import random

import pytest
import torch
from safetensors import safe_open
from tiny_models import VOCAB, make_hf_model

from medusa_kernels import MedusaHeads, generate, load_model
from medusa_kernels import train as train_cli
from medusa_kernels.checkpoint import load_base_model, read_json
from medusa_kernels.training import (
    DistillConfig,
    Sample,
    TrainConfig,
    causal_hidden,
    head_logits,
    self_distill,
    train,
)
from medusa_kernels.training.trainer import frequent_tokens


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    make_hf_model("qwen2", seed=3, path=path)  # tied embeddings: the lm_head is the embedding
    return str(path)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    with open(path, "w") as f:
        for _ in range(24):
            f.write(json.dumps([rng.randrange(VOCAB) for _ in range(rng.randint(2, 7))]) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def data_dir(base_dir, prompts_file, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("data"))
    self_distill(DistillConfig(base_dir, prompts_file, out, max_new_tokens=20, batch_size=8,
                               progress=False, device="cpu"))
    return out


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("trim", [False, True], ids=["full", "trimmed"])
def test_fresh_shared_heads_predict_what_the_lm_head_predicts(base_dir, layers, trim):
    model = load_base_model(base_dir, torch.float32)
    tmap = torch.arange(3, VOCAB, 2) if trim else None  # 49 ids, every other one
    heads = MedusaHeads(3, layers, model.cfg.hidden_size, VOCAB, kind="shared", token_map=tmap)
    heads.init_from_lm_head(model.lm_head.weight)
    assert [n for n, _ in heads.named_parameters()] == ["w1", "b1"]  # no projection of its own
    tokens = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = causal_hidden(model, tokens).flatten(0, 1)
        base = model.logits(hidden)
        if trim:
            base = base[:, tmap]
        _, idx = heads.topk(hidden, 4)
        for k in range(3):
            assert torch.equal(head_logits(heads, hidden, k), base)
            want = base.topk(4).indices
            assert torch.equal(idx[:, k], tmap[want] if trim else want)


def test_frequent_tokens_counts_targets_only_ties_to_lower_id():
    samples = [Sample(torch.tensor([50, 50, 50, 50, 7, 7, 9, 3]), 4),  # prompt: four 50s
               Sample(torch.tensor([9, 3, 3]), 0)]
    # response counts: 3 -> 3, 7 -> 2, 9 -> 2; 50 only in a prompt
    assert frequent_tokens(samples, 60, 2).tolist() == [3, 7]  # 7 and 9 tie: lower id
    assert frequent_tokens(samples, 60, 3).tolist() == [3, 7, 9]
    assert frequent_tokens(samples, 60, 1, train_on_prompt=True).tolist() == [50]
    assert frequent_tokens(samples, 60, 5).tolist() == [0, 1, 3, 7, 9]  # zero counts: low ids
    with pytest.raises(ValueError, match="vocab must be an int in"):
        frequent_tokens(samples, 60, 61)


@pytest.mark.parametrize("kind,vocab,layers", [("shared", None, 1), ("shared", 40, 2),
                                               ("separate", 40, 1)],
                         ids=["shared", "shared-trim40-L2", "separate-trim40"])
def test_medusa1_shared_and_trimmed_heads_train_save_and_decode(base_dir, data_dir, tmp_path,
                                                                kind, vocab, layers):
    before = {k: v.clone() for k, v in load_base_model(base_dir, torch.float32).state_dict()
              .items()}
    out = str(tmp_path / "run")
    r = train(TrainConfig(model=base_dir, data=data_dir, out=out, num_heads=3, num_layers=layers,
                          heads_kind=kind, vocab=vocab, seq_len=64, batch_size=4, steps=30,
                          lr=1e-2, log_every=1, eval_every=30, eval_data=data_dir,
                          progress=False))
    assert all(torch.equal(before[k], v) for k, v in r.base.state_dict().items())  # frozen
    opt_params = {id(p) for g in r.optimizer.param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in r.heads.parameters()}
    if kind == "shared":
        assert {n for n, _ in r.heads.named_parameters()} == {"w1", "b1"}
    losses = [h["loss"] for h in r.history]
    assert sum(losses[-6:]) / 6 < 0.8 * sum(losses[:3]) / 3, losses
    acc = read_json(os.path.join(out, "head_accuracy.json"))
    assert all(a < b for a, b in zip(acc["loss"], acc["history"][0]["loss"], strict=True))
    # the map: the `vocab` most frequent response tokens of the data, ascending
    cfg = read_json(os.path.join(out, "heads", "config.json"))
    assert cfg["medusa_head_kind"] == kind and cfg["vocab_size"] == VOCAB
    with safe_open(os.path.join(out, "heads", "medusa_lm_head.safetensors"), "pt") as f:
        names = set(f.keys())
        assert ("token_map" in names) == (vocab is not None)
        assert any(n.endswith(f".{layers}.weight") for n in names) == (kind == "separate")
        if vocab is not None:
            tmap = f.get_tensor("token_map")
            assert tmap.dtype == torch.int64 and tmap.shape == (vocab,)
            assert cfg["medusa_draft_vocab_size"] == vocab
            assert torch.equal(tmap, r.heads.token_map)
    summary = read_json(os.path.join(out, "train_report.json"))["heads"]
    d, R = r.heads.hidden_size, vocab or VOCAB
    assert summary["parameters"] == 3 * layers * (d * d + d) + (3 * R * d if kind == "separate"
                                                                else 0)
    assert summary["bytes_per_step"] == 4 * (3 * layers * (d * d + d) +
                                             (3 if kind == "separate" else 1) * R * d)
    m = load_model(base_dir, medusa=os.path.join(out, "heads"), dtype=torch.float32)
    assert (m.heads.kind, m.heads.num_layers, m.heads.draft_vocab) == \
        (kind, layers, vocab or VOCAB)
    torch.testing.assert_close(m.heads.w1, r.heads.w1)
    prompts = [[5, 17, 3], [44, 2, 90, 61, 7]]
    fast = generate(m, prompts, max_new_tokens=16, medusa=True, tree=[[0], [1], [0, 0], [0, 0, 0]])
    assert fast.tokens == generate(m, prompts, max_new_tokens=16, medusa=False).tokens
    assert fast.mean_accepted > 1.0


def test_train_cli_heads_shared_vocab_head_layers(base_dir, prompts_file, tmp_path):
    out = str(tmp_path / "run")
    assert train_cli.main(["medusa1", "--model", base_dir, "--prompts", prompts_file,
                           "--out", out, "--num-heads", "2", "--seq-len", "32",
                           "--batch-size", "4", "--steps", "3", "--max-new-tokens", "6",
                           "--distill-batch-size", "8", "--no-progress", "--device", "cpu",
                           "--heads", "shared", "--vocab", "30", "--head-layers", "2"]) == 0
    cfg = read_json(os.path.join(out, "heads", "config.json"))
    assert (cfg["medusa_head_kind"], cfg["medusa_num_layers"], cfg["medusa_draft_vocab_size"]) \
        == ("shared", 2, 30)
    assert train_cli.main(["medusa1", "--model", base_dir, "--prompts", prompts_file,
                           "--out", out, "--vocab", "0"]) == 2  # a bad count: one line, exit 2


def test_medusa2_shared_heads_follow_the_trained_lm_head(base_dir, data_dir, tmp_path):
    out = str(tmp_path / "m2")
    r = train(TrainConfig(model=base_dir, data=data_dir, out=out, mode="medusa2", num_heads=2,
                          heads_kind="shared", vocab=50, seq_len=64, batch_size=4, steps=4,
                          lr=1e-3, progress=False, backbone_loss="lm"))
    # the gathered rows are the trained lm_head's, not the original's
    torch.testing.assert_close(r.heads._shared[0], r.base.lm_head.weight[r.heads.token_map])
    m = load_model(os.path.join(out, "model"), medusa=os.path.join(out, "heads"),
                   dtype=torch.float32)
    prompts = [[5, 17, 3]]
    fast = generate(m, prompts, max_new_tokens=12, tree=[[0], [1], [0, 0]])
    assert fast.tokens == generate(m, prompts, max_new_tokens=12, medusa=False).tokens


def test_two_process_ddp_shared_trimmed_matches_one_process(base_dir, data_dir, tmp_path):
    """torchrun, 2 gloo processes vs 1 on the same global batch: the same token map, the same
    ResBlocks."""
    import socket
    import subprocess
    import sys

    from safetensors.torch import load_file

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = ["medusa1", "--model", base_dir, "--data", data_dir, "--num-heads", "2",
            "--seq-len", "64", "--batch-size", "4", "--steps", "4", "--lr", "1e-2",
            "--heads", "shared", "--vocab", "40", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=root)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    p = subprocess.run([sys.executable, "-m", "medusa_kernels.train", *args, "--out", one],
                       env=env, cwd=root, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(port), "-m", "medusa_kernels.train", *args,
                        "--out", two, "--micro-batch-size", "1"],
                       env=env, cwd=root, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    a = load_file(os.path.join(one, "heads", "medusa_lm_head.safetensors"))
    b = load_file(os.path.join(two, "heads", "medusa_lm_head.safetensors"))
    assert set(a) == set(b) and "token_map" in a and torch.equal(a["token_map"], b["token_map"])
    assert a["0.0.linear.weight"].abs().sum() > 0  # the ResBlocks did train
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=5e-5, rtol=1e-4, msg=k)
