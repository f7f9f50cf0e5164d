"""The bench's stated targets, and each row's verdict against them.

A target names the rows it judges (a section, the ``impl``/``mode``/case values they carry, the
device kind), a metric and a bound: ``frac_floor >= 0.80``, ``ratio_vs_plain <= 1.20``, or,
with ``peer``, the metric against the same case's peer row in the same run (``median_us <= 1.00
x sdpa_nomask``). ``judge`` writes each matching row's ``target`` cell, one of

- ``met: <metric> <value> >= <bound>``, ``missed: ...``;
- ``too short to judge: ...``: a decoding ratio from runs too short or too few to mean something
  (fewer than ``MIN_NEW_TOKENS`` new tokens per sequence, or fewer than ``MIN_RUNS`` runs or
  prompts), e.g. ``bench --quick``'s 16-token throughput runs;
- ``no value``: the row lacks the metric (its case failed, say).

and ``summary`` lists every target that applies to the run with its verdicts, ``not measured``
where no row matched (a ``--quick`` run or a ``--shapes`` filter leaves some out). A missed
target is a measurement, not an error: it does not change the exit status.

Sources: issue 26 (kernels), issue 22 (the decoder step), issue 16 (compaction), and the
throughput policy's purpose (``README``: the policy can always pick the plain step).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from .report import case_keys, case_label, fmt, header, tally

MIN_NEW_TOKENS = 64  # new tokens per sequence a decoding ratio needs to be judged
MIN_RUNS = 3  # runs (throughput) or prompts (e2e generation) it needs


@dataclass(frozen=True)
class Target:
    section: str
    where: dict  # row key -> value, or a tuple of accepted values
    metric: str
    op: str  # ">=" or "<="
    bound: float
    source: str
    device: str = "cuda"  # "cuda", "cpu" or "any"
    peer: dict | None = None  # overrides of the row's identity naming the row to compare with
    decoding: bool = False  # a ratio of decoding runs: judged only when they are long enough

    def text(self) -> str:
        if self.peer:
            peer = " ".join(f"{k}={v}" for k, v in self.peer.items())
            return f"{self.metric} {self.op} {self.bound:g} x {peer}"
        return f"{self.metric} {self.op} {self.bound:g}"

    def name(self) -> str:
        where = " ".join(f"{k}={'/'.join(map(str, v)) if isinstance(v, tuple) else v}"
                         for k, v in self.where.items())  # fmt: skip
        return f"{self.section} {where}: {self.text()}"

    def applies(self, device: str) -> bool:
        return self.device in ("any", device)

    def matches(self, row: dict) -> bool:
        if row.get("section", self.section) != self.section:
            return False
        for key, want in self.where.items():
            got = row.get(key)
            if got not in (want if isinstance(want, tuple) else (want,)):
                return False
        return True


_GRAPH_B1 = {"impl": "triton", "mode": "graph", "B": 1}
TARGETS: tuple[Target, ...] = (
    # issue 26: tree attention, T 64 (the mc_sim_7b_63 tree)
    Target("tree_attention", {**_GRAPH_B1, "T": 64, "Hkv": 32, "L": 16384}, "frac_floor", ">=",
           0.80, "issue 26"),
    Target("tree_attention", {**_GRAPH_B1, "T": 64, "Hkv": 32, "L": 4096}, "frac_floor", ">=",
           0.70, "issue 26"),
    Target("tree_attention", {**_GRAPH_B1, "T": 64, "Hkv": 8, "L": 16384}, "frac_roofline",
           ">=", 0.55, "issue 26 (compute-bound: 256 FLOP per KV byte)"),
    # issue 26: decode (T 1) at least as fast as SDPA (FlashAttention) in the same run
    Target("tree_attention", {**_GRAPH_B1, "T": 1, "L": (4096, 16384)}, "median_us", "<=", 1.0,
           "issue 26", peer={"impl": "sdpa_nomask"}),
    # issue 26: heads top-k at N 1: 0.90 of the floor and faster than bmm + topk
    Target("heads_topk", {"impl": "triton", "mode": "graph", "op": "heads", "N": 1},
           "frac_floor", ">=", 0.90, "issue 26"),
    Target("heads_topk", {"impl": "triton", "mode": "graph", "op": "heads", "N": 1},
           "median_us", "<=", 1.0, "issue 26", peer={"impl": "bmm_topk"}),
    # issue 16: compaction under graph replay
    Target("compact_kv", {"impl": ("triton", "cuda"), "mode": "graph", "Hkv": 32}, "median_us",
           "<=", 8.0, "issue 16"),
    Target("compact_kv", {"impl": ("triton", "cuda"), "mode": "graph", "Hkv": 8}, "median_us",
           "<=", 5.0, "issue 16"),
    # issue 22: the decoder step
    Target("e2e", {"impl": "medusa_step", "mode": "graph", "model": "vicuna-7b", "L": 1024,
                   "B": 1}, "ratio_vs_plain", "<=", 1.20, "issue 22"),
    Target("e2e", {"impl": "plain_decode", "model": "vicuna-7b"}, "frac_floor", ">=", 0.80,
           "issue 22"),
    Target("e2e", {"impl": "plain_decode", "model": "llama-1b"}, "frac_floor", ">=", 0.65,
           "issue 22"),
    # Medusa decoding must beat plain decoding where its tree suits the device: every tree on a
    # GPU; on a CPU the tree calibrated for it (the 63-node tree is known slower there: README)
    Target("e2e", {"impl": "medusa_generate"}, "speedup", ">=", 1.0, "README (GPU)",
           decoding=True),
    Target("e2e", {"impl": "medusa_generate", "tree": "calibrated_tree_cpu.json"}, "speedup",
           ">=", 1.0, "README (CPU tree)", device="cpu", decoding=True),
    # throughput: the fixed tree (calibrated for one sequence) helps at B 1; the policy never
    # loses to plain decoding (it can pick the plain step) nor, by more than noise, to the
    # better of plain and the fixed tree. CPU: the process's CPU time (``cpu_*``).
    Target("throughput", {"impl": "fixed", "B": 1}, "speedup", ">=", 1.0, "README",
           decoding=True),
    Target("throughput", {"impl": "adaptive"}, "speedup", ">=", 1.0, "README", decoding=True),
    Target("throughput", {"impl": "adaptive"}, "vs_best", ">=", 0.95, "README", decoding=True),
    Target("throughput", {"impl": "fixed", "B": 1}, "cpu_speedup", ">=", 1.0, "README",
           device="cpu", decoding=True),
    Target("throughput", {"impl": "adaptive"}, "cpu_speedup", ">=", 1.0, "README",
           device="cpu", decoding=True),
    Target("throughput", {"impl": "adaptive"}, "cpu_vs_best", ">=", 0.95, "README",
           device="cpu", decoding=True),
)  # fmt: skip


def too_short(row: dict) -> str | None:
    """Why a decoding row's ratio cannot be judged, or None when its runs are long enough."""
    new = row.get("max_new_tokens")
    runs = row.get("tokens_per_s_runs")
    count = len(runs) if isinstance(runs, list) else row.get("prompts")
    if isinstance(new, int) and new < MIN_NEW_TOKENS:
        return f"{new} new tokens a sequence < {MIN_NEW_TOKENS}"
    if isinstance(count, int) and count < MIN_RUNS:
        what = "runs" if isinstance(runs, list) else "prompts"
        return f"{count} {what} < {MIN_RUNS}"
    return None


