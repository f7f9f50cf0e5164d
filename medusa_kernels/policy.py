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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .tree import resolve_choices, validate_choices

VERSION = 1
ROW_KEYS = ("batch", "context", "tree", "speedup")
INFO_KEYS = ("nodes", "expected_accepted", "measured_accepted", "step_ms", "plain_step_ms",
             "note")
Tree = tuple[tuple[int, ...], ...]


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
