"""Tree calibration: greedy growth equals brute force, the expected-length formula, the
hardware-aware tree size (``--nodes auto``), the CLI."""

from __future__ import annotations

import json
import random

import pytest
import torch

from medusa_kernels.calibrate import (
    best_size,
    expected_accepted,
    grow_tree,
    main,
    max_nodes,
    path_value,
    speed_table,
    step_times,
)
from medusa_kernels.tree import build_tree


def hand_table(K: int, R: int, seed: int = 0) -> list[list[float]]:
    """Accuracies falling with rank and depth, no ties among path products (random jitter)."""
    rng = random.Random(seed)
    return [[0.8 * 0.75**k * 0.45**r * (1 + 0.05 * rng.random()) for r in range(R)]
            for k in range(K)]


def all_trees(K: int, R: int, n: int) -> set[frozenset]:
    """Every prefix-closed set of exactly n paths (depth <= K, ranks < R)."""
    trees = {frozenset()}
    for _ in range(n):
        grown = set()
        for t in trees:
            parents = [()] + [p for p in t if len(p) < K]
            for par in parents:
                for r in range(R):
                    c = par + (r,)
                    if c not in t:
                        grown.add(t | {c})
        trees = grown
    return trees


@pytest.mark.parametrize("K,R,n", [(3, 3, 1), (3, 3, 3), (3, 3, 5), (3, 3, 6), (2, 4, 6),
                                   (4, 2, 6)], ids=lambda v: str(v))
@pytest.mark.parametrize("seed", [0, 1])
def test_grow_tree_equals_brute_force(K, R, n, seed):
    acc = hand_table(K, R, seed)
    best = max(all_trees(K, R, n), key=lambda t: expected_accepted(t, acc))
    got = grow_tree(acc, n)
    assert {tuple(p) for p in got} == set(best)
    assert expected_accepted(got, acc) == pytest.approx(expected_accepted(best, acc))
    build_tree(got, num_heads=K, topk=R)  # a valid tree


def test_grow_tree_order_depth_and_errors():
    acc = hand_table(4, 10)
    tree = grow_tree(acc, 63)
    assert len(tree) == 63
    assert tree == sorted(tree, key=lambda p: (len(p), p))
    assert max(len(p) for p in grow_tree(acc, 63, max_depth=2)) == 2
    with pytest.raises(ValueError, match="nodes"):
        grow_tree(acc, -1)
    with pytest.raises(ValueError, match="nodes fit"):
        grow_tree(hand_table(1, 2), 3)


def test_expected_accepted_formula():
    acc = hand_table(3, 3)
    chain = [[0], [0, 0], [0, 0, 0]]
    a = [row[0] for row in acc]
    assert expected_accepted(chain, acc) == pytest.approx(1 + a[0] + a[0] * a[1]
                                                          + a[0] * a[1] * a[2])
    assert expected_accepted([], acc) == 1.0
    assert path_value([2, 1], acc) == pytest.approx(acc[0][2] * acc[1][1])


def test_expected_accepted_matches_simulation():
    """Independent heads, each rank r right with probability acc[k][r]: mean longest accepted
    path of the tree + 1 equals the formula."""
    acc = [[0.6 * a for a in row] for row in hand_table(3, 4, seed=3)]  # rows sum below 1
    tree = grow_tree(acc, 12)
    paths = {tuple(p) for p in tree}
    g = torch.Generator().manual_seed(0)
    n = 20000
    probs = torch.tensor([row + [1 - sum(row)] for row in acc], dtype=torch.float64)
    right = torch.stack([torch.multinomial(probs[k], n, replacement=True, generator=g)
                         for k in range(3)], 1).tolist()  # rank that is right (R = none)
    total = 0
    for draw in right:
        depth = 0
        while depth < 3 and tuple(draw[:depth + 1]) in paths:
            depth += 1
        total += 1 + depth
    assert total / n == pytest.approx(expected_accepted(tree, acc), abs=0.02)


