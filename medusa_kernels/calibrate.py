"""Tree calibration: grow a Medusa tree from measured per-head top-k accuracies.

    python -m medusa_kernels.tree calibrate --model DIR --medusa DIR --prompts FILE --nodes 63

1. ``measure_accuracies``: plain greedy decoding of the prompts; at every generated position,
   head k's rank-r token is a hit when it equals the base model's token k + 2 ahead.
   ``acc[k][r]`` = hit rate (K heads x R ranks).
2. ``grow_tree``: a node (path of ranks ``[r0, r1, ...]``) is accepted with probability
   ``prod_i acc[i][r_i]`` (heads taken independent, as in the paper's mc_sim trees); the tree
   grows by the best frontier node until it holds ``nodes`` nodes.
3. ``expected_accepted``: 1 (the root, always kept) + the sum of the node values: nodes of one
   depth are mutually exclusive, so the expected accepted depth is the sum of their values.
4. ``--nodes auto`` (the paper's hardware-aware choice of tree size): a bigger tree accepts more
   per step but costs more per step, a little on a GPU (a step reads the weights once, whatever
   T) and a lot on a CPU (compute grows with T). ``step_times`` times a plain decode step and a
   Medusa step with the grown tree of each size in ``AUTO_NODES`` on this model and device
   (CUDA graphs on CUDA, as ``generate`` replays them); ``speed_table`` estimates each size's
   speedup over plain decoding as expected accepted x plain step time / Medusa step time, and
   keeps the best (the smallest size within 2% of it: closer than that is timing noise).
   ``--batch B`` times B sequences per step: the bigger the batch, the sooner a step stops
   being bound by reading the weights, and the smaller the best tree.
5. ``--nodes auto --batches 1,2,4,...`` (``policy_table``): the same timing at every batch
   size, written as a tree policy table (``policy.py``): one row per batch and timed size with
   its estimated speedup, plus the empty tree (plain decoding, 1.0), which ``generate`` reads
   to pick the tree before each step. The speedup uses each tree's accepted tokens per step
   measured by decoding ``ACCEPT_PROMPTS`` prompts with it (``batched_accepted``; the formula
   of step 3 overrates big trees; ``--expected`` uses it anyway). At each batch the sizes are
   timed smallest first; a size whose step costs more than ``PRUNE`` x its accepted tokens'
   worth of plain steps cannot beat plain decoding, so the bigger sizes are skipped there. On
   a CPU with one torch thread the steps are timed in process CPU time (``cpu_clock``), which
   other processes on a shared machine hardly change, and paired per round with plain's.

Output JSON: {"choices": [...], "expected_accepted": x, "accuracies": [[...]]} (with ``auto``
also "speed": the timed sizes), which ``generate --tree FILE`` takes; with ``--batches``, the
policy table ({"version", "tolerance", "meta", "rows"}), which ``generate --tree FILE`` takes
too. ``--accuracies FILE`` reuses the accuracies of a tree JSON written before (no decoding).
"""

from __future__ import annotations

import argparse
import datetime
import heapq
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence

import torch

from ._cli import DEBUG_HELP, Parser, check_device, check_dir, check_file, run_cli
from ._cli import progress as bar
from .demo import MEASURE_SEED
from .demo import prompts as demo_prompts
from .training import data
from .tree import tree_label


def path_value(path: Sequence[int], acc: Sequence[Sequence[float]]) -> float:
    """Probability that every token on ``path`` is accepted: prod_i acc[i][path[i]]."""
    return math.prod(acc[i][r] for i, r in enumerate(path))


def expected_accepted(choices: Sequence[Sequence[int]], acc: Sequence[Sequence[float]]) -> float:
    """Expected tokens gained per step with tree ``choices``: 1 + sum of node values."""
    return 1.0 + sum(path_value(p, acc) for p in choices)


