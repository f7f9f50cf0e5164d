"""Shared heads and trimmed vocabularies end to end: the heads module against its math, saved
and loaded in the public directory layout, tensor parallelism (threads standing in for ranks),
lossless greedy and exact sampling through ``generate``, the CLI and the tree calibration; a
Medusa step of shared heads computes logits only over the draft rows."""

from __future__ import annotations

import importlib
import json
import threading

import pytest
import torch
from tiny_models import VOCAB, make_hf_model

from medusa_kernels import MedusaHeads, generate, load_model, save_medusa_heads
from medusa_kernels.checkpoint import load_medusa_heads
from medusa_kernels.ops._linear import linear
from medusa_kernels.parallel import TPGroup, vocab_range

TMAP = torch.tensor(sorted(set(range(0, VOCAB, 3)) | {1, 2, 4, 5, 7}))  # 39 ids, ascending
TREES = ["mc_sim_7b_63", "chain_4", [[0], [1], [0, 0], [1, 0], [0, 0, 0]]]


def make_heads(kind, tmap, layers=1, K=4, d=64, seed=0, lm_head=None):
    """Heads initialised from the lm_head (Medusa's init), then perturbed: guesses right
    sometimes, wrong often."""
    torch.manual_seed(seed)
    heads = MedusaHeads(K, layers, d, VOCAB, kind=kind, token_map=tmap)
    if lm_head is not None:
        heads.init_from_lm_head(lm_head)
    with torch.no_grad():
        heads.w1.normal_(0, 0.3 / d**0.5)
        heads.b1.normal_(0, 0.05)
        if kind == "separate":
            heads.w2.add_(0.02 * torch.randn_like(heads.w2))
    return heads


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    make_hf_model("llama-gqa-llama3rope", seed=2, path=path)
    return path


VARIANTS = [("shared", None, 1), ("shared", TMAP, 1), ("shared", TMAP, 2),
            ("separate", TMAP, 1), ("separate", None, 2)]
VARIANT_IDS = ["shared", "shared-map39", "shared-map39-L2", "separate-map39", "separate-L2"]


@pytest.fixture(scope="module", params=VARIANTS, ids=VARIANT_IDS)
def model(request, base_dir, tmp_path_factory):
    kind, tmap, layers = request.param
    base = load_model(base_dir, dtype=torch.float32).base
    heads = make_heads(kind, tmap, layers, lm_head=base.lm_head.weight)
    out = tmp_path_factory.mktemp("heads")
    save_medusa_heads(heads, out)
    m = load_model(base_dir, medusa=out, dtype=torch.float32)
    m.saved = heads
    m.heads_dir = out
    return m


def test_loaded_heads_equal_the_saved_ones_and_their_math(model):
    heads, saved = model.heads, model.saved
    assert (heads.kind, heads.num_layers, heads.draft_vocab) == \
        (saved.kind, saved.num_layers, saved.draft_vocab)
    assert torch.equal(heads.w1, saved.w1) and torch.equal(heads.b1, saved.b1)
    if saved.token_map is not None:
        assert torch.equal(heads.token_map, saved.token_map)
    # topk == the top-k of the math written out (float64), as token ids
    hidden = torch.randn(6, 64, generator=torch.Generator().manual_seed(1))
    h = hidden.double()[:, None].expand(6, heads.num_heads, 64)
    for layer in range(heads.num_layers):
        h = h + torch.nn.functional.silu(
            torch.einsum("nkd,ked->nke", h, heads.w1[:, layer].double()) + heads.b1[:, layer]
            .double())
    rows = model.base.lm_head.weight if heads.kind == "shared" else None
    if heads.token_map is not None and rows is not None:
        rows = rows[heads.token_map]
    logits = h @ rows.double().T if rows is not None else \
        torch.einsum("nkd,kvd->nkv", h, heads.w2.double())
    _, want = logits.topk(5, dim=-1)
    _, got = heads.topk(hidden, 5)
    assert torch.equal(got, heads.to_token_ids(want))
    torch.testing.assert_close(heads(hidden).double(), logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tree", TREES, ids=lambda t: t if isinstance(t, str) else "custom")
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_medusa_equals_plain_greedy(model, tree, batch):
    g = torch.Generator().manual_seed(batch)
    ids = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (5, 1, 9)[:batch]]
    plain = generate(model, ids, max_new_tokens=24, medusa=False)
    fast = generate(model, ids, max_new_tokens=24, medusa=True, tree=tree)
    assert fast.tokens == plain.tokens
    assert fast.mean_accepted >= 1.0