_IDENTITY = ("impl", "mode")


def _peer_row(target: Target, row: dict, rows: list[dict]) -> dict | None:
    """The row of the same case as ``row`` with the peer's identity (``target.peer``)."""
    keys = [k for k in case_keys([row]) if k not in target.peer]
    want = {**{k: row.get(k) for k in (*_IDENTITY, *keys)}, **target.peer}
    for other in rows:
        if other is not row and all(other.get(k) == v for k, v in want.items()):
            return other
    return None


def verdict(target: Target, row: dict, rows: list[dict]) -> tuple[str, bool | None]:
    """(the cell text, met: True / False / None when not judged) of ``row`` against ``target``."""
    if target.decoding:
        short = too_short(row)
        if short is not None:
            return f"too short to judge: {short}", None
    value = row.get(target.metric)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return f"no value: {target.metric} not measured", None
    name = header(target.metric)
    if target.peer:
        peer = _peer_row(target, row, rows)
        other = None if peer is None else peer.get(target.metric)
        peer_name = "/".join(map(str, target.peer.values()))
        if not isinstance(other, (int, float)) or not other:
            return f"no value: no {peer_name} row to compare with", None
        value = value / other
        text = f"{name} {fmt(float(value))}x {peer_name}'s {target.op} {target.bound:g}x"
    else:
        text = f"{name} {fmt(float(value))} {target.op} {target.bound:g}"
    met = value >= target.bound if target.op == ">=" else value <= target.bound
    return ("met: " if met else "missed: ") + text, met


def judge(section: str, rows: list[dict], device: str,
          targets: Iterable[Target] = TARGETS) -> list[dict]:
    """Write the ``target`` cell of every row of ``section`` a target judges (several targets:
    their verdicts joined by "; "). Returns one record per judged (target, row)."""
    records = []
    for target in targets:
        if target.section != section or not target.applies(device):
            continue
        for row in rows:
            if "median_us" not in row and "tokens_per_s" not in row and target.metric not in row:
                continue  # a failure row: its own check says why
            if not target.matches(row):
                continue
            text, met = verdict(target, row, rows)
            if not row.get("target"):
                row["target"] = text
            elif text not in row["target"].split("; "):  # one "too short" for several targets
                row["target"] += f"; {text}"
            records.append({"target": target.name(), "source": target.source,
                            "row": _row_label(row), "verdict": text, "met": met})  # fmt: skip
    return records


def _row_label(row: dict) -> str:
    ident = " ".join(str(row[k]) for k in _IDENTITY if row.get(k) is not None)
    return f"{ident} {case_label(row)}".strip()


def summary(result: dict, targets: Iterable[Target] = TARGETS) -> list[dict]:
    """Every target that applies to this run (device, sections run) with its verdicts; a target
    no row matched is "not measured"."""
    device = result["meta"].get("device", "cpu")
    sections = result.get("sections", {})
    out = []
    for target in targets:
        if not target.applies(device) or target.section not in sections:
            continue
        rows = [{k: v for k, v in r.items() if k != "target"}
                for r in sections[target.section]["rows"]]
        records = judge(target.section, rows, device, [target])
        if not records:
            out.append({"target": target.name(), "source": target.source, "row": "-",
                        "verdict": "not measured", "met": None})  # fmt: skip
        out += records
    return out


__all__ = ["MIN_NEW_TOKENS", "MIN_RUNS", "TARGETS", "Target", "judge", "summary", "tally",
           "too_short", "verdict"]
