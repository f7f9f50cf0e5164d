"""Which Medusa tree to verify at the current load: a table measured on the device, or one tree.

A table (JSON) holds rows measured on one device, model and dtype::

    {"version": 1, "tolerance": 0.02,
     "meta": {"device": "...", "model": "...", "dtype": "...", "command": "..."},
     "rows": [{"batch": 1, "context": 128, "tree": [[0], [1], [0, 0]], "speedup": 1.49},
              {"batch": 64, "context": 128, "tree": [], "speedup": 1.0}, ...]}

- ``batch``: running sequences per step (int >= 1) the row was measured at.
- ``context`` (optional; all rows have one or none): the context length (tokens in the cache) it
  was measured at, a bucket's lower edge.
- ``tree``: medusa_choices (``tree.validate_choices``); ``[]`` is the empty tree, plain decoding.
- ``speedup`` (optional): estimated tokens/s relative to plain decoding at the same batch and
  context on that device (``tree calibrate``'s ``est_speedup``); plain decoding is 1.0.
- Informational keys a row may also carry (kept as they are): ``INFO_KEYS`` (``nodes``: the
  tree's paths, the root not counted; accepted tokens per step, expected from the heads'
  accuracies and measured by decoding; step times).

``TreePolicy.choose(batch, context)``, the rule:

1. Batch: the largest measured batch <= ``batch`` (a tree measured at a batch is kept until the
   next measured batch is reached); below the smallest measured batch, the smallest.
2. Context, if the table has contexts: among that batch's rows, the largest measured context
   <= ``context``; below the smallest (or ``context`` None), the smallest.
3. Among the rows of that (batch, context): the highest speedup, ties to the tree with fewer
   nodes, then to the earlier row. Where they carry speedups, plain decoding competes at 1.0,
   so a tree estimated slower than plain is never chosen. A single row without a speedup is
   taken as it is. ``tolerance`` (a top-level key, default 0): speedups within this fraction
   of the best count as ties (timing noise), so the tree with the fewest nodes among them wins
   (plain decoding, the empty tree, is the smallest).

``choose`` returns the tree as a tuple of path tuples in ``validate_choices`` order (hashable: a
key for the loop's per-tree buffers and captured graphs; ``()`` is plain decoding), which
``tree.build_tree`` takes as it is. ``FixedTreePolicy`` always returns one tree (today's
behaviour). Any object with ``choose(batch, context)`` and ``trees()`` is a policy
(``is_policy``); ``generate`` refuses a step whose tree is not in ``trees()`` (its KV cache is
sized for those). This module imports only ``tree`` and the standard library.

In ``generate`` (``tree=`` a table file or a policy): ``batch`` is the number of rows the step
computes (the running sequences, and finished ones until few enough still run:
``decoding.KEEP_FRACTION``), ``context`` the longest running sequence (prompt + tokens so far).
"""

from __future__ import annotations

import bisect
import json
import math
import os
import statistics
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .tree import resolve_choices, validate_choices

VERSION = 1
ROW_KEYS = ("batch", "context", "tree", "speedup")
INFO_KEYS = ("nodes", "expected_accepted", "measured_accepted", "step_ms", "plain_step_ms",
             "note")
Tree = tuple[tuple[int, ...], ...]
# policies ``generate(tree=...)`` takes by name: "online" (the default, ``OnlinePolicy``),
# "table" (the checkpoint's shipped table for the device), "fixed" (the device's default tree)
POLICY_NAMES = ("online", "table", "fixed")


class Policy(Protocol):
    def choose(self, batch: int, context: int | None = None) -> Tree: ...

    def trees(self) -> list[Tree]: ...


@dataclass(frozen=True)
class PolicyRow:
    """One measured row (see the module doc); ``tree`` in ``validate_choices`` order."""

    batch: int
    tree: Tree
    context: int | None = None
    speedup: float | None = None
    info: Mapping = field(default_factory=dict, compare=False)

    @property
    def num_nodes(self) -> int:
        return len(self.tree) + 1

    def to_json(self) -> dict:
        row: dict = {"batch": self.batch}
        if self.context is not None:
            row["context"] = self.context
        row["tree"] = [list(p) for p in self.tree]
        if self.speedup is not None:
            row["speedup"] = self.speedup
        return row | dict(self.info)


def is_policy(value) -> bool:
    """Whether ``value`` is a policy object: it has callable ``choose`` and ``trees``."""
    return callable(getattr(value, "choose", None)) and callable(getattr(value, "trees", None))


