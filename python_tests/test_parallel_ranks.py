"""Tensor parallelism on 2 and 4 gloo ranks of this CPU against one process (TP = 1): the
building blocks (collectives from torchrun's environment, a small decoder written from them,
the top-k merge on ties, slice reads and their memory), then the package itself:
``load_model(..., tp=True)`` and ``generate`` for Llama (GQA), Qwen2 (biases, tied embeddings),
Qwen3 (q/k norms), Phi-3 (fused projections), Gemma-2 (soft-caps, sandwich norms, windows) and
Gemma-3 (a rope per layer type), the generate CLI and the bench's TP mode.

Each world size is one run of ``parallel_worker.py`` on N ranks (torchrun's environment through
``tp_launch.run_ranks``, a hard timeout: a hang fails, the first rank to fail stops the others)
that does everything; the reference runs the same functions in this process. Checked: logits
within fp32 tolerance, greedy and Medusa greedy tokens equal token for token, seeded typical
acceptance too, every rank bit-identical (acceptance agrees without a broadcast, unseeded
sampling too), each rank's weight bytes 1/N of the split tensors plus the replicated ones, the
heads' top-k on exact ties across shard boundaries (k above a rank's rows included), the errors
for head counts that do not divide, a rank's peak memory while loading. The NCCL variant needs
2 GPUs and skips otherwise; ``torchrun`` itself runs the generate CLI once.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import tp_launch
from parallel_decode_worker import TREE, family_outputs, tie_outputs
from parallel_worker import tiny_outputs
from tiny_models import VOCAB, make_hf_model, save_random_heads
from tp_checkpoints import (
    KS,
    MEDUSA_HEADS,
    TINY,
    TOKENS,
    tie_logits,
    tiny_tensors,
    write_checkpoint,
)

from medusa_kernels import MedusaHeads, load_medusa_heads, load_model, save_medusa_heads
from medusa_kernels.checkpoint import heads_state_dict, load_base_model, weight_files
from medusa_kernels.model import Transformer
from medusa_kernels.ops.heads_topk import topk_lower_index_first
from medusa_kernels.parallel import SINGLE, TPGroup, TPLayout, read_shards, vocab_range

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "parallel_worker.py")
RUN_TIMEOUT = 240  # seconds for one multi-rank run (about 25 s for 4 ranks on 2 busy cores)
HEADS = dict(num_attention_heads=8, num_key_value_heads=4)  # GQA 2: splits 2 and 4 ways
FAMILIES = ["llama-gqa-llama3rope", "qwen2", "qwen3", "phi3", "gemma2", "gemma3"]
SHARED = "qwen2-shared-heads-map"  # shared heads over a trimmed vocabulary (test_shared_heads.py)
TIE_KS = (1, 2, 4, 7, 30)  # 30: more than a rank's 25 or 26 rows at 4 ranks (V = 101)
TIE_D = 8


def spec() -> dict:
    g = torch.Generator().manual_seed(11)
    return {"tokens": torch.randint(0, VOCAB, (2, 9), generator=g),
            "lengths": torch.tensor([9, 6], dtype=torch.int32),
            "step_tokens": torch.randint(0, VOCAB, (2, 3), generator=g),
            "prompts": [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (7, 3, 11)],
            "new": 10}


def tie_heads(path, num_layers: int) -> None:
    """Heads with exact integer logits: identity ResBlocks (zero weights), integer rows, the
    largest rows duplicated on both sides of every 2- and 4-rank shard boundary (25 | 26,
    50 | 51, 75 | 76 at V = 101) and at both ends; head 2 one constant row (all tied)."""
    g = torch.Generator().manual_seed(num_layers)
    heads = MedusaHeads(3, num_layers, TIE_D, VOCAB)
    with torch.no_grad():
        heads.w1.zero_()
        heads.b1.zero_()
        heads.w2.copy_(torch.randint(-2, 3, heads.w2.shape, generator=g).float())
        heads.w2[0, [25, 26, 50, 51, 75, 76]] = 3.0
        heads.w2[1, [0, 100, 50, 51]] = 3.0
        heads.w2[2] = 1.0
    save_medusa_heads(heads, path)


def tie_hidden() -> torch.Tensor:
    """[6, d] integer hidden states: positive rows (the 3-rows lead), a zero row (everything
    ties), a negative row."""
    g = torch.Generator().manual_seed(7)
    hidden = torch.randint(1, 4, (6, TIE_D), generator=g).float()
    hidden[4] = 0.0
    hidden[5] = -hidden[5]
    return hidden


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp-families")
    families = []
    for seed, name in enumerate(FAMILIES):
        base, heads = root / name, root / f"{name}-heads"
        make_hf_model(name, seed=seed, layers=2, path=base, **HEADS)
        save_random_heads(heads, num_heads=3, seed=seed)
        families.append((name, str(base), str(heads)))
    base, heads = root / SHARED, root / f"{SHARED}-heads"
    make_hf_model("qwen2", seed=len(FAMILIES), layers=2, path=base, **HEADS)
    shared = MedusaHeads(3, 1, 64, VOCAB, kind="shared", token_map=torch.arange(1, VOCAB, 2))
    shared.init_from_lm_head(load_base_model(base, torch.float32).lm_head.weight)
    with torch.no_grad():
        shared.w1.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    save_medusa_heads(shared, heads)
    families.append((SHARED, str(base), str(heads)))
    ties = []
    for layers in (1, 2):
        ties.append(str(root / f"ties{layers}"))
        tie_heads(ties[-1], layers)
    bad = {"kv3": root / "kv3", "ffn98": root / "ffn98"}  # 3 KV heads; intermediate 98
    make_hf_model("llama-mha", layers=1, path=bad["kv3"], hidden=48, num_attention_heads=6,
                  num_key_value_heads=3)
    make_hf_model("llama-mha", layers=1, path=bad["ffn98"], intermediate_size=98, **HEADS)
    big = root / "big"  # about 32 MB: a rank's memory stands out of the process's noise
    make_hf_model("llama-mha", layers=1, path=big, hidden=512, vocab_size=4096,
                  intermediate_size=2048, **HEADS)
    return {"families": families, "ties": ties, "bad": {k: str(v) for k, v in bad.items()},
            "big": str(big)}


@pytest.fixture(scope="module")
def reference(checkpoints):
    """TP = 1: the same code in this process, on whole models."""
    torch.manual_seed(0)
    out = {}
    for name, base, heads in checkpoints["families"]:
        out[name] = family_outputs(load_model(base, medusa=heads, dtype=torch.float32), spec())
    out["ties"] = tie_outputs(checkpoints["ties"], tie_hidden(), TIE_KS)
    return out


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    tensors = tiny_tensors(TINY, MEDUSA_HEADS)
    files = write_checkpoint(str(tmp_path_factory.mktemp("tiny")), tensors, TINY)
    return TINY, files, tensors


@pytest.fixture(scope="module")
def tiny_reference(tiny_ckpt):
    """The building blocks' decoder in one process: world 1, the same code."""
    cfg, files, _ = tiny_ckpt
    layout = TPLayout.from_hf_config(cfg, 1, 0)
    w = read_shards(files, layout)
    return tiny_outputs(TOKENS, w, layout, SINGLE, cfg["num_hidden_layers"], MEDUSA_HEADS)