def grow_tree(acc: Sequence[Sequence[float]], nodes: int, max_depth: int | None = None
              ) -> list[list[int]]:
    """Greedy tree of ``nodes`` paths (root excluded) maximising ``expected_accepted``.

    acc: [K][R] hit rates of head k's rank-r token. Frontier = children of the tree's nodes;
    the best-valued one joins (ties: shallower, then smaller ranks). Since a child's value is
    at most its parent's, the result is the top-``nodes`` paths by value: optimal for its size.
    Paths are returned in (depth, path) order.
    """
    K = len(acc) if max_depth is None else min(max_depth, len(acc))
    R = len(acc[0]) if K else 0
    if nodes < 0:
        raise ValueError(f"nodes must be >= 0, got {nodes}")
    if nodes > 0 and K == 0:
        raise ValueError("accuracies must hold at least one head")
    frontier: list[tuple[float, int, tuple[int, ...]]] = []

    def push(path: tuple[int, ...]) -> None:
        heapq.heappush(frontier, (-path_value(path, acc), len(path), path))

    for r in range(R):
        push((r,))
    tree: list[tuple[int, ...]] = []
    while len(tree) < nodes and frontier:
        _, _, path = heapq.heappop(frontier)
        tree.append(path)
        if len(path) < K:
            for r in range(R):
                push(path + (r,))
    if len(tree) < nodes:
        raise ValueError(f"only {len(tree)} nodes fit {K} heads x top-{R}, asked for {nodes}")
    return [list(p) for p in sorted(tree, key=lambda p: (len(p), p))]


@torch.no_grad()
def measure_accuracies(
    model, prompts: Sequence[Sequence[int]], topk: int = 10, max_new_tokens: int = 128,
    eos_token_id=None, progress: bool = False,
) -> tuple[list[list[float]], int]:
    """Head k's rank-r hit rate against the base model's greedy token k + 2 ahead.

    model: ``MedusaModel`` with heads. prompts: token id lists. eos_token_id: as ``generate``
    takes it (None: the checkpoint's). Returns (acc [K][topk], number of positions counted per
    head). ``progress``: a bar over the prompts.
    """
    from .decoding import generate

    if model.heads is None:
        raise ValueError("model has no Medusa heads: load_model(..., medusa=DIR)")
    base, heads, device = model.base, model.heads, model.device
    K = heads.num_heads
    hits = torch.zeros(K, topk, dtype=torch.float64)
    counts = torch.zeros(K, dtype=torch.float64)
    for prompt in bar(prompts, desc="head accuracies", unit="prompt", enabled=progress):
        r = generate(model, [list(prompt)], max_new_tokens=max_new_tokens, medusa=False,
                     eos_token_id=eos_token_id)
        seq = torch.tensor(list(prompt) + r.tokens[0], device=device)
        P, L = len(prompt), len(seq)
        cache = base.new_cache(1, L)
        hidden = base.prefill(seq[None], torch.tensor([L], dtype=torch.int32, device=device),
                              cache)[0]
        pos = torch.arange(P - 1, L, device=device)  # hidden whose next token is generated
        _, idx = heads.topk(hidden[pos], topk)  # [N, K, topk]
        for k in range(K):
            tgt = pos + k + 2
            ok = tgt < L
            if ok.any():
                hit = idx[ok, k] == seq[tgt[ok]][:, None]  # [n, topk]
                hits[k] += hit.double().sum(0).cpu()
                counts[k] += int(ok.sum())
    acc = hits / counts.clamp(min=1)[:, None]
    return acc.tolist(), int(counts.min())


# tree sizes (nodes besides the root) that --nodes auto times and chooses among
AUTO_NODES = (1, 3, 7, 15, 23, 31, 47, 63, 95, 127)


def max_nodes(acc: Sequence[Sequence[float]], max_depth: int | None = None) -> int:
    """Most paths a tree can have with these heads and ranks: sum over depths d of R^d."""
    K = len(acc) if max_depth is None else min(max_depth, len(acc))
    R = len(acc[0]) if K else 0
    return sum(R**d for d in range(1, K + 1))