def is_table_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a JSON file holding a policy table (an object with "rows"), rather
    than a tree file; False for anything unreadable (the tree loader then names the problem)."""
    if not os.path.isfile(path):
        return False
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and "rows" in data


def policy_label(policy) -> str:
    """A short name for messages and reports: a table's file name, or the policy's repr."""
    source = getattr(policy, "source", None)
    if isinstance(source, str) and source != "TreePolicy":
        return os.path.basename(source)
    return repr(policy)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_count(value, what: str, minimum: int) -> int:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{what} must be an int >= {minimum}, got {value!r}")
    return value


def _parse_row(row, where: str, num_heads: int | None, topk: int | None) -> PolicyRow:
    if isinstance(row, PolicyRow):
        row = row.to_json()
    if not isinstance(row, Mapping):
        raise ValueError(f"{where} must be an object with {ROW_KEYS}, got {type(row).__name__}")
    unknown = sorted(set(row) - set(ROW_KEYS) - set(INFO_KEYS))
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}; expected {ROW_KEYS} "
                         f"(and optionally {INFO_KEYS})")
    for key in ("batch", "tree"):
        if key not in row:
            raise ValueError(f"{where} has no {key!r}")
    batch = _check_count(row["batch"], f"{where}.batch", 1)
    context = row.get("context")
    if context is not None:
        _check_count(context, f"{where}.context", 0)
    speedup = row.get("speedup")
    if speedup is not None and (isinstance(speedup, bool) or not isinstance(
            speedup, (int, float)) or not math.isfinite(speedup) or speedup <= 0):
        raise ValueError(f"{where}.speedup must be a finite number > 0, got {speedup!r}")
    try:
        tree = tuple(validate_choices(row["tree"], num_heads, topk))
    except ValueError as e:
        raise ValueError(f"{where}.tree: {e}") from None
    info = {k: row[k] for k in INFO_KEYS if k in row}
    return PolicyRow(batch, tree, context, None if speedup is None else float(speedup), info)


class TreePolicy:
    """A measured table (module doc): ``choose(batch, context)`` -> the tree to verify."""

    def __init__(
        self,
        rows: Iterable[PolicyRow | Mapping],
        meta: Mapping | None = None,
        *,
        source: str = "TreePolicy",
        num_heads: int | None = None,
        topk: int | None = None,
        tolerance: float = 0.0,
    ):
        """rows: PolicyRow or JSON-like dicts; meta: free-form provenance (device, model,
        command, ...); source: names the table in errors (the file path for ``load``);
        num_heads / topk: when given, every tree must fit (depth <= num_heads, ranks < topk);
        tolerance: in [0, 1), speedups that close to the best are ties (rule 3)."""
        self.source = str(source)
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or \
                not 0 <= tolerance < 1:
            raise ValueError(f"{self.source}: tolerance must be a number in [0, 1), got "
                             f"{tolerance!r}")
        self.tolerance = float(tolerance)
        if meta is not None and not isinstance(meta, Mapping):
            raise ValueError(f"{self.source}: meta must be an object, got {type(meta).__name__}")
        self.meta = dict(meta or {})
        if isinstance(rows, (str, bytes, Mapping)) or not isinstance(rows, Iterable):
            raise ValueError(f"{self.source}: rows must be a list of rows, got "
                             f"{type(rows).__name__}")
        self.rows = tuple(_parse_row(r, f"{self.source}: rows[{i}]", num_heads, topk)
                          for i, r in enumerate(rows))
        if not self.rows:
            raise ValueError(f"{self.source}: rows is empty; a policy needs at least one row")
        with_context = {r.context is not None for r in self.rows}
        if len(with_context) > 1:
            raise ValueError(f"{self.source}: either every row has a context or none does")
        self.has_context = with_context == {True}
        self._keys: dict[tuple[int, int | None], list[PolicyRow]] = {}
        for i, r in enumerate(self.rows):
            group = self._keys.setdefault((r.batch, r.context), [])
            if any(other.tree == r.tree for other in group):
                raise ValueError(f"{self.source}: rows[{i}] repeats the tree of an earlier row "
                                 f"at batch {r.batch}, context {r.context}")
            group.append(r)
        for (batch, context), group in self._keys.items():
            if len(group) > 1 and any(r.speedup is None for r in group):
                raise ValueError(f"{self.source}: batch {batch}, context {context} has "
                                 f"{len(group)} rows: each needs a speedup to choose among them")
        self.batches = sorted({r.batch for r in self.rows})
        self._contexts = {b: sorted({r.context for r in self.rows if r.batch == b},
                                    key=lambda c: -1 if c is None else c) for b in self.batches}

    @classmethod
    def load(cls, path: str | os.PathLike, *, num_heads: int | None = None,
             topk: int | None = None) -> TreePolicy:
        """Read and validate a table; every error names the file."""
        path = os.fspath(path)
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a tree policy is a JSON object with 'rows', got "
                             f"{type(data).__name__}")
        unknown = sorted(set(data) - {"version", "tolerance", "meta", "rows"})
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}; expected 'version', 'tolerance', "
                             f"'meta', 'rows'")
        if data.get("version", VERSION) != VERSION:
            raise ValueError(f"{path}: version {data['version']!r} is not supported "
                             f"(this code reads version {VERSION})")
        if "rows" not in data:
            raise ValueError(f"{path}: no 'rows'")
        return cls(data["rows"], data.get("meta"), source=path, num_heads=num_heads, topk=topk,
                   tolerance=data.get("tolerance", 0.0))

    def to_json(self) -> dict:
        out: dict = {"version": VERSION}
        if self.tolerance:
            out["tolerance"] = self.tolerance
        return out | {"meta": self.meta, "rows": [r.to_json() for r in self.rows]}

    def save(self, path: str | os.PathLike) -> None:
        """Write the table as JSON, one row per line."""
        rows = ",\n".join("  " + json.dumps(r.to_json()) for r in self.rows)
        tolerance = f' "tolerance": {self.tolerance},\n' if self.tolerance else ""
        text = (f'{{\n "version": {VERSION},\n{tolerance} "meta": '
                f'{json.dumps(self.meta, sort_keys=True)},\n "rows": [\n{rows}\n ]\n}}\n')
        with open(path, "w") as f:
            f.write(text)

    def row(self, batch: int, context: int | None = None) -> PolicyRow | None:
        """The row ``choose`` takes its tree from; None where plain decoding (speedup 1.0) beats
        every measured row."""
        _check_count(batch, "batch", 1)
        if context is not None:
            _check_count(context, "context", 0)
        b = self.batches[max(0, bisect.bisect_right(self.batches, batch) - 1)]
        contexts = self._contexts[b]
        if not self.has_context or context is None:
            c = contexts[0]
        else:
            c = contexts[max(0, bisect.bisect_right(contexts, context) - 1)]
        group = self._keys[(b, c)]
        if len(group) == 1 and group[0].speedup is None:
            return group[0]
        best = max(r.speedup for r in group)
        if best < 1.0:
            return None
        near = best * (1 - self.tolerance)  # ties: the fewest nodes wins, then the earlier row
        if self.tolerance and 1.0 >= near and all(r.tree for r in group):
            return None  # plain decoding (1 node) is within the tolerance
        return min((r for r in group if r.speedup >= near), key=lambda r: r.num_nodes)

    def choose(self, batch: int, context: int | None = None) -> Tree:
        """The tree to verify with ``batch`` running sequences (>= 1) at ``context`` tokens
        (None: the smallest measured context): the module doc's rule; ``()`` = plain decoding."""
        row = self.row(batch, context)
        return () if row is None else row.tree

    def trees(self) -> list[Tree]:
        """Every tree ``choose`` can return, in first-use order of the batches and contexts."""
        out: list[Tree] = []
        for b in self.batches:
            for c in self._contexts[b]:
                tree = self.choose(b, c)
                if tree not in out:
                    out.append(tree)
        return out

    def __repr__(self) -> str:
        source = "" if self.source == "TreePolicy" else f"{self.source!r}, "
        return f"TreePolicy({source}{len(self.rows)} rows, batches {self.batches})"


class FixedTreePolicy:
    """One tree at every batch and context (today's behaviour)."""

    def __init__(self, choices: Sequence[Sequence[int]], *, num_heads: int | None = None,
                 topk: int | None = None):
        self.tree: Tree = tuple(validate_choices(choices, num_heads, topk))

    @classmethod
    def default(cls, num_heads: int | None = None) -> FixedTreePolicy:
        """The package's default tree (``tree.DEFAULT_TREE``), cut to ``num_heads`` levels."""
        return cls(resolve_choices(None, num_heads), num_heads=num_heads)

    def choose(self, batch: int, context: int | None = None) -> Tree:
        _check_count(batch, "batch", 1)
        if context is not None:
            _check_count(context, "context", 0)
        return self.tree

    def trees(self) -> list[Tree]:
        return [self.tree]

    def __repr__(self) -> str:
        return f"FixedTreePolicy({len(self.tree) + 1} nodes)"


# --------------------------------------------------------------------------- online policy

# tree sizes (paths besides the root) the online policy grows from its acceptance estimates
ONLINE_SIZES = (1, 3, 7, 15, 31, 63)
# exploration: every candidate is timed this many times at a batch before its estimate is
# trusted; after that, a re-check (a plain step among Medusa ones, or the reverse) at most
# once in this many steps
MIN_TIMINGS, RECHECK_STEPS = 3, 20
# each re-check at a load that leaves the choice there as it was doubles the wait before the
# next one there, up to this many times RECHECK_STEPS (a change of choice resets it)
RECHECK_BACKOFF = 16
NEAR_ROWS = 2  # a tree is known at a batch once timed at rows within this factor of it
DECIDE_EVERY = 4  # a choice holds this many steps at the same batch (choose's cost)
MEDIAN_STEP = 0.02  # then a step cost moves at most 2% a step towards each time (observe)
FIRST_TIMES = 5  # a step cost starts as the median of its first five times (observe)
# candidates first timed: those rated within this fraction of the best (with a table's step
# times, without: a generic cost model is a rougher guess)
EXPLORE_MARGIN = {True: 0.1, False: 0.5}
SPEED_AFTER = 10  # steps a tree's cost at some rows is timed before its times track the speed
FIRST_EXPLORE = 10  # a tree never timed may cost this many times the exploration budget
# an exploration's times are set against the running tree's last few times at the same rows
REF_STEPS = 5
# the machine's speed is tracked per band of contexts, this many bands a doubling (observe)
CONTEXT_BANDS = 8
STALE_TRIALS = 20.0  # a node's counts decay to this many trials while it is not tested
EXPLORE_RUN = 3  # an exploration runs its tree for this many steps (the first, a switch,
# is not timed once the tree has a time: ``observe``)