@pytest.mark.parametrize("sampling", [dict(temperature=0.9), dict(temperature=1.1, top_k=20),
                                      dict(temperature=0.8, top_p=0.9)],
                         ids=["t0.9", "t1.1-k20", "t0.8-p0.9"])
def test_exact_sampling_equals_plain_sampling_for_a_seed(model, sampling):
    """Exact acceptance draws the token at position t with u(seed, t), as plain sampling does:
    the same tokens for a seed whatever the heads draft (test_exact_generate.py's rule)."""
    ids = [[3, 14, 15], [9, 2]]
    for seed in (3, 11):
        kw = dict(max_new_tokens=16, seed=seed, **sampling)
        assert generate(model, ids, tree="mc_sim_7b_63", **kw).tokens == \
            generate(model, ids, medusa=False, **kw).tokens


def test_trees_are_cut_to_the_draft_vocabulary(base_dir, tmp_path):
    """A map of 3 tokens: the default tree keeps ranks < 3; a tree asking rank 3 is refused."""
    heads = make_heads("shared", torch.tensor([4, 9, 50]), K=3)
    save_medusa_heads(heads, tmp_path / "h")
    m = load_model(base_dir, medusa=tmp_path / "h", dtype=torch.float32)
    ids = [[1, 2, 3]]
    assert generate(m, ids, max_new_tokens=10).tokens == \
        generate(m, ids, max_new_tokens=10, medusa=False).tokens
    with pytest.raises(ValueError, match="V = 3"):
        generate(m, ids, max_new_tokens=4, tree=[[0], [3]])


def test_shared_step_computes_logits_over_the_draft_rows_only(model, monkeypatch):
    """CPU Medusa step: shared heads make one [N*K, d] x [d, R] product (R: the map's rows),
    never [K, V] logits, and no head projects through a [K, V, d] weight."""
    if model.heads.kind != "shared":
        pytest.skip("shared heads only")
    shapes = []

    def spy(x, w, b=None):  # every weight product of the references goes through ``linear``
        out = linear(x, w, b)
        shapes.append(tuple(out.shape))
        return out

    for name in ("heads_topk", "shared_heads_topk"):  # the modules (the package's names are
        monkeypatch.setattr(importlib.import_module(f"medusa_kernels.ops.{name}"),  # the ops)
                            "linear", spy)
    hidden = torch.randn(2, 64)
    model.heads.topk(hidden, 4)
    R = model.heads.draft_vocab
    assert shapes and all(s[-1] == R for s in shapes if len(s) >= 2 and s[-1] > 64), shapes


def test_heads_bad_input():
    with pytest.raises(ValueError, match="kind must be one of"):
        MedusaHeads(2, 1, 8, 20, kind="tied")
    with pytest.raises(ValueError, match="token_map must be"):
        MedusaHeads(2, 1, 8, 20, token_map=torch.arange(21))
    with pytest.raises(ValueError, match="strictly ascending"):
        MedusaHeads(2, 1, 8, 20, token_map=torch.tensor([3, 1]))
    heads = MedusaHeads(2, 1, 8, 20, kind="shared")
    with pytest.raises(ValueError, match="attach_lm_head"):
        heads.topk(torch.randn(1, 8), 2)
    with pytest.raises(ValueError, match=r"weight must be \[20, 8\]"):
        heads.attach_lm_head(torch.randn(19, 8))
    heads.attach_lm_head(torch.randn(20, 8))
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 20\]"):
        heads.topk(torch.randn(1, 8), 21)
    trimmed = MedusaHeads(2, 1, 8, 20, token_map=torch.tensor([1, 5, 7]))
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 3\]"):
        trimmed.topk(torch.randn(1, 8), 4)