def worker_inputs(world: int, tiny_ckpt, checkpoints, tmp_path, device: str = "cpu") -> dict:
    cfg, files, _ = tiny_ckpt
    fams = checkpoints["families"]
    name, base, heads = fams[0]
    tree = tmp_path / "tree.json"
    tree.write_text(json.dumps(TREE))
    cli = ["--model", base, "--medusa", heads, "--input-ids",
           ",".join(map(str, spec()["prompts"][0])), "--max-new-tokens", "10", "--tree",
           str(tree), "--device", device, "--dtype", "float32"]
    inputs = {"config": cfg, "files": files, "tokens": TOKENS, "tie_logits": tie_logits(),
              "ks": KS, "num_layers": cfg["num_hidden_layers"], "num_medusa_heads": MEDUSA_HEADS,
              "decode": {"families": fams, "spec": spec(), "tie_heads": checkpoints["ties"],
                         "tie_hidden": tie_hidden(), "ks": TIE_KS, "bad": checkpoints["bad"],
                         "cli": cli, "bench": (base, heads) if world == 2 else None,
                         "big": checkpoints["big"] if world == 4 else None}}
    if world == 4 and device == "cpu":  # the read-memory check: the 32 MB checkpoint
        inputs["big_files"] = weight_files(checkpoints["big"])
        with open(os.path.join(checkpoints["big"], "config.json")) as f:
            inputs["big_config"] = json.load(f)
    return inputs