def grow(acc: Sequence[Sequence[float]], nodes: int) -> Tree:
    """The ``nodes`` paths of highest value prod_i acc[i][r_i] (ties: shallower, then smaller
    ranks), in ``validate_choices`` order: a tree, since a child never outvalues its parent
    (``calibrate.grow_tree``'s rule)."""
    import heapq

    K, R = len(acc), len(acc[0]) if acc else 0
    frontier = [(-acc[0][r], 1, (r,)) for r in range(R)] if K else []
    heapq.heapify(frontier)
    out: list[tuple[int, ...]] = []
    while len(out) < nodes and frontier:
        neg, _, path = heapq.heappop(frontier)
        out.append(path)
        if len(path) < K:
            for r in range(R):
                heapq.heappush(frontier, (neg * acc[len(path)][r], len(path) + 1, path + (r,)))
    return tuple(sorted(out, key=lambda p: (len(p), p)))


def generic_accuracies(num_heads: int, ranks: int = 10) -> list[list[float]]:
    """A prior for heads nothing is known about: head k's rank-r token right with probability
    0.6 * 0.8^k / (r + 1)^2 (the shape of measured Medusa heads, e.g. the demo's)."""
    return [[0.6 * 0.8**k / (r + 1) ** 2 for r in range(ranks)] for k in range(num_heads)]