def test_speed_table_picks_the_best_estimated_speedup():
    """Step time a + b * nodes (a CPU-like cost): the chosen size maximises expected accepted /
    step time over the sizes tried; a flat cost (a GPU-like one) takes the biggest tree."""
    acc = hand_table(4, 6)
    sizes = [0, 1, 3, 7, 15, 31, 63]
    plain = 1.0
    for a, b, want in ((1.0, 0.05, None), (1.0, 0.0, 63)):
        times = [a + b * n for n in sizes]
        rows = speed_table(acc, sizes, plain, times)
        assert [r["nodes"] for r in rows] == sizes
        est = [expected_accepted(grow_tree(acc, n), acc) * plain / t
               for n, t in zip(sizes, times, strict=True)]
        assert [r["est_speedup"] for r in rows] == pytest.approx(est, abs=1e-4)
        assert rows[0]["expected_accepted"] == 1.0  # root only
        chosen = best_size(rows)
        near_best = [n for n, e in zip(sizes, est, strict=True) if e >= 0.98 * max(est)]
        assert chosen == (want if want is not None else min(near_best))
        assert best_size(rows, tolerance=0.0) == sizes[est.index(max(est))]
        if want is None:
            assert 0 < chosen < 63  # the cost makes a middle size best
    tied = [{"nodes": 7, "est_speedup": 1.5}, {"nodes": 3, "est_speedup": 1.5}]
    assert best_size(tied) == 3  # a tie goes to the smaller tree
    near = [{"nodes": 7, "est_speedup": 1.49}, {"nodes": 15, "est_speedup": 1.51},
            {"nodes": 31, "est_speedup": 1.3}]
    assert best_size(near) == 7 and best_size(near, tolerance=0.0) == 15  # within 2%: a tie
    assert max_nodes(acc) == 6 + 36 + 216 + 1296 and max_nodes(acc, max_depth=1) == 6


def test_step_times_tiny_model():
    from medusa_kernels.bench.e2e import SHAPES, random_model
    from medusa_kernels.model import ModelConfig

    model = random_model(ModelConfig(**SHAPES["tiny"]), 3, torch.float32, "cpu")
    trees = [grow_tree(hand_table(3, 4), n) for n in (1, 15)]
    for batch in (1, 3):
        plain_s, medusa_s = step_times(model, trees, context=37, quick=True, batch=batch)
        assert len(medusa_s) == 2 and plain_s > 0 and all(t > 0 for t in medusa_s)
    with pytest.raises(ValueError, match="context"):
        step_times(model, trees, context=0, quick=True)
    with pytest.raises(ValueError, match="batch"):
        step_times(model, trees, context=5, quick=True, batch=0)


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    from medusa_kernels.demo.build import main as build

    out = tmp_path_factory.mktemp("demo_quick")
    assert build(["--quick", "--out", str(out)]) == 0
    return out