def cpu_clock():
    """The clock CPU step timings use: this process's CPU time when torch runs one thread
    (steps cost the same whatever else a shared machine runs; the CPU mode's setting), else
    wall-clock time (several threads: the CPU time would add them up)."""
    return time.process_time if torch.get_num_threads() == 1 else time.perf_counter


@torch.inference_mode()
def step_times(model, trees: Sequence[Sequence[Sequence[int]]], context: int,
               quick: bool = False, batch: int = 1, progress: bool = False,
               limits: Sequence[float] | None = None, rounds: int | None = None
               ) -> tuple[float, list[float | None]]:
    """Median seconds of one plain decode step and of one Medusa step with each tree.

    ``batch`` sequences with ``context`` cached tokens each (random K/V, ``seqlens`` reset
    before every call), random root tokens and hidden states. CUDA: each step replayed from a
    CUDA graph, as ``generate`` does, timed by ``triton.testing.do_bench`` (median). CPU
    (``cpu_clock``: the process's CPU time with one thread): the steps take turns, a few calls
    each per round (enough for ~50 ms; ``rounds``, default 5; ``quick``: ~20 ms, 3 rounds); a
    tree's time is plain's median times the median over rounds of its time over plain's in the
    same round, so a drifting machine cancels out of the ratio. ``limits`` (per tree, with the trees
    smallest first): once a tree's first timed step costs more than limits[i] plain steps, the
    trees after it are not timed (their times are None). ``progress``: a bar.
    """
    from .bench.e2e import step_fns
    from .tree import build_tree

    if model.heads is None:
        raise ValueError("model has no Medusa heads: load_model(..., medusa=DIR)")
    if context < 1:
        raise ValueError(f"context must be >= 1 cached token, got {context}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1 sequence, got {batch}")
    device = model.device
    buffers = [build_tree(t, model.heads.num_heads, None, device) for t in trees]
    fns = step_fns(model, buffers, batch, context)  # plain first
    cuda = device.type == "cuda"
    clock = cpu_clock()
    if cuda:
        from .bench._common import BenchContext, graphed, measure

        ctx = BenchContext(device=device, dtype=model.dtype)

        def once(fn):  # a graph replay, timed by do_bench (median)
            return 1e-6 * measure(graphed(fn), ctx)[0]
    else:
        def once(fn):  # the fastest of 3 calls after a warm-up (noise only slows a call)
            fn()
            best = math.inf
            for _ in range(3):
                start = clock()
                fn()
                best = min(best, clock() - start)
            return best

    times: list[float | None] = []
    over = False  # a tree was over its limit: the bigger ones are skipped
    with bar(total=len(fns), desc=f"step timing (batch {batch})", unit="tree",
             enabled=progress) as ticks:
        for i, fn in enumerate(fns):  # a first time each, plain then the trees smallest first
            times.append(None if over else once(fn))
            if i > 0 and limits is not None and times[i] is not None:
                over = times[i] > limits[i - 1] * times[0]
            ticks.update()
    if not cuda:  # refine: rounds of calls, the steps taking turns
        rounds, target = (3, 0.02) if quick else (rounds or 5, 0.05)
        timed = [i for i, t in enumerate(times) if t is not None]
        calls = {i: max(1, min(25, round(target / max(times[i], 1e-9)))) for i in timed}
        samples: dict[int, list[float]] = {i: [] for i in timed}
        with bar(total=rounds * sum(calls.values()), desc=f"step timing (batch {batch})",
                 unit="step", enabled=progress) as ticks:
            for _ in range(rounds):
                for i in timed:
                    start = clock()
                    for _ in range(calls[i]):
                        fns[i]()
                    samples[i].append((clock() - start) / calls[i])
                    ticks.update(calls[i])
        plain = samples[0]  # each tree against plain in the same round (paired): drift cancels
        times[0] = statistics.median(plain)
        for i in timed[1:]:
            times[i] = times[0] * statistics.median(t / p for t, p in zip(samples[i], plain,
                                                                          strict=True))
    return times[0], times[1:]