class OnlinePolicy:
    """A tree policy that measures as it decodes: no calibration run, never much slower than
    plain decoding.

    Candidates (fixed when it is built, so the KV cache and the CUDA graphs are sized for
    them): the empty tree (a plain step), the trees grown from the prior accuracies at the
    sizes ``ONLINE_SIZES`` (up to ``max_nodes`` paths; by default the largest tree the table
    timed, if a table with step times is given: its calibration pruned the bigger ones as
    slower on the device, and every candidate's nodes are cache slots every step carries; else
    63), and the ``trees`` given (a shipped table's, the device's fixed tree), cut to the heads
    and the vocabulary.

    Estimates, updated by ``observe`` after every step:

    - acceptance per head k and rank r: the probability that head k's rank-r guess is accepted
      given that its parent path was; Beta-like counts (hits, trials) started at
      ``prior_strength`` (20 observations for a calibrated tree's ``accuracies``, 2 for
      ``generic_accuracies``) x the prior accuracy, each Medusa step decaying the older counts
      by ``decay`` (0.99: the last ~100 steps count, whatever their rows; a decay per row would
      keep one or two steps at 64 rows, and the estimates would follow their noise), those of
      a node the step did not test down to ``STALE_TRIALS`` (20) trials: they came from other
      steps, often other prompts, and the next exploration must be able to correct them. A row
      that accepted path p tested, at each depth i <= len(p), every child of p[:i] in the tree:
      the one on p was a hit, the others misses.
    - expected tokens per step of a tree: 1 + the sum over its paths of prod_i est[i][r_i]
      (heads independent, as calibration assumes). The estimates miss what a tree's own steps
      select: a bigger tree, accepting more, starts its steps more often just past a hard
      token, where the heads are weaker (the demo's B 16: head 0's rank 0 right 77% of the
      time in the 2-node tree's steps, 72% in the 4-node chain's; the chain realized 2.65
      tokens a step where estimates made in the 2-node tree's steps said 2.8). Scaling a
      tree's sum by its own record corrected that there, but tipped SmolLM2's trained heads
      (1 row, near-tied trees, costs known to +-10%) to the 4-node tree at 0.82-0.89x the
      2-node one; the table's trust (below) is what holds B 16 to its tree.
    - step cost per (tree, rows), in the machine's usual speed (below): the prior cost (the
      table's ``step_ms``, interpolated in nodes and batch; without a table a generic model,
      linear in rows x nodes) times the mean ratio measured / prior of its kind of step
      (plain or Medusa) at the nearest rows that kind was timed at within a factor
      ``NEAR_ROWS`` (2), else the other kind's there (a step's host work is much the same
      for both), else its own farther away; weighed (``prior_weight`` steps' worth: 3 with a
      table's times, 0 without) against the tree's own times at these rows, or at the nearest
      rows it was timed at, scaled as its kind's measured costs scale. The tree's own cost at
      some rows: noise only slows a step, so the smaller of its first two times, the median
      of its first ``FIRST_TIMES`` (5); then, running, a median tracker (a step of at most
      ``MEDIAN_STEP`` (2%) towards each time, doubling while the times stay on one side: a
      stale estimate catches up within a few steps; a mean would follow the noise's spikes),
      and re-checked (an exploration), the median of the re-check's times and the estimate
      before it (one slow time moves it halfway, two agreeing ones all the way: a cost set
      in a slow spell is mended by the next re-check). The machine's speed: once the running
      tree's cost at these rows is established (``SPEED_AFTER`` (10) times), its times track
      the speed instead (the same tracker), and every cost is kept in units of it, so a
      shared machine's drift does not make the trees timed earlier look cheap or dear. The
      speed is kept per band of contexts (the step's longest sequence; ``CONTEXT_BANDS`` (8)
      bands a doubling, a band never seen reads the nearest): a step's cost grows with the
      context, and each call starts short again. A tree explored at the rows the running
      tree runs at is set against that tree's last ``REF_STEPS`` (5) times there, if no
      shorter context came since (the same rows, a few tokens more context: a fair pair;
      the tracker lags behind the context's growth and the rows' changes).

    ``choose(batch)``: the candidate of highest expected tokens per second at ``batch`` rows,
    keeping its previous choice while that is within ``tolerance`` of the best (timing noise
    does not flip trees; a tree that merely ran since, an exploration, must win outright); a
    choice holds ``DECIDE_EVERY`` (4) steps at the same batch before it is weighed again (the
    choice's Python work is part of a small model's step). The table's tree for the batch, if
    a table is given, counts ``table_trust`` (10%) faster than estimated (it was measured
    with care: the online estimates, noisy, must beat it by that margin; heads that stop
    helping lose far more), and within the tolerance of the best it is taken before the
    previous choice (a step's estimate overrates a bigger tree in a batch: it spreads the
    rows' ends, and the tail's steps serve few rows, those the heads serve worst; the
    calibration broke its near-ties toward the smaller tree).
    Exploration: the best-rated candidate timed fewer than ``MIN_TIMINGS`` (3) times near this
    batch (within ``NEAR_ROWS``: times far away are only an estimate here) among those rated
    within ``EXPLORE_MARGIN`` (10% with a table's step times, 50% without) of the best, plain
    decoding (the floor) and the table's tree for the batch (the starting point) always among
    them (else a re-check: of the same candidates, the one timed least recently at this load, so
    a tree priced in a slow spell is timed again, a plain step comes among Medusa ones, and the
    table's tree, whatever its estimate, runs again at its load; at most once in
    ``RECHECK_STEPS`` (20) steps, the wait doubling with each re-check at a load (rows within a
    power of two) up to ``RECHECK_BACKOFF`` (16) times that, back to 20 once the choice at a
    batch there changes: a load whose choice stands pays for fewer and fewer re-checks, a change
    is noticed within 320 steps) is taken instead once the steps at this load since the last
    exploration there have cost enough that its expected loss is at most ``explore`` (0.5%) of
    that time (each load its own budget: the tail's cheap re-checks at a few rows would
    otherwise spend the full batch's, whose dear re-check, of a tree priced in a slow spell,
    would then never come; ``FIRST_EXPLORE`` (10) times that for a tree never timed: only the
    prior prices it, the roughest guess there is); the loss counts the two switches (into the
    tree and back) at what switches have been measured to cost. It runs for ``EXPLORE_RUN`` (3)
    steps (two for a tree never timed near this batch) while the rows stay as they were (a
    burst begun at a call's last row does not run into the next call's full batch): a step
    that switches trees is dearer than the next ones (cold caches, other buffers, a first
    use), and its time does not count once the tree has one (it measures the switches' price
    instead). So the likely trees get
    timed a few times at each load (and one slow first time does not condemn one), speculation
    is tried again now and then and taken up when it pays, and dropped when it stops paying; a
    cheap tree is retried often, a dear one seldom. The choice is deterministic given the
    observations (no random numbers).

    Exactness: the tree of a step depends only on what happened before it (earlier steps'
    accepted paths and times); it never reads the step's own draws, so exact sampling stays
    exact and greedy stays plain greedy token for token, whatever trees it switches between.
    Times vary from run to run, so which trees run does (the tokens do not); ``step_cost``
    (``(tree, rows) -> seconds``) replaces the measured times by a model, making the choices
    deterministic (tests, simulations).

    The loop (``decoding._decode``) calls ``observe(tree, rows, seconds, leaves, context=)``
    after each step: ``seconds`` the step's time (None: not timed, e.g. an eager first call on
    CUDA, which compiles kernels), ``leaves`` the node index (0 = the root, i + 1 = the tree's
    path i) each running row's accepted path ended at (None for a plain step), ``context``
    the step's longest sequence (the one ``choose`` got), and ``flush()`` at each call's end.
    With ``defer`` (``decoding.online_policy`` sets it), ``observe`` checks its arguments and
    keeps the step back; ``choose`` applies what it kept, in order, before any choice that
    reads the estimates (a held choice with no exploration waiting reads none): the same
    choices and state as applying each step at once, for half the policy's cost in place
    (a step's Python runs cold after the model's; a few steps applied together run warm).
    Until then (or ``flush()``) its attributes lag by up to ``DECIDE_EVERY`` steps.
    """

    def __init__(
        self,
        num_heads: int,
        *,
        accuracies: Sequence[Sequence[float]] | None = None,
        table: TreePolicy | None = None,
        trees: Iterable[Sequence[Sequence[int]]] = (),
        sizes: Sequence[int] = ONLINE_SIZES,
        max_nodes: int | None = None,
        vocab_size: int | None = None,
        device: str = "cpu",
        prior_strength: float | None = None,
        decay: float = 0.99,
        alpha: float = 0.1,
        prior_weight: float | None = None,
        tolerance: float = 0.03,
        table_trust: float = 0.1,
        explore: float = 0.005,
        step_cost=None,
        name: str = "online",
        defer: bool = False,
    ):
        _check_count(num_heads, "num_heads", 1)
        for what, v, lo, hi in (("prior_strength", 1.0 if prior_strength is None else
                                 prior_strength, 0.0, math.inf),
                                ("decay", decay, 0.0, 1.0), ("alpha", alpha, 0.0, 1.0)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo < v <= hi:
                raise ValueError(f"{what} must be a number in ({lo}, {hi}], got {v!r}")
        for what, v in (("tolerance", tolerance), ("explore", explore),
                        ("table_trust", table_trust)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
                raise ValueError(f"{what} must be a number in [0, 1), got {v!r}")
        if table is not None and not isinstance(table, TreePolicy):
            raise ValueError(f"table must be a TreePolicy or None, got {type(table).__name__}")
        if step_cost is not None and not callable(step_cost):
            raise ValueError(f"step_cost must be a function (tree, rows) -> seconds or None, "
                             f"got {type(step_cost).__name__}")
        self.name, self.num_heads, self.device = str(name), num_heads, str(device)
        # observations kept back until choose needs them (``defer``): a held choice does not,
        # and applying a few at once, warm, costs half as much as one after each step, cold
        # after the model's work (the demo's B 16: 57 against 98 us a step)
        self.defer, self._queue = bool(defer), []
        self.table, self.step_cost = table, step_cost
        self.decay, self.alpha = float(decay), float(alpha)
        if prior_weight is not None and (isinstance(prior_weight, bool) or not isinstance(
                prior_weight, (int, float)) or not 0 <= prior_weight < math.inf):
            raise ValueError(f"prior_weight must be a number >= 0 or None, got {prior_weight!r}")
        self.tolerance, self.explore = float(tolerance), float(explore)
        self.table_trust = float(table_trust)
        self._table_pick: dict[int, int | None] = {}
        width = 1 + max((r for t in trees for p in t for r in p), default=0)
        generic = accuracies is None
        if generic:
            accuracies = generic_accuracies(num_heads, max(10, width))
        acc = [[float(a) for a in row] for row in accuracies][:num_heads]
        if not acc or any(not row or not all(0 <= a <= 1 for a in row) for row in acc):
            raise ValueError("accuracies must be [heads][ranks] probabilities in [0, 1]")
        if vocab_size is not None:
            acc = [row[:vocab_size] for row in acc]
        ranks = max(len(row) for row in acc)
        acc = [row + [0.0] * (ranks - len(row)) for row in acc]
        # candidates: plain, grown sizes, the given trees (cut to the heads and vocabulary)
        cands: list[Tree] = [()]
        limit = sum(ranks**d for d in range(1, len(acc) + 1))
        if max_nodes is None:  # a table's calibration timed trees up to a size (pruning the
            # bigger ones, slower there): the grown candidates stop there too
            timed = [len(r.tree) for r in table.rows if "step_ms" in r.info] if \
                table is not None else []
            max_nodes = max(timed) if timed else max(ONLINE_SIZES)
        for n in sizes:
            if n <= min(max_nodes, limit):
                cands.append(grow(acc, n))
        for t in [*(table.trees() if table is not None else ()), *trees]:
            t = tuple(p for p in validate_choices(t) if len(p) <= num_heads
                      and (vocab_size is None or max(p) < vocab_size))
            if t not in cands:
                cands.append(t)
        self.candidates = cands
        R = max(ranks, 1 + max((r for t in cands for p in t for r in p), default=0))
        self.prior = [[(row[r] if r < len(row) else 0.0) for r in range(R)]
                      for row in acc] + [[0.0] * R for _ in range(num_heads - len(acc))]
        # a measured prior (a calibrated tree's accuracies) counts as 20 observations, the
        # generic one as 2
        s = float(prior_strength if prior_strength is not None else
                  2.0 if generic else 20.0)
        self.hits = [[s * p for p in row] for row in self.prior]
        self.trials = [[s] * R for _ in self.prior]
        # per candidate: its paths, and per node its children's ranks
        self._paths = sorted({p for t in cands for p in t}, key=lambda p: (len(p), p))
        at = {p: j for j, p in enumerate(self._paths)}
        # per path: its parent's index (-1: the root), head, rank; per candidate: its paths'
        self._path_meta = [(at.get(p[:-1], -1), len(p) - 1, p[-1]) for p in self._paths]
        self._cand_paths = [[at[p] for p in t] for t in cands]
        self._used = sorted({(k, r) for _, k, r in self._path_meta})  # the paths' (head, rank)
        self._children = []
        for t in cands:
            kids: dict[tuple[int, ...], list[int]] = {}
            for p in t:
                kids.setdefault(p[:-1], []).append(p[-1])
            self._children.append(kids)
        self._index = {t: i for i, t in enumerate(cands)}
        self._expected: list[float] | None = None
        # per batch, each candidate's rate and the generations of plain's and the Medusa
        # trees' estimates it was computed at: a plain step's outcome changes plain's only, a
        # Medusa step's every Medusa tree's (acceptance, their cost ratio), either kind's the
        # other's too while that one borrows its cost ratio
        self._rates: dict[int, tuple[list[float], list[int]]] = {}
        self._generation = [0, 0]  # plain's, the Medusa trees'
        self._hold = 0  # steps the last choice holds before the next one (``DECIDE_EVERY``)
        self._held: tuple[int, Tree] | None = None  # (batch, tree) of the last choice
        # an exploration it found waiting: (candidate, steps, loss, load's band, re-check?)
        self._pending: tuple[int, int, float, int, bool] | None = None
        # re-checks: the steps they wait per band of rows (rows' bit length: 1, 2-3, 4-7, ...),
        # and the choice last made at each batch (a change resets its band's wait)
        self._wait: dict[int, int] = {}
        self._best_at: dict[int, int] = {}
        self._switch = 0.0  # a switch step's time over its tree's estimate (a mean fraction)
        self.cost: dict[tuple[int, int], float] = {}  # (candidate, rows) -> seconds
        self._timed: dict[int, set[int]] = {}  # candidate -> the rows it was timed at
        self._count: dict[tuple[int, int], int] = {}  # (candidate, rows) -> steps averaged
        self._first: dict[tuple[int, int], list[float]] = {}  # its first FIRST_TIMES times
        self._side: dict[tuple[int, int], int] = {}  # its times' run on one side (+: above)
        # (medusa?, rows) -> measured / prior cost of that kind of step at those rows
        self._ratio: dict[tuple[bool, int], float] = {}
        self._borrowed: set[bool] = set()  # kinds priced with the other kind's ratio
        # memos: the ratio entry a (kind, rows) reads, the nearest timed rows of a (candidate,
        # rows), the (candidate, rows) timed at least MIN_TIMINGS times near there
        self._ratio_src: dict[tuple[bool, int], tuple[bool, int] | None] = {}
        self._near: dict[tuple[int, int], int | None] = {}
        self._known: set[tuple[int, int]] = set()
        # a (tree, rows) cost's count of steps stops at 1 / alpha; its cost is established
        # (the running tree's times then track the machine's speed) at SPEED_AFTER of them
        self._max_count = round(1 / self.alpha)
        self._established = min(SPEED_AFTER, self._max_count)
        # per load (rows' bit length, as the re-checks' waits): seconds and steps of its steps
        # since the last exploration there (explorations at the tail's few rows would otherwise
        # spend the budget of the full batch's dearer ones: demo, B 4, plain priced at 2.5x its
        # cost after a slow first timing was never timed again)
        self._idle: dict[int, float] = {}
        self._steps_since: dict[int, int] = {}
        self.speed = 1.0  # the machine's speed now against its usual (observe); costs in usual
        # the running tree's last REF_STEPS times, its (candidate, rows), the step of the last
        self._ref: deque[float] = deque(maxlen=REF_STEPS)
        self._ref_key: tuple[int, int] | None = None
        self._ref_at = 0
        self._ref_ctx: int | None = None  # the context of the last of them
        # the speed per band of contexts (``CONTEXT_BANDS`` a doubling): a step's cost grows
        # with the context (the demo's 2-node step at 16 rows: 8.0 ms at 30 tokens, 9.8 at
        # 130), and a call starts short again; one speed, tracked through the calls, was the
        # last call's end at the next one's start (1.45x: plain timed there at 6.5 ms for 7)
        self._speeds: dict[int, float] = {}
        self._observed = 0  # steps observed
        self._timed_at: dict[tuple[int, int], int] = {}  # (candidate, band) -> last timed
        self._burst: Tree = ()  # the tree an exploration runs, for EXPLORE_RUN steps
        self._burst_left = 0
        self._rows = 0  # the rows of the last choice
        self._explored = False  # choose returned an exploration step
        # an exploration's (candidate, rows) and its estimate there before it, then its times
        self._recheck: tuple[tuple[int, int] | None, list[float]] = (None, [])
        self._last: Tree | None = None
        # (rows, tree, seconds) of the latest steps (bounded: a server's policy lives long)
        self.log: deque[tuple[int, Tree, float | None]] = deque(maxlen=1 << 16)
        self._prior_cost: dict[tuple[int, int], float] = {}
        # the table's step times price both kinds of step, or the generic model does
        self._table_times = table is not None and all(
            any("step_ms" in r.info and bool(r.tree) == kind for r in table.rows)
            for kind in (False, True))
        # a table measured on the device is trusted; the generic model is a guess: a tree's
        # first timing replaces it
        self.prior_weight = float(prior_weight if prior_weight is not None else
                                  3.0 if self._table_times else 0.0)

    # ---- estimates
    def estimate(self, k: int, r: int) -> float:
        """Head k's rank-r acceptance, given its parent's (the running estimate)."""
        eps = 0.05
        return (self.hits[k][r] + eps * self.prior[k][r]) / (self.trials[k][r] + eps)

    def expected(self, tree: Sequence[Sequence[int]]) -> float:
        """Expected tokens per step of ``tree`` (a candidate) from the current estimates."""
        if self._expected is None:  # each path's value: its parent's x its estimate
            vals: list[float] = []
            for parent, k, r in self._path_meta:
                est = self.estimate(k, r)
                vals.append(est if parent < 0 else vals[parent] * est)
            self._vals = vals
            self._expected = [1.0 + sum(map(vals.__getitem__, idx)) for idx in self._cand_paths]
        key = tuple(tuple(p) for p in tree)
        i = self._index.get(key)
        if i is not None:
            return self._expected[i]
        value = dict(zip(self._paths, self._vals, strict=True))
        return 1.0 + sum(value.get(p, 0.0) for p in key)

    def prior_cost(self, tree: Tree, rows: int) -> float:
        """The prior's step cost (arbitrary units: only ratios between trees count)."""
        key = (len(tree), rows)
        cost = self._prior_cost.get(key)
        if cost is None:
            cost = self._prior_cost[key] = self._prior(len(tree), rows)
        return cost

    def _prior(self, nodes: int, rows: int) -> float:
        T = nodes + 1
        if self._table_times:
            return _table_cost(self.table, nodes, rows)
        if self.device.startswith("cuda"):  # a step reads the weights: flat in rows
            return 1.0 + 0.002 * rows * T + (0.15 if nodes else 0.0)
        return 1.0 + 0.1 * rows * T + (0.3 if nodes else 0.0)  # a CPU computes every row

    def step_seconds(self, tree: Tree, rows: int) -> float:
        """Estimated seconds of a step of ``tree`` at ``rows`` rows (module doc)."""
        i = self._index[tree]
        prior = self.prior_cost(tree, rows) * self.ratio(bool(tree), rows)
        near = self._nearest(i, rows)
        if near is None:
            return prior
        # the tree's own times (at other rows: scaled as its kind's measured costs scale),
        # weighed against the prior by their count: ``prior_weight`` steps' worth for the prior
        own = self.cost[(i, near)]
        if near != rows:
            own *= prior / (self.prior_cost(tree, near) * self.ratio(bool(tree), near))
        n = self._count[(i, near)]
        return (n * own + self.prior_weight * prior) / (n + self.prior_weight)

    def ratio(self, kind: bool, rows: int) -> float:
        """Measured / prior step cost of a kind of step (Medusa: True) near ``rows``: its own
        ratio at the nearest rows it was timed at within ``NEAR_ROWS``, else the other kind's
        there (the host work a step pays is much the same for both), else its own at the
        nearest rows, else the other kind's, else 1."""
        src = self._ratio_src.get((kind, rows), False)
        if src is False:  # which entry to read: it changes only when a new one appears
            def nearest(k: bool):
                timed = [r for kk, r in self._ratio if kk == k]
                if not timed:
                    return None
                r = min(timed, key=lambda r: (abs(math.log(r / rows)), r))
                return abs(math.log(r / rows)), (k, r)

            own, other = nearest(kind), nearest(not kind)
            near = math.log(NEAR_ROWS) + 1e-9
            if own is not None and (own[0] <= near or other is None or other[0] > near):
                src = own[1]
            else:
                src = None if other is None else other[1]
            self._ratio_src[(kind, rows)] = src
        if src is None:
            return 1.0
        if src[0] != kind:
            self._borrowed.add(kind)
        return self._ratio[src]

    def _nearest(self, i: int, rows: int) -> int | None:
        """The rows candidate ``i`` was timed at closest to ``rows`` (in ratio), or None."""
        key = (i, rows)
        if key not in self._near:  # changes only when ``i`` is timed at new rows
            timed = self._timed.get(i)
            self._near[key] = min(timed, key=lambda r: abs(math.log(r / rows))) if timed \
                else None
        return self._near[key]

    def _timings(self, i: int, rows: int) -> int:
        """How many steps of candidate ``i`` were timed near ``rows`` (within a factor of
        ``NEAR_ROWS``; each rows' count up to ``1 / alpha``). Times at rows farther away carry
        over only as an estimate (scaled as the prior scales, which misses the host work a
        step pays whatever its rows): they do not make a tree known at these rows."""
        if (i, rows) in self._known:  # counts only grow
            return MIN_TIMINGS
        n = sum(self._count[(i, r)] for r in self._timed.get(i, ())
                if r <= rows * NEAR_ROWS and rows <= r * NEAR_ROWS)
        if n >= MIN_TIMINGS:
            self._known.add((i, rows))
        return n

    def rate(self, tree: Tree, rows: int) -> float:
        """Expected tokens per second per row."""
        return self.expected(tree) / self.step_seconds(tree, rows)

    # ---- the policy
    def choose(self, batch: int, context: int | None = None) -> Tree:
        if type(batch) is not int or batch < 1:  # (the checks' fast path: every step)
            _check_count(batch, "batch", 1)
        if context is not None and (type(context) is not int or context < 0):
            _check_count(context, "context", 0)
        rows, self._rows = self._rows, batch
        last = self._queue[-1][0] if self._queue else self._last  # the last tree observed
        if self._queue and (self._burst_left or not self._hold or self._pending is not None
                            or self._held != (batch, last)):
            self.flush()  # deferred observations: only a held choice with no exploration
            # waiting needs none of them
        if self._burst_left > 0 and batch == rows:  # an exploration goes on for EXPLORE_RUN
            self._burst_left -= 1  # steps at its rows (not into the next call: the demo's
            self._explored = True  # B 16 ran a 16-node tree begun at 1 row at 16, 4x dearer)
            return self._burst
        self._burst_left = 0
        if self._hold > 0 and self._held == (batch, last):  # the last choice holds, unless
            self._hold -= 1  # the exploration it found waiting can now be afforded
            self._explored = False
            if self._pending is None or not self._explore_now(*self._pending):
                return last
            return self._burst
        n = len(self.candidates)
        cached = self._rates.get(batch)
        if cached is None:
            cached = self._rates[batch] = ([0.0] * n, [-1, -1])
        raw, seen = cached  # kept until observe changes them
        if seen[0] != self._generation[0]:
            raw[0] = self.rate(self.candidates[0], batch)
            seen[0] = self._generation[0]
        if seen[1] != self._generation[1]:
            raw[1:] = [self.rate(t, batch) for t in self.candidates[1:]]
            seen[1] = self._generation[1]
        rates = list(raw)
        table = None  # the table's tree: measured with care, beaten by a margin
        if self.table is not None:
            if batch not in self._table_pick:
                self._table_pick[batch] = self._index.get(self.table.choose(batch))
            table = self._table_pick[batch]
            if table is not None:
                rates[table] *= 1 + self.table_trust
        best = max(range(n), key=lambda i: (rates[i], -len(self.candidates[i])))
        # ties within the tolerance: the table's tree if it is among them (timed with care,
        # its near-ties broken toward the smaller tree; a step's estimate overrates a bigger
        # tree in a batch: it spreads the rows' ends, and the tail's steps serve few rows,
        # those the heads serve worst: the demo's B 16 held B 4's 4-node tree, 2% behind the
        # table's 2-node tree per full-batch step, 7% per call), else the previous choice
        # if a Medusa tree (not a tree just explored: it must win outright), else the
        # smallest Medusa tree (a plain step learns nothing about the heads: while plain
        # runs, their estimates only age), else plain decoding
        near = rates[best] * (1 - self.tolerance)
        last = self._index.get(self._held[1]) if self._held is not None else None
        tied = [i for i in range(1, n) if rates[i] >= near]  # the Medusa trees tied
        if table is not None and rates[table] >= near:
            best = table
        elif last in tied:
            best = last
        elif tied:
            best = min(tied, key=lambda i: len(self.candidates[i]))
        else:
            best = 0
        self._explored, self._pending = False, None
        if self._best_at.get(batch) != best:  # the choice here changed: re-checks are due
            self._best_at[batch] = best  # at the first wait again
            self._wait.pop(batch.bit_length(), None)
        if self.explore > 0:
            pick = self._explore_pick(best, rates, batch, table)
            if pick is not None:
                j, recheck = pick
                # per step: its time less the time its tokens take with the best tree; and
                # the two switches (into it, back to the best) cost what switches cost
                ej, eb = self.expected(self.candidates[j]), self.expected(self.candidates[best])
                loss = ej * (1 / raw[j] - 1 / raw[best])
                switches = max(self._switch, 0.0) * (ej / raw[j] + eb / raw[best])
                # a tree never timed here runs two steps (its first, a switch and often the
                # first use of its buffers, is slow: the smaller of the two is its cost),
                # else EXPLORE_RUN
                run = EXPLORE_RUN if self._timings(j, batch) else 2
                # a tree never timed at all is priced by the prior alone, the roughest guess
                # there is: its first step is worth FIRST_EXPLORE times the budget
                worth = 1.0 if self._timed.get(j) else FIRST_EXPLORE
                self._pending = (j, run, (run * loss + switches) / worth,
                                 batch.bit_length(), recheck)
                if self._explore_now(*self._pending):
                    return self._burst
        # the choice holds a few steps (a close one too: the tie rules above keep it; weighing
        # it every step was 1% of the demo's B 16 step, the policy's Python run cold after
        # the model's)
        self._held, self._hold = (batch, self.candidates[best]), DECIDE_EVERY - 1
        return self.candidates[best]

    def _explore_now(self, j: int, run: int, loss: float, band: int, recheck: bool) -> bool:
        """Start exploring candidate ``j`` for ``run`` steps if the steps at this load
        (``band``: the rows' bit length) since its last exploration have cost enough
        (``explore`` x their time >= its expected ``loss``); a ``recheck`` (not a first
        timing) doubles the load's wait."""
        if self.explore * self._idle.get(band, 0.0) < loss:
            return False
        self._explored, self._burst, self._burst_left = True, self.candidates[j], run - 1
        self._recheck = (None, [])
        self._hold, self._pending = 0, None
        if recheck:
            wait = self._wait.get(band, RECHECK_STEPS)
            self._wait[band] = min(2 * wait, RECHECK_BACKOFF * RECHECK_STEPS)
        return True

    def _explore_pick(self, best: int, rates: list[float], batch: int,
                      table: int | None) -> tuple[int, bool] | None:
        """The candidate an exploration step would run (class doc) and whether it is a
        re-check (not a first timing here); or None. ``table``: the table's tree for the
        batch (a candidate's index), if any."""
        # worth timing: within the margin of the best (a table's times or measured ones make
        # a far worse estimate unlikely to hide the best tree), and whatever their estimates
        # a plain step (the floor the policy must not fall below) and the table's tree for the
        # batch (its starting point: the demo's B 16 never timed the table's 2-node tree at
        # 16 rows, rated below the margin from its times elsewhere: 0.917x the table)
        margin = EXPLORE_MARGIN[self._table_times]
        likely = [i for i in range(len(self.candidates)) if i != best
                  and (i in (0, table) or rates[i] >= (1 - margin) * rates[best])]
        few = [i for i in likely if self._timings(i, batch) < MIN_TIMINGS]
        if few:  # the likely candidates timed a few times first, the best-rated first
            return max(few, key=lambda i: (rates[i], -len(self.candidates[i]))), False
        band = batch.bit_length()
        if not likely or self._steps_since.get(band, 0) < self._wait.get(band, RECHECK_STEPS):
            return None
        # a re-check: of the likely candidates, the one timed here least recently (a slow
        # spell when one was timed, its first steps paging the heads in, say, would otherwise
        # price it for good: SmolLM2's 2-node tree, at 1.5x a plain step for 1.1x, was never
        # timed again while the 4-node one was re-checked); ties: the best-rated
        return min(likely, key=lambda i: (self._timed_at.get((i, band), -1), -rates[i])), True

    def observe(self, tree: Sequence[Sequence[int]], batch: int, seconds: float | None,
                leaves: Sequence[int] | None = None, context: int | None = None) -> None:
        """One step's outcome (class doc). ``tree`` must be a candidate; ``context``: the
        step's longest sequence (None: one speed for every context)."""
        if context is not None and (type(context) is not int or context < 0):
            _check_count(context, "context", 0)
        try:  # the loop's trees are tuples of tuples already
            i = self._index.get(tree) if type(tree) is tuple else None
        except TypeError:  # a tuple of lists
            i = None
        if i is None:
            tree = tuple(tuple(p) for p in tree)
            i = self._index.get(tree)
        if i is None:
            raise ValueError(f"{self.name}: observe got a tree that is not a candidate "
                             f"({len(tree) + 1} nodes)")
        if tree and leaves and (min(leaves) < 0 or max(leaves) > len(tree)):
            leaf = next(x for x in leaves if not 0 <= x <= len(tree))
            raise ValueError(f"{self.name}: leaf {leaf} is not a node of a tree of "
                             f"{len(tree) + 1} nodes")
        if self.defer and not self._explored:  # applied when choose next needs it
            self._queue.append((tree, i, batch, seconds, leaves, context))
            return
        self.flush()
        self._apply(tree, i, batch, seconds, leaves, context)

    def flush(self) -> None:
        """Apply the observations ``defer`` kept back (the estimates are then up to date)."""
        queue, self._queue = self._queue, []
        for entry in queue:
            self._apply(*entry)

    def _apply(self, tree: Tree, i: int, batch: int, seconds: float | None,
               leaves: Sequence[int] | None, context: int | None) -> None:
        """``observe``'s work: candidate ``i`` (``tree``) ran a step (class doc)."""
        if self.step_cost is not None:
            seconds = float(self.step_cost(tree, batch))
        self.log.append((batch, tree, seconds))
        # a kind priced with the other's cost ratio (``ratio``) changes with it, and a kind
        # timed at new rows may become the one the other borrows from: then both
        both = (not tree) in self._borrowed or (bool(tree), batch) not in self._ratio
        if both:
            self._borrowed.clear()  # the rates recomputed say again who borrows
        if tree or both:
            self._generation[1] += 1
        if not tree or both:
            self._generation[0] += 1
        # a step that switches trees pays for it (cold caches, other buffers): its time does
        # not count, except as a tree's first
        switched = self._last is not None and tree != self._last
        self._last = tree
        key, band = (i, batch), batch.bit_length()
        valid = seconds is not None and seconds > 0 and math.isfinite(seconds)
        normed = valid and not (switched and key in self.cost)
        self._observed += 1
        # the machine's speed now: the running tree's last times at these rows against its
        # established cost (a fair comparison: the same rows, a few tokens more context),
        # else the speed tracker (which lags: a step's cost grows with the context, and the
        # rows change as sequences finish)
        at = None if context is None else int(CONTEXT_BANDS * math.log2(context + 1))
        speed = band_speed = self._speed_at(at)
        # a shorter context than the running tree's last times: a new call, whose steps are
        # cheaper (not a fair pair; those times are dropped once the running tree runs again)
        shorter = context is not None and self._ref_ctx is not None and context < self._ref_ctx
        if self._ref and self._ref_key[1] == batch and self._ref_key != key and \
                self._observed - self._ref_at <= REF_STEPS and not shorter:
            speed = statistics.median(self._ref) / self.cost[self._ref_key]
        usual = seconds / speed if valid else None  # the time at the usual speed
        if valid and not normed:  # what a switch costs, in the tree's steps
            extra = min(max(usual / self.cost[key] - 1, -0.5), 2.0)
            self._switch += self.alpha * (extra - self._switch)
        if normed:
            old, n = self.cost.get(key), self._count.get(key, 0)
            first = self._first.setdefault(key, [])
            if n >= self._established and not self._explored:  # the running tree, its cost
                # here well established: what it takes against its estimate is the speed
                # (a shared machine drifts); its estimate stays, the others are kept in the
                # same units (tracking both would split one signal two ways)
                self.speed = self._track(("speed", at), band_speed, seconds / old)
                if at is not None:
                    self._speeds[at] = self.speed
                usual = seconds / self.speed
                if self._ref_key != key or shorter:
                    self._ref.clear()
                    self._ref_key = key
                self._ref.append(seconds)
                self._ref_at, self._ref_ctx = self._observed, context
            else:  # costs are kept at the machine's usual speed
                if len(first) < FIRST_TIMES:  # noise only slows: the smaller of the first
                    first.append(usual)  # two times, then the median of the first five (a
                    self.cost[key] = min(first) if len(first) <= 2 else \
                        statistics.median(first)
                elif self._explored:  # a re-check: the median of its times and the estimate
                    # before it (the demo's B 16 set its 2-node tree's cost at 1.3x in a slow
                    # first call; re-checks moving it 2% a time left a 4-node tree ahead for
                    # ever); one slow time moves it halfway, two agreeing times all the way
                    if self._recheck[0] != key:
                        self._recheck = (key, [old])
                    self._recheck[1].append(usual)
                    self.cost[key] = statistics.median(self._recheck[1])
                else:  # then its median (a tree running: its estimate may be stale, the
                    # machine drifted since)
                    self.cost[key] = self._track(key, old, usual)
            self._count[key] = min(n + 1, self._max_count)
            self._timed_at[(i, band)] = self._observed
            timed = self._timed.setdefault(i, set())
            if batch not in timed:
                timed.add(batch)
                self._near = {k: v for k, v in self._near.items() if k[0] != i}
            ratio = usual / self.prior_cost(tree, batch)
            kind = bool(tree)
            old = self._ratio.get((kind, batch))
            if old is None:
                self._ratio_src.clear()
            self._ratio[(kind, batch)] = ratio if old is None else \
                old + self.alpha * (ratio - old)
        if self._explored:  # the exploration budget is spent
            self._idle[band], self._explored, self._steps_since[band] = 0.0, False, 0
            self._burst_left = 0 if tree != self._burst else self._burst_left
        else:
            self._idle[band] = self._idle.get(band, 0.0) + (
                usual if valid else self.step_seconds(tree, batch))
            self._steps_since[band] = self._steps_since.get(band, 0) + 1
        if not tree or not leaves:
            return
        kids = self._children[i]
        hits: dict[tuple[int, int], float] = {}
        trials: dict[tuple[int, int], float] = {}
        for leaf, count in Counter(leaves).items():  # rows mostly end at a few leaves
            path = tree[leaf - 1] if leaf else ()
            for d in range(len(path) + 1):
                on = path[d] if d < len(path) else None
                for r in kids.get(path[:d], ()):
                    trials[(d, r)] = trials.get((d, r), 0.0) + count
                    if r == on:
                        hits[(d, r)] = hits.get((d, r), 0.0) + count
        g = self.decay  # each step decays the older ones: at many rows, a decay per row
        # would keep a step or two (at 64 rows the 4-node tree's estimate swung 2.0-2.8 tokens
        # from one call to the next); the nodes this step did not test too, down to
        # STALE_TRIALS: their counts came from other steps, often other prompts, and the next
        # exploration must be able to correct them (the demo's B 16 kept B 4's deeper
        # acceptance, 0.77 and 0.94 for 0.72 and 0.82, with several times the trials an
        # exploration brings: its 4-node tree's tokens rated 5-7% above what it realized)
        for d, r in self._used:
            t, n = self.trials[d][r], trials.get((d, r))
            if n is None and t <= STALE_TRIALS:
                continue
            f = g if n is not None else max(g, STALE_TRIALS / t)
            self.hits[d][r] = f * self.hits[d][r] + hits.get((d, r), 0.0)
            self.trials[d][r] = f * t + (n or 0.0)
        self._expected = None

    def _speed_at(self, at: int | None) -> float:
        """The machine's speed at a band of contexts (``at``; None: the latest speed): its
        own, else the nearest band's, else the latest."""
        if at is None or not self._speeds:
            return self.speed
        speed = self._speeds.get(at)
        if speed is None:
            speed = self._speeds[min(self._speeds, key=lambda b: (abs(b - at), b))]
        return speed

    def _track(self, key, old: float, value: float) -> float:
        """A median tracker: ``old`` moved towards ``value`` by at most ``MEDIAN_STEP`` of it
        (noise's spikes move it no more than any other time; a mean would follow them), the
        step doubling while the values stay on one side (up to 8x: a drift is caught up within
        a few steps)."""
        if value == old:
            return old
        side = 1 if value > old else -1
        run = self._side.get(key, 0)  # the run on one side, its length capped where the step
        run = min(abs(run) + 1, 4) * side if run * side > 0 else side  # stops doubling (a run
        self._side[key] = run  # of a server's life on one side: no ever larger powers)
        step = MEDIAN_STEP * (1 << (abs(run) - 1)) * old
        return old + min(max(value - old, -step), step)

    def trees(self) -> list[Tree]:
        return list(self.candidates)

    def __repr__(self) -> str:
        return (f"OnlinePolicy({len(self.candidates)} candidates, up to "
                f"{max(len(t) for t in self.candidates) + 1} nodes)")


def _table_cost(table: TreePolicy, nodes: int, rows: int) -> float | None:
    """A table's step_ms for a tree of ``nodes`` paths at ``rows`` rows: interpolated linearly
    in nodes among the sizes timed at a batch (extrapolated past the largest: along the last
    two, or in proportion to the nodes past a single one), then in batch
    between the measured batches (proportionally to rows past the largest); None where the
    table records no times."""
    def at(batch: int) -> float | None:
        pts = sorted({(len(r.tree), float(r.info["step_ms"])) for r in table.rows
                      if r.batch == batch and "step_ms" in r.info
                      and bool(r.tree) == bool(nodes)})
        if not pts:
            return None
        if nodes <= pts[0][0]:
            return pts[0][1]
        if len(pts) == 1:  # one size timed (the bigger ones were pruned as too slow there):
            return pts[0][1] * (nodes + 1) / (pts[0][0] + 1)  # as dear per node
        for (n0, c0), (n1, c1) in zip(pts, pts[1:], strict=False):
            if nodes <= n1:
                return c0 + (c1 - c0) * (nodes - n0) / (n1 - n0)
        (n0, c0), (n1, c1) = pts[-2], pts[-1]
        return c1 + max(c1 - c0, 0.0) * (nodes - n1) / (n1 - n0)

    batches = [b for b in table.batches if at(b) is not None]
    if not batches:
        return None
    if rows <= batches[0]:
        return at(batches[0])
    if rows >= batches[-1]:
        return at(batches[-1]) * rows / batches[-1]
    j = bisect.bisect_right(batches, rows)
    b0, b1 = batches[j - 1], batches[j]
    c0, c1 = at(b0), at(b1)
    return c0 + (c1 - c0) * (rows - b0) / (b1 - b0)