def test_cli_calibrate(quick_demo, tmp_path):
    from medusa_kernels.checkpoint import load_model
    from medusa_kernels.decoding import generate
    from medusa_kernels.demo import path

    model_dir, heads_dir = path(quick_demo)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["def f(x):\n    return", "import os\n"]))
    measure_on = tmp_path / "measure.json"
    measure_on.write_text(json.dumps(["class B(object):\n", "for i in range("]))
    out = tmp_path / "tree.json"
    rc = main(["calibrate", "--model", model_dir, "--medusa", heads_dir, "--prompts",
               str(prompts), "--nodes", "7", "--topk", "4", "--max-new-tokens", "16",
               "--device", "cpu", "--out", str(out), "--measure",
               "--measure-prompts", str(measure_on)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert len(data["choices"]) == 7
    acc = data["accuracies"]
    assert all(0 <= a <= 1 for row in acc for a in row)
    assert all(sum(row) <= 1 + 1e-6 for row in acc)  # ranks are distinct tokens
    assert data["expected_accepted"] == pytest.approx(
        expected_accepted(data["choices"], acc), abs=1e-3)
    assert data["measured_accepted"] >= 1 and data["default_measured_accepted"] >= 1
    assert data["measured_on"] == str(measure_on)
    m = load_model(model_dir, medusa=heads_dir, dtype=torch.float32)
    ids = m.tokenizer().encode("class A:\n").ids
    plain = generate(m, [ids], max_new_tokens=12, medusa=False).tokens
    assert generate(m, [ids], max_new_tokens=12, tree=str(out)).tokens == plain


def test_cli_calibrate_auto_nodes(quick_demo, tmp_path, capsys):
    from medusa_kernels.demo import path

    model_dir, heads_dir = path(quick_demo)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["def f(x):\n    return", "import os\n"]))
    out = tmp_path / "tree.json"
    args = ["calibrate", "--model", model_dir, "--medusa", heads_dir, "--prompts", str(prompts),
            "--topk", "3", "--max-new-tokens", "12", "--device", "cpu", "--out", str(out)]
    assert main(args + ["--nodes", "auto", "--auto-nodes", "1,5,100000", "--batch", "2"]) == 0
    data = json.loads(out.read_text())
    speed = data["speed"]
    assert [r["nodes"] for r in speed["sizes"]] == [1, 5]  # sizes the heads cannot fill: dropped
    assert speed["plain_step_ms"] > 0 and all(r["step_ms"] > 0 for r in speed["sizes"])
    assert speed["batch"] == 2
    from medusa_kernels.checkpoint import load_model
    from medusa_kernels.training.data import read_prompts

    ids = read_prompts(str(prompts), load_model(model_dir).tokenizer())
    assert speed["context"] == round(sum(map(len, ids)) / len(ids) + 12 / 2)
    assert len(data["choices"]) == best_size(speed["sizes"])
    err = capsys.readouterr().err
    assert "<- chosen" in err
    assert "head accuracies" in err and "step timing" in err  # progress bars (tqdm, with ETA)
    assert main(args + ["--nodes", "many"]) == 2  # one line, no traceback
    assert "error: --nodes must be an integer or 'auto'" in capsys.readouterr().err
    assert main(args + ["--nodes", "auto", "--auto-nodes", "100000"]) == 2
    assert "error: no size in --auto-nodes fits" in capsys.readouterr().err


# --------------------------------------------------------------------------- policy tables


def test_step_times_stops_at_the_first_tree_over_its_limit():
    from medusa_kernels.bench.e2e import SHAPES, random_model
    from medusa_kernels.model import ModelConfig

    model = random_model(ModelConfig(**SHAPES["tiny"]), 3, torch.float32, "cpu")
    trees = [grow_tree(hand_table(3, 4), n) for n in (1, 3, 15)]
    plain_s, medusa_s = step_times(model, trees, context=20, quick=True, limits=[0.0, 9, 9])
    assert plain_s > 0 and medusa_s[0] > 0 and medusa_s[1:] == [None, None]
    plain_s, medusa_s = step_times(model, trees, context=20, quick=True, limits=[99] * 3)
    assert all(t > 0 for t in medusa_s)