def speed_table(acc: Sequence[Sequence[float]], sizes: Sequence[int], plain_s: float,
                medusa_s: Sequence[float], max_depth: int | None = None) -> list[dict]:
    """One row per tree size: nodes (besides the root), expected accepted tokens per step, step
    time and the estimated speedup over plain decoding (expected x plain_s / step time)."""
    rows = []
    for n, t in zip(sizes, medusa_s, strict=True):
        expected = expected_accepted(grow_tree(acc, n, max_depth), acc)
        rows.append({"nodes": n, "expected_accepted": round(expected, 4),
                     "step_ms": round(1e3 * t, 4), "est_speedup": round(expected * plain_s / t, 4)})
    return rows


# a tree whose step costs more than PRUNE x (its expected accepted tokens) plain steps is
# estimated at < 1 / PRUNE of plain's speed: it and the bigger trees are not timed further
PRUNE = 1.25
TOLERANCE = 0.02  # estimated speedups this close to the best are ties (timing noise)


def policy_table(model, acc: Sequence[Sequence[float]], sizes: Sequence[int],
                 batches: Sequence[int], context: int, max_depth: int | None = None,
                 quick: bool = False, progress: bool = False, meta: dict | None = None,
                 rounds: int | None = None, accepted: Sequence[float] | None = None):
    """A ``TreePolicy`` measured on ``model``'s device: at each batch size, the step time of
    plain decoding and of the grown tree of each size in ``sizes`` (ascending; pruned as the
    module doc says), each tree's estimated speedup (accepted tokens per step x plain step
    time / its step time, with ``accepted`` per size when given, measured, else the expected
    accepted of the accuracies); rows of the empty tree (plain, 1.0) and of every timed size.
    ``meta`` is stored."""
    from .policy import TreePolicy

    sizes = list(sizes)
    if sizes != sorted(sizes):
        raise ValueError(f"sizes must be ascending, got {sizes}")
    trees = [grow_tree(acc, n, max_depth) for n in sizes]
    expected = [expected_accepted(t, acc) for t in trees]
    gain = list(accepted) if accepted is not None else expected
    rows, pruned = [], {}
    for batch in batches:
        plain_s, medusa_s = step_times(model, trees, context, quick, batch, progress,
                                       limits=[PRUNE * a for a in gain], rounds=rounds)
        rows.append({"batch": batch, "context": context, "tree": [], "speedup": 1.0, "nodes": 0,
                     "expected_accepted": 1.0, "step_ms": round(1e3 * plain_s, 4)})
        for i, (n, tree, t) in enumerate(zip(sizes, trees, medusa_s, strict=True)):
            if t is None:
                pruned.setdefault(str(batch), []).append(n)
                continue
            row = {"batch": batch, "context": context, "tree": tree,
                   "speedup": round(gain[i] * plain_s / t, 4), "nodes": n,
                   "expected_accepted": round(expected[i], 4)}
            if accepted is not None:
                row["measured_accepted"] = round(accepted[i], 4)
            rows.append(row | {"step_ms": round(1e3 * t, 4),
                               "plain_step_ms": round(1e3 * plain_s, 4)})
    meta = dict(meta or {}, context=context, sizes=sizes, pruned=pruned,
                speedup="measured accepted" if accepted is not None else "expected accepted")
    return TreePolicy(rows, meta, tolerance=TOLERANCE)