def test_loader_checks_shared_and_map_files(tmp_path):
    from safetensors.torch import load_file, save_file

    heads = make_heads("shared", TMAP, K=2, d=16)
    save_medusa_heads(heads, tmp_path / "ok")
    state = load_file(tmp_path / "ok" / "medusa_lm_head.safetensors")
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    assert cfg["medusa_head_kind"] == "shared" and "0.1.weight" not in state

    def write(name, state, cfg):
        (tmp_path / name).mkdir()
        save_file(state, tmp_path / name / "medusa_lm_head.safetensors")
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
        return tmp_path / name

    bad_map = dict(state, token_map=TMAP.flip(0).contiguous())
    with pytest.raises(ValueError, match="strictly ascending"):
        load_medusa_heads(write("unsorted", bad_map, cfg))
    with pytest.raises(ValueError, match="1-D int64"):
        load_medusa_heads(write("intmap", dict(state, token_map=TMAP.int()), cfg))
    with pytest.raises(ValueError, match="need vocab_size"):
        load_medusa_heads(write("novocab", state, {k: v for k, v in cfg.items()
                                                   if k != "vocab_size"}))
    with pytest.raises(ValueError, match="medusa_head_kind"):
        load_medusa_heads(write("kind", state, dict(cfg, medusa_head_kind="tied")))
    with pytest.raises(ValueError, match=r"\(separate heads\): missing \['0.1.weight'"):
        load_medusa_heads(write("nokind", state, {k: v for k, v in cfg.items()
                                                  if k != "medusa_head_kind"}))
    sep = make_heads("separate", TMAP, K=2, d=16)
    save_medusa_heads(sep, tmp_path / "sep")
    sstate = load_file(tmp_path / "sep" / "medusa_lm_head.safetensors")
    scfg = json.loads((tmp_path / "sep" / "config.json").read_text())
    with pytest.raises(ValueError, match="holds 38 token ids"):
        load_medusa_heads(write("short", dict(sstate, token_map=TMAP[1:].contiguous()), scfg))


# ----------------------------------------------------------------------------- tensor parallel


class ThreadGroup(TPGroup):
    """Rank ``rank`` of ``world`` threads: all_gather through a shared list and a barrier."""

    def __init__(self, rank, world, shared):
        super().__init__(rank, world, group=object())
        object.__setattr__(self, "_shared", shared)

    def all_gather(self, x):
        slots, barrier = self._shared
        slots[self.rank] = x.clone()
        barrier.wait()
        out = torch.stack(slots)
        barrier.wait()
        return out