def test_policy_table_rows_and_choice():
    from medusa_kernels.bench.e2e import SHAPES, random_model
    from medusa_kernels.calibrate import TOLERANCE, policy_table
    from medusa_kernels.model import ModelConfig
    from medusa_kernels.policy import TreePolicy

    model = random_model(ModelConfig(**SHAPES["tiny"]), 3, torch.float32, "cpu")
    acc = hand_table(3, 4)
    with pytest.raises(ValueError, match="ascending"):
        policy_table(model, acc, [3, 1], [1], context=16, quick=True)
    policy = policy_table(model, acc, [1, 3], [1, 3], context=16, quick=True,
                          meta={"device": "test"})
    assert policy.meta["speedup"] == "expected accepted"
    measured = policy_table(model, acc, [1, 3], [2], context=16, quick=True,
                            accepted=[1.5, 2.0])
    assert [r.info["measured_accepted"] for r in measured.rows if r.tree] == [1.5, 2.0][
        : len(measured.rows) - 1]
    row = measured.rows[1]
    assert row.speedup == pytest.approx(1.5 * measured.rows[0].info["step_ms"]
                                        / row.info["step_ms"], rel=1e-3)
    assert policy.batches == [1, 3] and policy.tolerance == TOLERANCE
    assert policy.meta["device"] == "test" and policy.meta["sizes"] == [1, 3]
    for batch in (1, 3):
        rows = [r for r in policy.rows if r.batch == batch]
        assert rows[0].tree == () and rows[0].speedup == 1.0  # plain decoding competes
        plain_ms = rows[0].info["step_ms"]
        for r in rows[1:]:
            want = r.info["expected_accepted"] * plain_ms / r.info["step_ms"]
            assert r.speedup == pytest.approx(want, rel=1e-3)
            assert r.info["expected_accepted"] == pytest.approx(
                expected_accepted(grow_tree(acc, r.info["nodes"]), acc), abs=1e-4)
        assert len(rows) + len(policy.meta["pruned"].get(str(batch), [])) == 3
        best = max(r.speedup for r in rows)
        chosen = policy.choose(batch)
        speed = next(r.speedup for r in rows if r.tree == chosen)
        assert speed >= best * (1 - TOLERANCE)
    assert TreePolicy(policy.to_json()["rows"], tolerance=TOLERANCE).choose(3) == policy.choose(3)


def test_cli_calibrate_batches_writes_a_policy_generate_uses(quick_demo, tmp_path, capsys):
    from medusa_kernels.checkpoint import load_model
    from medusa_kernels.decoding import generate
    from medusa_kernels.demo import path
    from medusa_kernels.policy import TreePolicy

    model_dir, heads_dir = path(quick_demo)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["def f(x):\n    return", "import os\n"]))
    out, tree_out = tmp_path / "policy.json", tmp_path / "tree.json"
    args = ["calibrate", "--model", model_dir, "--medusa", heads_dir, "--prompts", str(prompts),
            "--topk", "3", "--max-new-tokens", "8", "--device", "cpu", "--no-progress"]
    tree_out.write_text(json.dumps({"choices": [[0]], "accuracies": hand_table(2, 3)}))
    assert main(args + ["--nodes", "auto", "--auto-nodes", "1,3", "--batches", "2,1",
                        "--accuracies", str(tree_out), "--context", "12", "--out", str(out)]) == 0
    policy = TreePolicy.load(out)
    assert policy.batches == [1, 2] and {r.context for r in policy.rows} == {12}
    assert "--batches 2,1" in policy.meta["command"] and policy.meta["accuracies"] == str(tree_out)
    assert {r.tree for r in policy.rows if r.batch == 1} >= {()}
    err = capsys.readouterr().err
    assert "batch    1:" in err and "wrote" in err
    assert all("measured_accepted" in r.info for r in policy.rows if r.tree)
    assert policy.meta["speedup"] == "measured accepted"
    m = load_model(model_dir, medusa=heads_dir, dtype=torch.float32)
    ids = [m.tokenizer().encode(t).ids for t in ("class A:\n", "x = [")]
    plain = generate(m, ids, max_new_tokens=12, medusa=False).tokens
    r = generate(m, ids, max_new_tokens=12, tree=str(out))
    assert r.tokens == plain and r.tree == "policy.json"
    for bad, message in ((["--nodes", "7", "--batches", "1,2"], "--batches needs --nodes auto"),
                         (["--nodes", "auto", "--batches", "0,2"], "--batches must list"),
                         (["--nodes", "auto", "--batches", "x"], "--batches must be comma"),
                         (["--nodes", "auto", "--batches", "1", "--accuracies", str(prompts)],
                          "needs \"accuracies\""),
                         (["--nodes", "auto", "--batches", "1", "--rounds", "0"],
                          "--rounds must be >= 1")):
        assert main(args + bad) == 2
        assert message in capsys.readouterr().err