def batched_accepted(model, prompts, trees, max_new_tokens: int, eos_token_id=None,
                     progress: bool = False) -> list[float]:
    """Mean accepted tokens per step (per running sequence) of greedy Medusa decoding of all
    ``prompts`` at once with each tree (acceptance does not depend on the batch)."""
    from .decoding import generate

    out = []
    for tree in bar(trees, desc="accepted per tree", unit="tree", enabled=progress):
        r = generate(model, [list(p) for p in prompts], max_new_tokens=max_new_tokens,
                     tree=tree, eos_token_id=eos_token_id)
        out.append(r.mean_accepted)
    return out


def best_size(rows: Sequence[dict], tolerance: float = TOLERANCE) -> int:
    """The smallest size whose estimated speedup is within ``tolerance`` (relative) of the
    best: near the optimum the curve is flat, and closer than timing noise is a tie."""
    best = max(r["est_speedup"] for r in rows)
    return min(r["nodes"] for r in rows if r["est_speedup"] >= best * (1 - tolerance))


# the demo: held-out prompts to calibrate on and other held-out prompts to measure on
CALIBRATION_PROMPTS, MEASURE_PROMPTS = 64, 64
ACCEPT_PROMPTS = 32  # --batches: prompts decoded (at once) with each tree for its acceptance


def measured_accepted(model, prompts, tree, max_new_tokens: int, eos_token_id=None,
                      progress: bool = False) -> float:
    """Mean accepted tokens per step of greedy Medusa decoding over all prompts' steps."""
    from .decoding import generate

    counts = []
    for p in bar(prompts, desc=f"accepted ({tree_label(tree)} tree)", unit="prompt",
                 enabled=progress):
        r = generate(model, [list(p)], max_new_tokens=max_new_tokens, medusa=True, tree=tree,
                     eos_token_id=eos_token_id)
        counts += [n for step in r.accepted_per_step for n in step if n > 0]
    return sum(counts) / max(len(counts), 1)