def on_ranks(world, fn):
    shared = ([None] * world, threading.Barrier(world))
    results, errors = [None] * world, []

    def run(rank):
        try:
            results[rank] = fn(ThreadGroup(rank, world, shared))
        except Exception as e:  # noqa: BLE001 (re-raised below)
            errors.append(e)
            shared[1].abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("kind,tmap,layers", [("shared", None, 1), ("shared", TMAP, 1),
                                              ("shared", TMAP, 2), ("separate", TMAP, 1)],
                         ids=["shared", "shared-map", "shared-map-L2", "separate-map"])
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("fresh", [False, True], ids=["trained", "fresh-int-ties"])
def test_tensor_parallel_topk_equals_one_process(tmp_path, kind, tmap, layers, world, fresh):
    """Heads loaded per rank from the saved directory (shared: attached to the rank's lm_head
    rows) merge to what one process returns. ``fresh``: zero ResBlocks, integer lm_head and
    hidden states (exact logits in any matmul shape), duplicated lm_head rows across ranks:
    ties go to the lower id as in one process."""
    g = torch.Generator().manual_seed(4)
    lm_head = torch.randn(VOCAB, 32, generator=g)
    hidden = torch.randn(5, 32, generator=g)
    if fresh:
        lm_head = torch.randint(-2, 3, (VOCAB, 32), generator=g).float()
        lm_head[60] = lm_head[2]
        lm_head[90:] = lm_head[1]
        hidden = torch.randint(-2, 3, (5, 32), generator=g).float()
    hidden[0] = 0  # every logit 0: ties everywhere
    heads = make_heads(kind, tmap, layers, K=3, d=32, lm_head=lm_head)
    if fresh:
        heads.init_from_lm_head(lm_head)
    save_medusa_heads(heads, tmp_path)
    one = load_medusa_heads(tmp_path, torch.float32)
    if kind == "shared":
        one.attach_lm_head(lm_head)
    want = one.topk(hidden, 7)

    def rank_topk(tp):
        h = load_medusa_heads(tmp_path, torch.float32, tp=tp)
        if kind == "shared":
            start, stop = vocab_range(VOCAB, tp.world, tp.rank)
            h.attach_lm_head(lm_head[start:stop])
        return h.topk(hidden, 7), h(hidden)

    for (values, ids), logits in on_ranks(world, rank_topk):
        assert torch.equal(ids, want[1])
        torch.testing.assert_close(values, want[0])
        torch.testing.assert_close(logits, one(hidden), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- CLI, calibration


def test_generate_and_calibrate_cli_with_trimmed_shared_heads(model, tmp_path, capsys):
    if model.heads.kind != "shared" or model.heads.token_map is None:
        pytest.skip("one variant is enough")
    from medusa_kernels.calibrate import main as tree_main
    from medusa_kernels.generate import main as generate_main

    base = ["--model", model.model_dir, "--medusa", str(model.heads_dir),
            "--input-ids", "1,2,3", "--max-new-tokens", "12", "--device", "cpu"]
    assert generate_main(base) == 0
    fast = capsys.readouterr().out
    assert generate_main(base + ["--no-medusa"]) == 0
    assert capsys.readouterr().out.split("\n")[0] == fast.split("\n")[0]
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([[5, 6, 7], [40, 41], [3, 99, 12, 8]]))
    out = tmp_path / "tree.json"
    assert tree_main(["calibrate", "--model", model.model_dir, "--medusa", str(model.heads_dir),
                      "--prompts", str(prompts), "--nodes", "7", "--topk", "4",
                      "--max-new-tokens", "12", "--device", "cpu", "--out", str(out),
                      "--no-progress", "--measure"]) == 0
    data = json.loads(out.read_text())
    assert len(data["choices"]) == 7 and data["measured_accepted"] >= 1
    assert tree_main(["calibrate", "--model", model.model_dir, "--medusa",
                      str(model.heads_dir), "--prompts", str(prompts), "--topk", "40",
                      "--device", "cpu"]) == 2  # 40 > the 39 draft tokens
    assert "draft vocabulary (39)" in capsys.readouterr().err


@pytest.mark.parametrize("kind,R", [("separate", None), ("separate", 39), ("shared", None),
                                    ("shared", 39)])
def test_bytes_per_step_match_the_bench_formula(kind, R):
    from medusa_kernels.bench.heads_topk import head_bytes

    heads = make_heads(kind, None if R is None else TMAP, K=3, d=16)
    if kind == "shared":
        heads.attach_lm_head(torch.randn(VOCAB, 16))
    got = heads.projection_bytes() + heads.resblock_bytes()
    assert got == head_bytes(kind, 3, 16, VOCAB, R, 4)
    assert heads.projection_bytes(1) == (R or VOCAB) * 16 * 4  # one head: one projection