@pytest.fixture(scope="module", params=[2, 4], ids=["gloo2", "gloo4"])
def ranks(request, tiny_ckpt, checkpoints, tmp_path_factory):
    """(world, every rank's results): one run of ``world`` ranks per world size."""
    world = request.param
    workdir = tmp_path_factory.mktemp(f"tp{world}")
    torch.save(worker_inputs(world, tiny_ckpt, checkpoints, workdir),
               os.path.join(workdir, "inputs.pt"))
    return world, tp_launch.run_ranks(world, str(workdir), WORKER, timeout=RUN_TIMEOUT)


# ----------------------------------------------------------------------------- building blocks


def test_gloo_ranks_join_from_the_torchrun_environment(ranks):
    world, results = ranks
    for rank, out in enumerate(results):
        assert out["env"] == (rank, world)
        assert out["tp"] == (rank, world, True, True)  # init_tp made (and owned) the group
        expected = torch.arange(4.0) * world + 10 * sum(range(world))
        assert torch.equal(out["all_reduce"], expected)
        assert out["all_gather"].tolist() == [[[r, -r]] for r in range(world)]


def test_gloo_model_matches_one_process(ranks, tiny_reference):
    """Embedding, two layers (biases, fused tensors, sandwich norms), final norm, gathered
    logits, greedy / top-5 tokens and Medusa heads' top-4 across N ranks against one process;
    every rank holds bit-identical results (acceptance then agrees without a broadcast)."""
    world, results = ranks
    first = results[0]["model"]
    torch.testing.assert_close(first["hidden"], tiny_reference["hidden"], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(first["logits"], tiny_reference["logits"], atol=2e-6, rtol=1e-5)
    for key in ("greedy", "top5", "heads"):
        assert torch.equal(first[key][1], tiny_reference[key][1]), key
        torch.testing.assert_close(first[key][0], tiny_reference[key][0], atol=2e-6, rtol=1e-5)
    assert torch.equal(first["top5"][1][:, :1], first["greedy"][1])
    assert torch.equal(first["logits"].flatten(0, 1).argmax(-1, keepdim=True),
                       first["greedy"][1])
    for out in results[1:]:
        for key, value in out["model"].items():
            if isinstance(value, tuple):
                assert all(torch.equal(a, b) for a, b in zip(value, first[key], strict=True)), key
            else:
                assert torch.equal(value, first[key]), key


def test_gloo_topk_merge_ties_across_shards(ranks):
    world, results = ranks
    logits = tie_logits()
    for k in KS:
        exp_values, exp_ids = topk_lower_index_first(logits, k)
        for out in results:
            values, ids = out["ties"][k]
            assert torch.equal(ids, exp_ids), (world, k)
            torch.testing.assert_close(values, exp_values, atol=0, rtol=0, equal_nan=True)


def test_gloo_ranks_hold_their_slices(ranks, tiny_ckpt):
    world, results = ranks
    cfg, _, full = tiny_ckpt
    split_read = 0
    for rank, out in enumerate(results):
        layout = TPLayout.from_hf_config(cfg, world, rank)
        for name, shape in out["shapes"].items():
            assert shape == layout.shard(name, full[name].shape).local_shape(full[name].shape)
        split_read += out["stats"]["split_read"]
    assert split_read == results[0]["stats"]["split_full"]


def test_gloo_rank_memory_is_its_share(ranks):
    """A rank of 4 reading a 32 MB checkpoint keeps exactly its quarter of the split tensors
    plus the whole ones (under 5%), and its anonymous memory grows by no more than that.
    Not asserted: the file pages the reads touch (page cache shared by the ranks, as much as
    the kernel's readahead brings in; safetensors hands out views of its memory map)."""
    world, results = ranks
    if world != 4:
        pytest.skip("measured with 4 ranks")
    mb = 2**20
    for out in results:
        mem, stats = out["memory"], out["memory"]["stats"]
        if "RssAnon" not in mem["before"]:
            pytest.skip("/proc/self/status has no RssAnon here")
        assert stats["split_read"] * 4 == stats["split_full"]
        assert stats["read"] - stats["split_read"] < 0.05 * stats["full"]
        assert mem["held"] == stats["read"] < 0.3 * stats["full"]
        anon = (mem["after"]["RssAnon"] - mem["before"]["RssAnon"]) * mb
        assert anon < mem["held"] + 4 * mb, (anon / mb, mem)


# ----------------------------------------------------------------------------- the package


def decoded(ranks) -> tuple[int, list[dict]]:
    """(world, every rank's ``decode_part`` results)."""
    world, results = ranks
    return world, [r["decode"] for r in results]


def _same(a, b) -> bool:
    """Bit-identical nested tensors / lists / tuples."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and \
            torch.equal(a.nan_to_num(), b.nan_to_num())
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.mark.parametrize("name", FAMILIES + [SHARED])
def test_tp_decoding_matches_one_process(ranks, reference, name):
    """Logits (prefill, tree step, heads) within fp32 tolerance; greedy ids, plain and Medusa
    greedy generations and seeded typical acceptance token for token; every rank's results
    bit-identical to rank 0's (unseeded sampling included: load_model gives every rank rank 0's
    random state)."""
    world, results = decoded(ranks)
    ref, got = reference[name], results[0]["families"][name]
    for key in ("prefill_logits", "step_logits", "heads_logits"):
        torch.testing.assert_close(got[key], ref[key], atol=2e-5, rtol=1e-5, msg=key)
    worst = max((got[k] - ref[k]).abs().max().item() for k in ("prefill_logits", "step_logits"))
    print(f"{name} tp={world}: max |logits - one process| = {worst:.1e}")
    for key in ("prefill_greedy", "step_greedy"):
        assert torch.equal(got[key], ref[key]), key
    assert torch.equal(got["heads_top3"][1], ref["heads_top3"][1])
    torch.testing.assert_close(got["heads_top3"][0], ref["heads_top3"][0], atol=2e-5, rtol=1e-5)
    assert got["plain"] == ref["plain"]
    assert got["medusa"][0] == ref["plain"]  # lossless under TP too
    assert got["medusa"] == ref["medusa"]  # same accepted lengths step by step
    assert got["typical"] == ref["typical"]
    assert got["kv_heads"] == 4 // world  # each rank caches its KV heads
    for other in results[1:]:  # the same on every rank, bit for bit (not the bytes they hold)
        mine = {k: v for k, v in other["families"][name].items() if k != "bytes"}
        assert _same(mine, {k: v for k, v in got.items() if k != "bytes"}), other["rank"]


def test_tp_ranks_hold_their_share_of_the_weights(ranks, checkpoints):
    """Each rank's resident weight bytes: the split tensors' 1/N (vocabulary shards of V =
    101 uneven: 51 + 50, 26 + 25 x 3 rows) plus the replicated norms and o/down biases; the
    ranks together hold the model once plus N - 1 copies of the replicated part; the heads'
    projections once, their ResBlocks on every rank."""
    world, results = decoded(ranks)
    for name, base_dir, _ in checkpoints["families"]:
        whole = load_base_model(base_dir, torch.float32)
        total = sum(p.numel() * 4 for p in whole.parameters())
        replicated = sum(p.numel() * 4 for n, p in whole.named_parameters()
                         if "norm" in n or n.endswith(("wo.bias", "w2.bias")))
        held = [r["families"][name]["bytes"][0] for r in results]
        assert sum(held) == total + (world - 1) * replicated, name
        for rank, b in enumerate(held):
            start, stop = vocab_range(VOCAB, world, rank)
            vocab_share = (stop - start) / VOCAB
            assert b < total / world * 1.12 + replicated, (name, rank, b / total)
            assert b > total * min(vocab_share, 1 / world) * 0.9, (name, rank, b / total)
        ratio = max(held) / total
        print(f"{name} tp={world}: rank weight bytes / model = {ratio:.3f} (1/N = {1 / world:.3f})")
    heads = load_medusa_heads(checkpoints["families"][0][2], torch.float32)  # 3 heads, d = 64
    whole_heads = (heads.w1.numel() + heads.b1.numel()) * 4  # ResBlocks: on every rank
    held = [r["families"][FAMILIES[0]]["bytes"][1] for r in results]
    assert sum(held) == world * whole_heads + heads.w2.numel() * 4


def test_tp_heads_topk_ties_across_shard_boundaries(ranks, reference, checkpoints):
    """Integer heads, exact ties on both sides of every boundary: every rank's merged top-k
    equals one process's and ``topk_lower_index_first`` of the exact logits (ties to the lower
    id), for k up to 30 (above a 4-rank shard's 25 or 26 rows: short lists are padded)."""
    world, results = decoded(ranks)
    hidden = tie_hidden().double()
    for path in checkpoints["ties"]:
        label = os.path.basename(path)
        w2 = load_medusa_heads(path, torch.float64).w2  # identity ResBlocks: logits h w2^T
        logits = torch.einsum("nd,kvd->nkv", hidden, w2)
        for k in TIE_KS:
            exp_values, exp_ids = topk_lower_index_first(logits, k)
            for who, got in [("one process", reference["ties"][label])] + \
                    [(f"rank {r['rank']}", r["ties"][label]) for r in results]:
                values, ids = got[k]
                assert torch.equal(ids, exp_ids), (label, k, who)
                assert torch.equal(values.double(), exp_values), (label, k, who)
    top = reference["ties"]["ties1"][30][1]
    assert top[0, 0, :6].tolist() == [25, 26, 50, 51, 75, 76]  # tied across 3 boundaries
    assert top[4, 2].tolist() == list(range(30))  # a zero row: everything ties


def test_tp_refuses_head_counts_that_do_not_divide(ranks, checkpoints):
    """Every rank raises the same ValueError naming config.json and its key, before reading a
    weight (so no rank waits for another); 98 intermediate columns split 2 ways, not 4."""
    world, results = decoded(ranks)
    for r in results:
        errors = r["errors"]
        assert "num_key_value_heads = 3 to divide by " + str(world) in errors["kv3"]
        assert errors["kv3"].startswith(os.path.join(checkpoints["bad"]["kv3"], "config.json"))
        if world == 4:
            assert "intermediate_size = 98 to divide by 4" in errors["ffn98"]
        else:
            assert "ffn98" not in errors
        assert errors == results[0]["errors"]


def test_tp_refusals_in_one_process(checkpoints):
    """The same checks without starting ranks: a TPGroup of rank 1 of 4 (the errors come
    before any collective); a rank's part of a model has its local sizes and cannot be
    saved."""
    four = TPGroup(1, 4, group=object())
    with pytest.raises(ValueError, match="num_key_value_heads = 3 to divide by 4"):
        load_base_model(checkpoints["bad"]["kv3"], torch.float32, "cpu", four)
    with pytest.raises(ValueError, match="vocab_size >= 4"):
        MedusaHeads(2, 1, 8, 3, four)
    with pytest.raises(TypeError, match="tp must be None, True, a parallel.TPGroup"):
        load_model(checkpoints["bad"]["kv3"], tp=2)
    # a rank's slices are not a checkpoint: saving them is refused
    base = load_model(checkpoints["families"][0][1], dtype=torch.float32).base
    with torch.device("meta"):
        rank = Transformer(base.cfg, four)
        heads = MedusaHeads(2, 1, 8, VOCAB, four)
    assert rank.embed.weight.shape[0] == 25 and rank.layers[0].attention.num_kv_heads == 1
    with pytest.raises(ValueError, match="rank 1 of a 4-way tensor-parallel"):
        rank.hf_state_dict()
    with pytest.raises(ValueError, match="rank 1 of a 4-way tensor-parallel"):
        heads_state_dict(heads)
    assert heads.vocab_size == VOCAB and heads.w2.shape[1] == 25


def test_tp_bench_e2e_mode(ranks):
    """``e2e`` under 2 ranks: generation and step rows carry tp = 2, Medusa equals plain."""
    world, results = decoded(ranks)
    if world != 2:
        pytest.skip("run at 2 ranks")
    rows = results[0]["bench"]
    impls = {r["impl"] for r in rows}
    assert {"plain_generate", "medusa_generate", "plain_step", "medusa_step"} <= impls
    assert all(r.get("tp") == 2 for r in rows), rows
    medusa = [r for r in rows if r["impl"] == "medusa_generate"]
    assert medusa and all(r["check"] == "ok" and r["identical"] for r in medusa)
    assert all(r["median_us"] > 0 for r in rows if r["impl"].endswith("_step"))


def test_tp_rank_loads_its_part_only(ranks, checkpoints):
    """A rank of 4 loading a 32 MB checkpoint: its anonymous memory peaks at its quarter plus
    one tensor in flight, never the whole model (a sampling thread reads RssAnon every ms)."""
    world, results = decoded(ranks)
    if world != 4:
        pytest.skip("measured at 4 ranks")
    full = sum(p.numel() * 4 for p in load_base_model(checkpoints["big"], torch.float32)
               .parameters())
    for r in results:
        mem = r["load_memory"]
        if not mem:
            pytest.skip("no /proc/self/status here")
        mb = 2**20
        assert mem["held"] < 0.3 * full
        peak = (mem["peak"] - mem["before"]) * mb
        assert peak < 0.45 * full, (peak / mb, full / mb, mem)
        print(f"rank {r['rank']}: held {mem['held'] / mb:.1f} MB of {full / mb:.1f} MB, "
              f"peak anonymous growth {peak / mb:.1f} MB")


def test_tp_generate_cli_on_the_ranks(ranks, reference):
    """``python -m medusa_kernels.generate`` in every rank (main() under torchrun's
    environment): exit 0 everywhere, rank 0 prints the tokens one process decodes and the one
    stats line, the other ranks print nothing."""
    world, results = decoded(ranks)
    for r in results:
        code, stdout, stderr = r["cli"]
        assert code == 0, stderr
        if r["rank"]:
            assert stdout == stderr == "", (r["rank"], stdout, stderr)
        else:
            assert list(map(int, stdout.split())) == reference[FAMILIES[0]]["plain"][0]
            stats = [line for line in stderr.splitlines() if line.startswith("[medusa")]
            assert len(stats) == 1 and f"{world}-way tensor parallel" in stats[0], stderr


def test_torchrun_generate_cli(checkpoints, reference, tmp_path):
    """``torchrun --nproc-per-node 2 -m medusa_kernels.generate`` (torchrun itself, its own
    environment): rank 0 prints the tokens, equal to one process's; one stats line."""
    name, base, heads = checkpoints["families"][0]
    prompt = spec()["prompts"][0]
    tree = tmp_path / "tree.json"
    tree.write_text(json.dumps(TREE))
    env = tp_launch.torchrun_env(0, 1, 0)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                "MASTER_PORT"):
        env.pop(key)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(tp_launch.free_port()),
           "-m", "medusa_kernels.generate", "--model", base, "--medusa", heads,
           "--input-ids", ",".join(map(str, prompt)), "--max-new-tokens", "10",
           "--tree", str(tree), "--device", "cpu"]
    out = subprocess.run(cmd, env=env, cwd=tp_launch.ROOT, capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert list(map(int, out.stdout.split())) == reference[name]["plain"][0]
    stats = [line for line in out.stderr.splitlines() if line.startswith("[medusa")]
    assert len(stats) == 1 and "2-way tensor parallel" in stats[0], out.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL tensor parallelism needs 2 GPUs")
def test_nccl_two_gpus_match_one_process(tiny_ckpt, tiny_reference, checkpoints, reference,
                                         tmp_path_factory):
    """The same run on cuda:0 and cuda:1 with NCCL: the building blocks (a vocabulary-parallel
    top-k and an all-reduce replayed from a captured CUDA graph), then every family decoding
    with ``generate``'s CUDA graphs (NCCL collectives inside the captured steps): tokens equal
    to one CPU process (fp32), Medusa equal to plain, the ranks bit-identical, the CLI."""
    workdir = tmp_path_factory.mktemp("nccl")
    torch.save(worker_inputs(2, tiny_ckpt, checkpoints, workdir, device="cuda"),
               os.path.join(workdir, "inputs.pt"))
    results = tp_launch.run_ranks(2, str(workdir), WORKER, device="cuda", timeout=RUN_TIMEOUT)
    for out in results:
        assert out["tp"] == (out["env"][0], 2, True, True)
        model = out["model"]
        torch.testing.assert_close(model["hidden"], tiny_reference["hidden"], atol=1e-4,
                                   rtol=1e-4)
        for key in ("greedy", "top5", "heads"):
            assert torch.equal(model[key][1], tiny_reference[key][1]), key
        graph, eager = out["cuda_graph"]["graph"], out["cuda_graph"]["eager"]
        assert all(torch.equal(a, b) for a, b in zip(graph, eager, strict=True))
    decode = [r["decode"] for r in results]
    for name in FAMILIES:
        got, ref = decode[0]["families"][name], reference[name]
        for key in ("prefill_logits", "step_logits"):
            torch.testing.assert_close(got[key], ref[key], atol=1e-3, rtol=1e-3, msg=key)
        assert got["plain"] == ref["plain"], name
        assert got["medusa"][0] == got["plain"], name
        mine = {k: v for k, v in decode[1]["families"][name].items() if k != "bytes"}
        assert _same(mine, {k: v for k, v in got.items() if k != "bytes"}), name
    code, stdout, _ = decode[0]["cli"]
    assert code == 0 and list(map(int, stdout.split())) == reference[FAMILIES[0]]["plain"][0]
    generation = [r for r in decode[0]["bench"] if r["impl"] == "medusa_generate"]
    assert generation and all(r["check"] == "ok" for r in generation), decode[0]["bench"]