PROG = "python -m medusa_kernels.tree calibrate"


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="base model dir (default: the demo model)")
    p.add_argument("--medusa", default=None, help="heads dir (default: heads in --model/demo)")
    p.add_argument("--prompts", default=None,
                   help=".jsonl/.json prompts or a text file, one a line (default with the demo: "
                        "held-out stdlib prompts)")
    p.add_argument("--nodes", default="63",
                   help="tree nodes besides the root, or 'auto': time each size of "
                        "--auto-nodes on this device and keep the fastest (est. speedup)")
    p.add_argument("--auto-nodes", default=",".join(map(str, AUTO_NODES)),
                   help="sizes --nodes auto tries, comma-separated")
    p.add_argument("--batch", type=int, default=1,
                   help="sequences decoded together, for the step timing of --nodes auto (a "
                        "bigger batch makes each tree node dearer)")
    p.add_argument("--batches", default=None,
                   help="with --nodes auto: comma-separated batch sizes (e.g. 1,2,4,8,16,32,64) "
                        "to time every size at; writes a tree policy table (the tree per batch "
                        "size, plain decoding included) that generate --tree FILE uses")
    p.add_argument("--expected", action="store_true",
                   help="with --batches: estimate each tree's accepted tokens per step from the "
                        "accuracies (the formula) instead of decoding up to "
                        f"{ACCEPT_PROMPTS} of the prompts with it (measured: what decoding gets; "
                        "the formula overrates big trees)")
    p.add_argument("--rounds", type=int, default=5,
                   help="CPU step timing: rounds of calls per tree (more: steadier on a busy "
                        "machine, slower)")
    p.add_argument("--accuracies", default=None,
                   help="a tree JSON written before (its \"accuracies\"): skip measuring them")
    p.add_argument("--context", type=int, default=None,
                   help="cached tokens the step timing of --nodes auto assumes (default: mean "
                        "prompt length + max-new-tokens / 2)")
    p.add_argument("--topk", type=int, default=10, help="ranks measured per head")
    p.add_argument("--max-depth", type=int, default=None, help="deepest path (default: heads)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--out", default=None, help="JSON file to write (default: print)")
    p.add_argument("--measure", action="store_true",
                   help="also decode with the calibrated and the default tree and record the "
                        "measured mean accepted tokens per step")
    p.add_argument("--measure-prompts", default=None,
                   help="prompts to measure on (default with the demo: other held-out prompts "
                        "than the calibration's; else --prompts)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    return p.parse_args(argv)


def _checked_args(args: argparse.Namespace) -> tuple[int, list[int]]:
    """(nodes, auto sizes) from the flags; every flag checked before the model loads."""
    auto = args.nodes == "auto"
    try:
        nodes = 0 if auto else int(args.nodes)
        sizes = sorted({int(n) for n in args.auto_nodes.split(",") if n.strip()})
    except ValueError:
        raise ValueError(f"--nodes must be an integer or 'auto' (got {args.nodes!r}) and "
                         f"--auto-nodes comma-separated integers (got {args.auto_nodes!r})"
                         ) from None
    if nodes < 0:
        raise ValueError(f"--nodes must be >= 0 or 'auto', got {nodes}")
    args.batch_list = None
    if args.batches is not None:
        try:
            args.batch_list = sorted({int(b) for b in args.batches.split(",") if b.strip()})
        except ValueError:
            raise ValueError(f"--batches must be comma-separated integers, got "
                             f"{args.batches!r}") from None
        if not args.batch_list or args.batch_list[0] < 1:
            raise ValueError(f"--batches must list batch sizes >= 1, got {args.batches!r}")
        if not auto:
            raise ValueError("--batches needs --nodes auto (it times every size at each batch)")
        if args.measure:
            raise ValueError("--measure measures one tree; with --batches the output is a "
                             "policy table")
    if auto and (not sizes or sizes[0] < 0):
        raise ValueError(f"--auto-nodes must list sizes >= 0, got {args.auto_nodes!r}")
    for flag, value, low in (("--batch", args.batch, 1), ("--topk", args.topk, 1),
                             ("--max-new-tokens", args.max_new_tokens, 1),
                             ("--context", args.context, 1), ("--max-depth", args.max_depth, 1),
                             ("--rounds", args.rounds, 1)):
        if value is not None and value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if args.model is not None:
        check_dir("--model", args.model, "config.json")
    if args.medusa is not None:
        check_dir("--medusa", args.medusa)
    for flag in ("prompts", "measure_prompts", "accuracies"):
        if getattr(args, flag) is not None:
            check_file(f"--{flag.replace('_', '-')}", getattr(args, flag))
    args.device = check_device("--device", args.device)
    return nodes, sizes


def _main(argv: list[str]) -> int:
    if argv and argv[0] == "calibrate":
        argv = argv[1:]
    args = parse_args(argv)
    args.argv = list(argv)
    auto = args.nodes == "auto"
    nodes, sizes = _checked_args(args)
    show = not args.no_progress
    from .checkpoint import load_model
    from .tree import DEFAULT_TREE

    medusa, label = args.medusa, args.model
    if args.model is None:
        label = "demo (medusa_kernels/assets/demo)"
        from .demo import path

        args.model, demo_heads = path()
        medusa = medusa or demo_heads
    model = load_model(args.model, medusa=medusa, device=args.device)
    if model.heads is None:
        raise ValueError(f"no Medusa heads in {args.model}: pass --medusa DIR")
    if args.topk > model.heads.draft_vocab:
        raise ValueError(f"--topk {args.topk} exceeds the heads' draft vocabulary "
                         f"({model.heads.draft_vocab})")
    eos = model.eos_token_id()
    if args.prompts is not None:
        prompts = data.read_prompts(args.prompts, model.tokenizer())
    elif args.medusa is None and medusa is not None:
        prompts = demo_prompts(model, CALIBRATION_PROMPTS)
    elif args.accuracies is not None and args.context is not None and (
            not args.measure or args.measure_prompts is not None):
        prompts = None  # nothing to decode
    else:
        raise ValueError("give --prompts FILE (a JSON list or one prompt per line)")
    if args.accuracies is not None:
        acc, positions = read_accuracies(args.accuracies, model.heads.num_heads)
    else:
        acc, positions = measure_accuracies(model, prompts, args.topk, args.max_new_tokens,
                                            eos, progress=show)
    context = args.context or round(
        sum(len(p) for p in prompts) / len(prompts) + args.max_new_tokens / 2)
    if args.batch_list is not None:
        return _write_policy(args, model, acc, sizes, context, label, show, prompts, eos)
    speed = None
    if auto:
        sizes = [n for n in sizes if n <= max_nodes(acc, args.max_depth)]
        if not sizes:
            raise ValueError(f"no size in --auto-nodes fits {len(acc)} heads x top-{args.topk} "
                             f"(at most {max_nodes(acc, args.max_depth)} nodes)")
        trees = [grow_tree(acc, n, args.max_depth) for n in sizes]
        plain_s, medusa_s = step_times(model, trees, context, batch=args.batch, progress=show,
                                       rounds=args.rounds)
        rows = speed_table(acc, sizes, plain_s, medusa_s, args.max_depth)
        nodes = best_size(rows)
        from .bench.report import cpu_name

        cuda = model.device.type == "cuda"
        speed = {"device": torch.cuda.get_device_name(model.device) if cuda else
                 f"{cpu_name()} ({torch.get_num_threads()} threads)",
                 "dtype": str(model.dtype).removeprefix("torch."), "context": context,
                 "batch": args.batch,
                 "cuda_graph": cuda,
                 "plain_step_ms": round(1e3 * plain_s, 4), "sizes": rows}  # fmt: skip
        for r in rows:
            print(f"{r['nodes']:4d} nodes: expected {r['expected_accepted']:.2f} accepted, "
                  f"step {r['step_ms']:.3f} ms (plain {1e3 * plain_s:.3f} ms), est. speedup "
                  f"{r['est_speedup']:.2f}x" + ("  <- chosen" if r["nodes"] == nodes else ""),
                  file=sys.stderr)
    choices = grow_tree(acc, nodes, args.max_depth)
    out = {
        "choices": choices,
        "expected_accepted": round(expected_accepted(choices, acc), 4),
        "accuracies": [[round(a, 4) for a in row] for row in acc],
        "positions": positions,
        "prompts": len(prompts),
        "model": label,
    }
    if speed is not None:
        out["speed"] = speed
    if args.measure:
        from .tree import resolve_choices

        if args.measure_prompts is not None:
            measure_on, source = data.read_prompts(args.measure_prompts, model.tokenizer()), \
                args.measure_prompts
        elif args.prompts is None:  # the demo: held-out prompts the calibration did not see
            measure_on = demo_prompts(model, MEASURE_PROMPTS, seed=MEASURE_SEED)
            source = f"demo held-out prompts (seed {MEASURE_SEED})"
        else:
            measure_on, source = prompts, "the calibration prompts"
        # the paper's tree, cut to the heads and the vocabulary
        default = resolve_choices(None, len(acc), model.heads.draft_vocab)
        measured = [p for p in default if max(p) < args.topk]  # ranks with an accuracy
        out["measured_on"], out["measured_prompts"] = source, len(measure_on)
        out["measured_accepted"] = round(measured_accepted(
            model, measure_on, choices, args.max_new_tokens, eos, progress=show), 4)
        out["default_tree"] = DEFAULT_TREE
        out["default_expected_accepted"] = round(expected_accepted(measured, acc), 4)
        out["default_measured_accepted"] = round(measured_accepted(
            model, measure_on, default, args.max_new_tokens, eos, progress=show), 4)
    text = json.dumps(out, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
        print(f"wrote {args.out}: {len(choices)} nodes, expected accepted "
              f"{out['expected_accepted']}", file=sys.stderr)
    else:
        print(text)
    return 0


def read_accuracies(path: str, num_heads: int) -> tuple[list[list[float]], int]:
    """(acc [K][R], positions) from a tree JSON ``calibrate`` wrote; errors name the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--accuracies {path}: not a readable JSON file ({e})") from None
    acc = data.get("accuracies") if isinstance(data, dict) else None
    if not isinstance(acc, list) or not acc or not all(
            isinstance(row, list) and row and len(row) == len(acc[0]) and all(
                isinstance(a, (int, float)) and 0 <= a <= 1 for a in row) for row in acc):
        raise ValueError(f"--accuracies {path}: needs \"accuracies\", a K x R table of hit rates "
                         f"in [0, 1] (as tree calibrate writes it)")
    if len(acc) > num_heads:
        raise ValueError(f"--accuracies {path}: {len(acc)} heads measured, the model has "
                         f"{num_heads}")
    return acc, int(data.get("positions", 0))


def _write_policy(args, model, acc, sizes, context, label, show, prompts, eos) -> int:
    """--batches: each size's acceptance, then every size timed at each batch: the table."""
    from .bench.report import cpu_name

    sizes = [n for n in sizes if n <= max_nodes(acc, args.max_depth)]
    if not sizes:
        raise ValueError(f"no size in --auto-nodes fits {len(acc)} heads x top-{len(acc[0])} "
                         f"(at most {max_nodes(acc, args.max_depth)} nodes)")
    accepted = None
    if not args.expected:
        if prompts is None:
            raise ValueError("measuring each tree's acceptance needs prompts: give --prompts "
                             "FILE, or --expected to use the accuracies' formula")
        trees = [grow_tree(acc, n, args.max_depth) for n in sizes]
        accepted = batched_accepted(model, prompts[:ACCEPT_PROMPTS], trees,
                                    args.max_new_tokens, eos, progress=show)
    cuda = model.device.type == "cuda"
    meta = {"device": torch.cuda.get_device_name(model.device) if cuda else
            f"{cpu_name()} ({torch.get_num_threads()} threads)",
            "dtype": str(model.dtype).removeprefix("torch."), "model": label,
            "cuda_graph": cuda, "torch": torch.__version__,
            "accuracies": args.accuracies or "measured by this command",
            "accepted": "expected (accuracies)" if accepted is None else
            f"measured: {min(len(prompts), ACCEPT_PROMPTS)} prompts x {args.max_new_tokens} "
            "tokens, greedy",
            "timing": "CUDA graphs, do_bench medians" if cuda else
            f"{args.rounds} rounds, " + ("process CPU time" if cpu_clock() is time.process_time
                                         else "wall-clock time"),
            "date": datetime.date.today().isoformat(),
            "command": " ".join([PROG, *args.argv])}  # fmt: skip
    policy = policy_table(model, acc, sizes, args.batch_list, context, args.max_depth,
                          progress=show, meta=meta, rounds=args.rounds, accepted=accepted)
    for batch in args.batch_list:
        row = policy.row(batch, context)
        timed = [r for r in policy.rows if r.batch == batch and r.tree]
        print(f"batch {batch:4d}: " + ", ".join(
            f"{r.info['nodes']}: {r.speedup:.2f}x" for r in timed) +
            f"  <- {'plain' if row is None or not row.tree else row.info['nodes']}",
            file=sys.stderr)
    if args.out:
        policy.save(args.out)
        print(f"wrote {args.out}: a tree policy for batches {args.batch_list}", file=sys.stderr)
    else:
        print(json.dumps(policy.to_json(), indent=1))
    return 0


def main(argv=None) -> int:
    """``python -m medusa_kernels.tree calibrate ...``; returns the exit status (2: a bad
    argument or file, one line on stderr)."""
    return run_cli(_main, argv, PROG)


if __name__ == "__main__":
    sys.exit(main())
