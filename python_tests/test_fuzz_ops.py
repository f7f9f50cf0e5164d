"""Property-based fuzzing of every public op (issue 18), on the torch backend and the Triton
kernels (the interpreter here), as a hostile caller would call them.

Each example is a valid call or a malformed one (one thing broken: a shape, a dtype, a type, a
value, a backend name). The runner (``run_case``) asserts:

- a malformed call raises ValueError or TypeError whose message names the offending argument;
  a valid call returns the documented result (checked against an independent float64 or loop
  reference in this file: the ops' own ``*_ref`` is not trusted);
- never another exception type, a crash or a hang (``SIGALRM`` guard);
- no memory changes outside what the call may write: every input is compared bit for bit
  before and after, and caches live inside NaN-poisoned guard buffers, so a write just outside
  a tensor is caught too. Compaction may change only the accepted rows' slots (the expected
  cache is computed here), and nothing at all when it raises.

Value checks run on the host for CPU tensors; the "unchecked" cases patch ``check_values`` to
False, as on CUDA without ``MEDUSA_KERNELS_CHECKS=1``, and assert the documented clamp / skip.

Every malformation kind is a test of its own (a few examples each), so each is exercised on
every backend. Deterministic (``derandomize=True``, no example database) and bounded: about
25 s of CPU time on 2 cores (Triton interpreter calls cost 25-250 ms each).

The defects the first campaign found (issue 18: int32 length wrap, NaN leaking from unused
slots, T = 0, D = 0, softmax_scale, K = 0 heads) are regression tests at the end, and their
cases are part of the properties.
"""

from __future__ import annotations

import contextlib
import math
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from unittest import mock

import pytest
import torch
from conftest import HAS_CUDA
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import medusa_kernels as mk
from medusa_kernels import ops
from medusa_kernels.ops import acceptance, compact_kv

pytestmark = pytest.mark.skipif(HAS_CUDA, reason="fuzzes the CPU paths and the interpreter")
BACKENDS = ["torch", "triton"]
CASE_TIMEOUT_S = 60


def fuzz(max_examples: int):
    return settings(max_examples=max_examples, derandomize=True, database=None, deadline=None,
                    suppress_health_check=list(HealthCheck), print_blob=False)


# ------------------------------------------------------------------------------------ runner


def bits(t: torch.Tensor) -> torch.Tensor:
    """A bitwise view (NaN compares equal to itself); bool and ints as they are."""
    if t.dtype.is_floating_point:
        return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return t


def snapshot(tensors) -> list[torch.Tensor]:
    return [bits(t).clone() for t in tensors]


def unchanged(tensors, before) -> bool:
    return all(torch.equal(bits(t), b) for t, b in zip(tensors, before, strict=True))


@dataclass
class Case:
    """One call: ``bad`` names the argument(s) the error may name (None: a valid call);
    ``inputs``: tensors that must come back bit-identical; ``writes``: (tensor, expected)
    pairs that must equal ``expected`` bitwise after a valid call (unchanged after an error);
    ``check``: validates the returned value."""

    call: Callable[[], object]
    bad: tuple[str, ...] | None
    why: str
    inputs: list[torch.Tensor] = field(default_factory=list)
    writes: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    check: Callable[[object], None] = lambda out: None
    unchecked: tuple = ()  # modules whose check_values is patched off for the call


@contextlib.contextmanager
def time_limit(seconds: int):
    def fail(signum, frame):
        raise TimeoutError(f"call ran past {seconds} s (a hang)")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def run_case(case: Case) -> None:
    keep = snapshot(case.inputs)
    written = [t for t, _ in case.writes]
    keep_written = snapshot(written)
    patches = [mock.patch.object(m, "check_values", lambda device: False) for m in case.unchecked]
    try:
        with contextlib.ExitStack() as stack, time_limit(CASE_TIMEOUT_S):
            for p in patches:
                stack.enter_context(p)
            out = case.call()
    except (ValueError, TypeError) as e:
        assert case.bad is not None, f"valid call ({case.why}) raised {type(e).__name__}: {e}"
        assert any(name in str(e) for name in case.bad), (
            f"{case.why}: the error does not name {case.bad}: {type(e).__name__}: {e}")
        assert unchanged(case.inputs, keep), f"{case.why}: an input changed before the error"
        assert unchanged(written, keep_written), f"{case.why}: memory written before the error"
        return
    assert case.bad is None, f"malformed call ({case.why}) returned instead of raising"
    assert unchanged(case.inputs, keep), f"{case.why}: a read-only input changed"
    for t, want in case.writes:
        assert torch.equal(bits(t), bits(want)), f"{case.why}: written memory differs"
    case.check(out)


def guarded(shape, dtype, gen, guard=7) -> tuple[torch.Tensor, torch.Tensor]:
    """(tensor, its buffer): a random tensor inside a NaN-poisoned buffer with guard elements on
    both sides, so writes just outside the tensor show in the buffer."""
    n = math.prod(shape)
    buf = torch.full((n + 2 * guard,), float("nan"), dtype=dtype)
    buf[guard : guard + n] = torch.randn(n, generator=gen).to(dtype)
    return buf[guard : guard + n].view(shape), buf


def kinds_params(kinds, valid: dict[str, int], bad: dict[str, int]):
    """pytest params (backend, kind, examples): every kind on every backend, so each one is
    exercised (hypothesis, left to pick kinds, draws the first few most of the time)."""
    return [pytest.param(backend, kind, (valid if kind == "valid" else bad)[backend],
                         id=f"{backend}-{kind}")
            for backend in valid for kind in ["valid", *sorted(kinds)]]


def fuzz_test(build):
    """The body of a kind-parametrised fuzz test: ``examples`` calls from ``build``."""
    def body(backend, kind, examples):
        @fuzz(max_examples=examples)
        @given(data=st.data())
        def prop(data):
            run_case(build(data, backend, kind))

        prop()
    return body


def seeded(data) -> torch.Generator:
    return torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    tol = {torch.float32: 2e-4, torch.float16: 1e-2, torch.float64: 2e-6}[dtype]  # fp32 out
    torch.testing.assert_close(got.double(), want.double(), atol=tol, rtol=tol, msg=what)


NOT_A_TENSOR = [None, 3, [1.0, 2.0], "x"]

# ------------------------------------------------------------------------------ tree_attention


def random_tree(data, max_nodes: int = 8) -> mk.TreeBuffers:
    """A random Medusa tree (prefix-closed paths of ranks), root included."""
    paths: list[tuple[int, ...]] = []
    # hypothesis draws its simplest value (0 here) often: count down from the largest tree
    for _ in range(data.draw(st.integers(0, max_nodes).map(lambda n: max_nodes - n))):
        parent = data.draw(st.sampled_from([(), *paths])) if paths else ()
        if len(parent) >= 4:
            continue
        path = (*parent, data.draw(st.integers(0, 3)))
        if path not in paths:
            paths.append(path)
    return mk.build_tree([list(p) for p in paths])


def attention_naive(q, k, v, lens, mask, scale, table=None, window=None, softcap=None,
                    depths=None):
    """Float64 loop: query t of sequence b over the prefix and the tree nodes it sees."""
    B, T, Hq, D = q.shape
    if B == 0:
        return torch.zeros(q.shape, dtype=torch.float64)
    if table is not None:  # paged -> dense positions
        k = torch.stack([k[table[b].clamp(min=0).long()].flatten(0, 1) for b in range(B)])
        v = torch.stack([v[table[b].clamp(min=0).long()].flatten(0, 1) for b in range(B)])
    G = Hq // k.shape[2]
    out = torch.zeros(B, T, Hq, D, dtype=torch.float64)
    dep = mask.sum(1) - 1 if depths is None else depths
    for b in range(B):
        L = int(lens[b])
        for t in range(T):
            keys = list(range(L)) + [L + u for u in range(T) if mask[t, u]]
            if window is not None:
                qpos = L + int(dep[t])
                keys = [j for j in keys if (j if j < L else L + int(dep[j - L])) > qpos - window]
            for h in range(Hq):
                kk = k[b, keys, h // G].double()
                s = kk @ q[b, t, h].double() * scale
                if softcap is not None:
                    s = softcap * torch.tanh(s / softcap)
                out[b, t, h] = torch.softmax(s, 0) @ v[b, keys, h // G].double()
    return out


def tree_attention_case(data, backend: str, kind: str) -> Case:
    gen = seeded(data)
    triton = backend == "triton"
    B = data.draw(st.sampled_from([2, 1, 0] if triton else [2, 1, 3, 0]), label="B")
    tree = random_tree(data, 4)
    T = tree.num_nodes
    Hkv = data.draw(st.sampled_from([1, 2]))
    G = data.draw(st.sampled_from([1, 2, 4]))
    D = 64 if triton else data.draw(st.integers(1, 9))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16]))
    lens = [data.draw(st.integers(0, 12)) for _ in range(B)]
    S = max(lens, default=0) + T + data.draw(st.integers(0, 5))
    paged = data.draw(st.booleans(), label="paged")
    q = torch.randn(B, T, Hkv * G, D, generator=gen).to(dtype)
    table = None
    if paged:
        page = data.draw(st.sampled_from([2, 4, 8]))
        MB = -(-S // page)
        NB = B * MB + 2
        k, k_buf = guarded((NB, page, Hkv, D), dtype, gen)
        v, v_buf = guarded((NB, page, Hkv, D), dtype, gen)
        table = torch.randperm(NB, generator=gen)[: B * MB].view(B, MB).to(torch.int32)
        for b in range(B):
            table[b, -(-(lens[b] + T) // page) :] = -1  # unallocated pages
    else:
        k, k_buf = guarded((B, S, Hkv, D), dtype, gen)
        v, v_buf = guarded((B, S, Hkv, D), dtype, gen)
        for b in range(B):  # unused slots hold NaN: no backend may read them into a result
            k[b, lens[b] + T :] = float("nan")
            v[b, lens[b] + T :] = float("nan")
    seqlens = torch.tensor(lens, dtype=torch.int32)
    mask = tree.tree_mask.clone()
    if data.draw(st.booleans(), label="packed"):
        mask = ops.pack_tree_mask(mask)
    kwargs = dict(q=q, k_cache=k, v_cache=v, cache_seqlens=seqlens, tree_mask=mask,
                  block_table=table, backend=backend)
    if data.draw(st.booleans(), label="scale"):
        kwargs["softmax_scale"] = data.draw(st.floats(0.05, 2.0))
    if data.draw(st.booleans(), label="window/softcap"):
        kwargs["sliding_window"] = data.draw(st.integers(1, 20))
        kwargs["softcap"] = data.draw(st.sampled_from([None, 0.5, 30.0]))
    bad, why = None, f"valid B{B} T{T} G{G} Hkv{Hkv} D{D} {dtype} paged={paged}"
    if kind != "valid":
        bad = TREE_ATTENTION_BAD[kind](kwargs, data)
        why = why if bad is None else f"malformed: {kind}"

    def check(out):
        assert out.shape == (B, T, Hkv * G, D) and out.dtype == dtype
        want = attention_naive(
            q, k, v, seqlens, tree.tree_mask,
            kwargs.get("softmax_scale") or 1 / math.sqrt(D), table,
            kwargs.get("sliding_window"), kwargs.get("softcap"))
        close(out, want, dtype, why)

    inputs = [q, k_buf, v_buf, seqlens, mask] + ([] if table is None else [table])
    return Case(lambda: ops.tree_attention(**kwargs), bad, why, inputs, check=check)


def _set(key, value, names=None):
    """A mutation: set argument ``key``; returns the names its error may mention (None from a
    mutation means it found nothing to break: the call stays valid)."""
    def mutate(kwargs, data):
        kwargs[key] = value(kwargs) if callable(value) else value
        return names or (key,)
    return mutate


def _set_drawn(key, values):
    """A mutation: set argument ``key`` to one of ``values``."""
    def mutate(kwargs, data):
        kwargs[key] = data.draw(st.sampled_from(values))
        return (key,)
    return mutate


def _values_of_a_batch(mutate):
    """A value mutation of per-sequence entries: with B = 0 there is none to break."""
    def wrapped(kwargs, data):
        return None if kwargs["q"].shape[0] == 0 else mutate(kwargs, data)
    return wrapped


def _heads_not_multiple(kw):
    """Hq not a multiple of Hkv: one more query head (Hkv 2), or 3 KV heads (Hkv 1, Hq 1/2/4)."""
    if kw["k_cache"].shape[2] == 1:
        kw["k_cache"] = torch.cat([kw["k_cache"]] * 3, 2)
        kw["v_cache"] = torch.cat([kw["v_cache"]] * 3, 2)
    else:
        kw["q"] = torch.cat([kw["q"], kw["q"][:, :, :1]], 2)
    return ("q", "k_cache")


TREE_ATTENTION_BAD = {
    "q-not-tensor": _set_drawn("q", NOT_A_TENSOR),
    "q-3d": _set("q", lambda kw: kw["q"].flatten(0, 1)),
    "q-int": _set("q", lambda kw: kw["q"].long()),
    "k-dtype": _set("k_cache", lambda kw: kw["k_cache"].double()),
    "v-shape": _set("v_cache", lambda kw: kw["v_cache"][..., :-1, :], ("v_cache", "k_cache")),
    "k-head-dim": _set("k_cache", lambda kw: torch.cat([kw["k_cache"]] * 2, -1),
                       ("k_cache", "v_cache")),
    "heads-not-multiple": lambda kw, data: _heads_not_multiple(kw),
    "seqlens-int64": _set("cache_seqlens", lambda kw: kw["cache_seqlens"].long()),
    "seqlens-length": _set("cache_seqlens", lambda kw: torch.cat(
        [kw["cache_seqlens"], torch.zeros(1, dtype=torch.int32)])),
    "seqlens-negative": _values_of_a_batch(
        _set("cache_seqlens", lambda kw: torch.full_like(kw["cache_seqlens"], -3))),
    "seqlens-past-capacity": _values_of_a_batch(
        _set("cache_seqlens", lambda kw: kw["cache_seqlens"] + 10**6)),
    "mask-shape": _set("tree_mask", lambda kw: torch.ones(1, 3, dtype=torch.bool)),
    "mask-float": _set("tree_mask", lambda kw: kw["tree_mask"].float()),
    "mask-not-tensor": _set("tree_mask", [[True]]),
    "window-zero": _set("sliding_window", 0),
    "window-bool": _set("sliding_window", True),
    "softcap-nan": _set("softcap", float("nan")),
    "softcap-negative": _set("softcap", -1.0),
    "depths-shape": _set("tree_depths", lambda kw: torch.zeros(kw["q"].shape[1] + 1,
                                                               dtype=torch.long)),
    "backend-name": _set("backend", "fast"),
    "table-dtype": _set("block_table", lambda kw: torch.zeros(
        kw["q"].shape[0], 2, dtype=torch.long), ("block_table", "k_cache")),
}


@pytest.mark.parametrize("backend,kind,examples", kinds_params(
    TREE_ATTENTION_BAD, valid={"torch": 60, "triton": 16}, bad={"torch": 4, "triton": 2}))
def test_fuzz_tree_attention(backend, kind, examples):
    fuzz_test(tree_attention_case)(backend, kind, examples)


# --------------------------------------------------------------------- medusa/lm heads top-k


def heads_naive(hidden, w1, b1, w2):
    """Float64 logits [N, K, V] of every head."""
    h = hidden.double()
    z = torch.einsum("nd,ked->nke", h, w1.double()) + b1.double()
    return torch.einsum("nkd,kvd->nkv", h[:, None] + torch.nn.functional.silu(z), w2.double())


def check_topk(values, indices, logits, k, dtype, why):
    """values/indices [..., k] against float64 logits [..., V]: the right dtypes, distinct
    indices in [0, V) whose logits are the values and the k largest (up to near ties)."""
    assert values.dtype == torch.float32 and indices.dtype == torch.int64, why
    assert values.shape == (*logits.shape[:-1], k) == indices.shape, why
    V = logits.shape[-1]
    assert ((indices >= 0) & (indices < V)).all(), why
    if k > 1:
        assert (indices.sort(-1).values.diff(dim=-1) > 0).all(), f"{why}: repeated index"
    close(values, logits.gather(-1, indices), dtype, f"{why}: values are not the logits")
    close(values, logits.topk(k, dim=-1).values, dtype, f"{why}: not the top k")


def heads_case(data, backend: str, kind: str, lm: bool = False) -> Case:
    gen = seeded(data)
    triton = backend == "triton"
    N = data.draw(st.sampled_from([2, 1, 3, 0]), label="N")
    K = 1 if lm else data.draw(st.integers(1, 3))  # K = 0: refused, test_regression_heads_topk_K0
    d = data.draw(st.integers(1, 24))
    V = data.draw(st.integers(1, 40))
    k = data.draw(st.integers(1, min(V, 32 if triton else 40)))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16] +
                                      ([] if triton else [torch.float64])))
    hidden = torch.randn(N, d, generator=gen).to(dtype)
    w1 = (0.3 * torch.randn(K, d, d, generator=gen)).to(dtype)
    b1 = torch.randn(K, d, generator=gen).to(dtype)
    w2 = (0.3 * torch.randn(K, V, d, generator=gen)).to(dtype)
    if lm:
        kwargs = dict(hidden=hidden, weight=w2[0], k=k, backend=backend)
        fn, inputs = ops.lm_head_topk, [hidden, w2]
    else:
        kwargs = dict(hidden=hidden, w1=w1, b1=b1, w2=w2, k=k, backend=backend)
        fn, inputs = ops.medusa_heads_topk, [hidden, w1, b1, w2]
    bad, why = None, f"valid N{N} K{K} d{d} V{V} k{k} {dtype}"
    table = LM_BAD if lm else HEADS_BAD
    if kind != "valid":
        bad, why = table[kind](kwargs, data), f"malformed: {kind}"

    def check(out):
        values, indices = out
        logits = heads_naive(hidden, w1, b1, w2)
        if lm:
            logits = hidden.double() @ w2[0].double().T
        check_topk(values, indices, logits, k, dtype, why)

    return Case(lambda: fn(**kwargs), bad, why, inputs, check=check)


COMMON_TOPK_BAD = {
    "hidden-not-tensor": _set_drawn("hidden", NOT_A_TENSOR),
    "hidden-3d": _set("hidden", lambda kw: kw["hidden"][None]),
    "hidden-int": _set("hidden", lambda kw: kw["hidden"].long()),
    "k-zero": _set("k", 0),
    "k-past-V": _set("k", lambda kw: 10**6),
    "k-bool": _set("k", True),
    "k-float": _set("k", 2.5),
    "k-str": _set("k", "3"),
    "backend-name": _set("backend", "gpu"),
}
HEADS_BAD = COMMON_TOPK_BAD | {
    "w1-dtype": _set("w1", lambda kw: kw["w1"].to(
        torch.float16 if kw["w1"].dtype != torch.float16 else torch.float32)),
    "w1-shape": _set("w1", lambda kw: torch.cat([kw["w1"], kw["w1"][:, :1]], 1)),
    "b1-shape": _set("b1", lambda kw: torch.zeros(kw["b1"].shape[0] + 1, kw["b1"].shape[1],
                                                  dtype=kw["b1"].dtype)),
    "w2-hidden-size": _set("w2", lambda kw: torch.cat([kw["w2"], kw["w2"][..., :1]], -1)),
    "w2-not-tensor": _set_drawn("w2", NOT_A_TENSOR),
}
LM_BAD = COMMON_TOPK_BAD | {
    "weight-dtype": _set("weight", lambda kw: kw["weight"].to(
        torch.float16 if kw["weight"].dtype != torch.float16 else torch.float32)),
    "weight-hidden-size": _set("weight", lambda kw: torch.cat([kw["weight"]] * 2, 1)),
    "weight-1d": _set("weight", lambda kw: kw["weight"][0]),
}


@pytest.mark.parametrize("backend,kind,examples", kinds_params(
    HEADS_BAD, valid={"torch": 50, "triton": 8}, bad={"torch": 4, "triton": 2}))
def test_fuzz_medusa_heads_topk(backend, kind, examples):
    fuzz_test(heads_case)(backend, kind, examples)


@pytest.mark.parametrize("backend,kind,examples", kinds_params(
    LM_BAD, valid={"torch": 50, "triton": 10}, bad={"torch": 4, "triton": 2}))
def test_fuzz_lm_head_topk(backend, kind, examples):
    fuzz_test(lambda data, b, k: heads_case(data, b, k, lm=True))(backend, kind, examples)


# ---------------------------------------------------------------------------- compact_kv_cache


def compaction_valid(lens, acc, idx, S, table, num_blocks, page):
    """Per sequence: whether its values are valid (the module doc's rule, restated here)."""
    A = idx.shape[1]
    ok = []
    for b in range(len(lens)):
        L, n = int(lens[b]), int(acc[b])
        good = 0 <= n <= A and L >= 0 and L + n <= S
        for i in range(n if good else 0):
            j = int(idx[b, i])
            good = good and i <= j < S - L
            if good and table is not None:
                blocks = int(table[b, (L + j) // page]), int(table[b, (L + i) // page])
                good = all(0 <= x < num_blocks for x in blocks)
        ok.append(good)
    return ok


def compaction_expected(k, lens, acc, idx, table, ok):
    """The cache after compaction: valid sequences move their rows (all read first)."""
    out = k.clone()
    src_l, dst_l = (k, out) if k.dim() == 5 else (k[None], out[None])
    page = k.shape[-3]

    def loc(b, p):
        return (b, p) if table is None else (int(table[b, p // page]), p % page)

    for b in range(len(lens)):
        for i in range(int(acc[b]) if ok[b] else 0):
            s, d = loc(b, int(lens[b]) + int(idx[b, i])), loc(b, int(lens[b]) + i)
            dst_l[:, d[0], d[1]] = src_l[:, s[0], s[1]]
    return out


def compaction_case(data, backend: str, kind: str) -> Case:
    gen = seeded(data)
    B = data.draw(st.sampled_from([2, 3, 1, 0]), label="B")
    NL = data.draw(st.sampled_from([2, None, 1, 0]), label="NL")
    A = data.draw(st.integers(0, 4), label="A")
    T = A + data.draw(st.integers(0, 4))
    H, D = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 5))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16]))
    paged = data.draw(st.booleans(), label="paged")
    lens = [data.draw(st.integers(0, 10)) for _ in range(B)]
    acc = [data.draw(st.integers(0, A)) if A else 0 for _ in range(B)]
    S = max(lens, default=0) + T + data.draw(st.integers(0, 3))
    idx = torch.full((B, A), -1, dtype=data.draw(st.sampled_from([torch.int32, torch.int64])))
    for b in range(B):  # an increasing path from the root, below T
        if acc[b]:
            nodes = torch.randperm(max(T - 1, 1), generator=gen)[: acc[b] - 1].sort().values + 1
            idx[b, : acc[b]] = torch.cat([torch.zeros(1, dtype=torch.long), nodes]).to(idx.dtype)
    lead = () if NL is None else (NL,)
    table, page, num_blocks = None, 1, 1
    if paged:
        page = data.draw(st.sampled_from([2, 3, 4]))
        MB = -(-S // page)
        num_blocks = B * MB + 2
        S = MB * page
        k, k_buf = guarded((*lead, num_blocks, page, H, D), dtype, gen)
        v, v_buf = guarded((*lead, num_blocks, page, H, D), dtype, gen)
        table = torch.randperm(num_blocks, generator=gen)[: B * MB].view(B, MB).to(torch.int32)
    else:
        k, k_buf = guarded((*lead, B, S, H, D), dtype, gen)
        v, v_buf = guarded((*lead, B, S, H, D), dtype, gen)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    accept = torch.tensor(acc, dtype=torch.int32)
    kwargs = dict(k_cache=k, v_cache=v, cache_seqlens=seqlens, accept_indices=idx,
                  accept_lengths=accept, block_table=table, backend=backend)
    bad, why, unchecked = None, f"valid B{B} NL{NL} A{A} S{S} paged={paged}", ()
    mode, _, kind = kind.partition(":")
    if mode == "shape":
        bad, why = COMPACT_SHAPE_BAD[kind](kwargs, data), f"malformed: {kind}"
    elif mode != "valid" and B > 0:
        names = COMPACT_VALUE_BAD[kind](kwargs, data, S) if kind != "block" or paged else None
        if names is not None:
            bad, why = names, f"malformed value: {kind}"
            if mode == "unchecked-value":  # CUDA without checks: skipped, not refused
                bad, why, unchecked = None, f"unchecked: {kind}", (compact_kv,)
    lens_now = kwargs["cache_seqlens"].tolist()
    acc_now, idx_now, table_now = kwargs["accept_lengths"], kwargs["accept_indices"], \
        kwargs["block_table"]
    writes = []
    if bad is None:
        ok = compaction_valid(lens_now, acc_now, idx_now, S, table_now, num_blocks, page)
        guard = (k_buf.numel() - k.numel()) // 2
        want = {}
        for name, t, buf in (("k", k, k_buf), ("v", v, v_buf)):
            full = buf.clone()
            full[guard : guard + t.numel()] = compaction_expected(
                t, lens_now, acc_now, idx_now, table_now, ok).flatten()
            want[name] = full
        new_lens = torch.tensor([x + int(a) if o else x
                                 for x, a, o in zip(lens_now, acc_now, ok, strict=True)],
                                dtype=torch.int32)
        writes = [(k_buf, want["k"]), (v_buf, want["v"]),
                  (kwargs["cache_seqlens"], new_lens)]
    else:
        writes = [(k_buf, k_buf.clone()), (v_buf, v_buf.clone())]
        if isinstance(kwargs["cache_seqlens"], torch.Tensor):
            writes.append((kwargs["cache_seqlens"], kwargs["cache_seqlens"].clone()))
    inputs = [x for x in (idx_now, acc_now, table_now) if isinstance(x, torch.Tensor)]

    def check(out):
        assert out is None, why

    return Case(lambda: ops.compact_kv_cache(**kwargs), bad, why, inputs, writes, check,
                unchecked)


COMPACT_SHAPE_BAD = {
    "k-not-tensor": _set_drawn("k_cache", NOT_A_TENSOR),
    "k-3d": _set("k_cache", lambda kw: kw["k_cache"].flatten(0, -3)),
    "k-int": _set("k_cache", lambda kw: kw["k_cache"].to(torch.int16), ("k_cache",)),
    "v-dtype": _set("v_cache", lambda kw: kw["v_cache"].double()),
    "v-shape": _set("v_cache", lambda kw: torch.cat([kw["v_cache"]] * 2, -1),
                    ("v_cache", "k_cache")),
    "seqlens-int64": _set("cache_seqlens", lambda kw: kw["cache_seqlens"].long()),
    "seqlens-length": _set("cache_seqlens", lambda kw: torch.zeros(
        len(kw["cache_seqlens"]) + 1, dtype=torch.int32)),
    "indices-float": _set("accept_indices", lambda kw: kw["accept_indices"].float()),
    "indices-1d": _set("accept_indices", lambda kw: kw["accept_indices"].flatten()),
    "lengths-int64": _set("accept_lengths", lambda kw: kw["accept_lengths"].long()),
    "lengths-2d": _set("accept_lengths", lambda kw: kw["accept_lengths"][None]),
    "table-int64": _set("block_table", lambda kw: torch.zeros(
        len(kw["cache_seqlens"]), 2, dtype=torch.long)),
    "backend-name": _set("backend", "cuda2"),
}


def _one_entry(key, make, names=None):
    """Break entry [b] (and [b, i]) of one argument: make(t, kwargs, data, S, b) edits the
    copy t in place (and may make row b accept something); False: nothing to break."""
    def mutate(kwargs, data, S):
        t = kwargs[key].clone()
        b = data.draw(st.integers(0, t.shape[0] - 1))
        if make(t, kwargs, data, S, b) is False:
            return None
        kwargs[key] = t
        return names or (key,)
    return mutate


def _bad_length(t, kw, data, S, b):
    t[b] = data.draw(st.sampled_from([-1, -7, S + 1, 2**31 - 1]))


def _bad_accept(t, kw, data, S, b):
    A = kw["accept_indices"].shape[1]
    t[b] = data.draw(st.sampled_from([-1, A + 1, 2**31 - 1]))


def _bad_index(t, kw, data, S, b):
    A = t.shape[1]
    if A == 0:
        kw["accept_lengths"][b] = 1  # a row where there are no columns
        return
    kw["accept_lengths"][b] = max(int(kw["accept_lengths"][b]), 1)
    i = data.draw(st.integers(0, int(kw["accept_lengths"][b]) - 1))
    big = 2**62 if t.dtype == torch.int64 else 2**31 - 1
    t[b, i] = data.draw(st.sampled_from([-1, -(2**31), S, big, i - 1]))  # all < i or >= S - L


def _bad_block(t, kw, data, S, b):
    """Every block of sequence b outside the cache, and b accepts at least its root."""
    if kw["accept_indices"].shape[1] == 0 or t.shape[1] == 0:
        return False
    if int(kw["accept_lengths"][b]) == 0:
        kw["accept_lengths"][b] = 1
        kw["accept_indices"][b, 0] = 0
    t[b, :] = data.draw(st.sampled_from([-1, 10**6, 2**31 - 1]))


COMPACT_VALUE_BAD = {
    "length": _one_entry("cache_seqlens", _bad_length, ("cache_seqlens",)),
    "accept": _one_entry("accept_lengths", _bad_accept, ("accept_lengths",)),
    "index": _one_entry("accept_indices", _bad_index, ("accept_indices", "accept_lengths")),
    "block": _one_entry("block_table", _bad_block, ("block_table",)),
}


COMPACT_KINDS = [f"shape:{k}" for k in COMPACT_SHAPE_BAD] + [
    f"{mode}:{k}" for mode in ("value", "unchecked-value") for k in COMPACT_VALUE_BAD]


@pytest.mark.parametrize("backend,kind,examples", kinds_params(
    COMPACT_KINDS, valid={"torch": 60, "triton": 25}, bad={"torch": 4, "triton": 3}))
def test_fuzz_compact_kv_cache(backend, kind, examples):
    fuzz_test(compaction_case)(backend, kind, examples)


# ---------------------------------------------------------------------------------- acceptance


def greedy_naive(pred, tokens, ri):
    """Lengths, chosen path row, next token by walking every path in Python."""
    B, T = tokens.shape
    lengths, rows, nxt = [], [], []
    for b in range(B):
        best, best_p = -1, 0
        for p, path in enumerate(ri.tolist()):
            n = 1
            for parent, child in zip(path, path[1:], strict=False):
                if not 0 <= child < T or int(tokens[b, child]) != int(pred[b, parent]):
                    break
                n += 1
            if n > best:
                best, best_p = n, p
        lengths.append(best)
        rows.append(best_p)
        nxt.append(int(pred[b, ri[best_p, best - 1]]))
    return lengths, rows, nxt


def typical_naive(logits, tokens, ri, temperature, threshold, alpha):
    """Lengths and chosen rows by the module doc's rule in float64."""
    B, T, V = logits.shape
    logp = torch.log_softmax(logits.double() / temperature, -1)
    p = logp.exp()
    entropy = -torch.where(p > 0, p * logp, 0.0).sum(-1)
    cut = torch.clamp(alpha * torch.exp(-entropy), max=threshold)
    lengths, rows = [], []
    for b in range(B):
        best = (-1, -math.inf, 0)
        for r, path in enumerate(ri.tolist()):
            n, score = 1, 0.0
            for parent, child in zip(path, path[1:], strict=False):
                if child < 0:
                    break
                tok = int(tokens[b, child])
                if not float(p[b, parent, tok]) > float(cut[b, parent]):
                    break
                n, score = n + 1, score + float(logp[b, parent, tok])
            if (n, score) > best[:2]:
                best = (n, score, r)
        lengths.append(best[0])
        rows.append(best[2])
    return lengths, rows


def acceptance_case(data, backend: str, kind: str, op: str = "greedy") -> Case:
    gen = seeded(data)
    tree = random_tree(data)
    ri = tree.retrieve_indices
    T = tree.num_nodes
    B = data.draw(st.sampled_from([2, 3, 1, 0]), label="B")
    V = data.draw(st.integers(2, 12), label="V")
    int_dtype = data.draw(st.sampled_from([torch.int32, torch.int64]))
    logits = torch.randn(B, T, V, generator=gen) * 2
    if op == "typical" and data.draw(st.booleans(), label="masked"):
        logits[torch.rand(B, T, V, generator=gen) < 0.4] = float("-inf")
        logits[..., 0] = logits[..., 0].nan_to_num(neginf=0.0)  # never a fully masked row
    pred = logits.argmax(-1)
    tokens = torch.randint(0, V, (B, T), generator=gen)
    for u in range(1, T):  # agree with the parent's argmax 70% of the time
        parent = int(tree.tree_mask[u].nonzero()[-2, 0])  # ancestors have smaller indices
        agree = torch.rand(B, generator=gen) < 0.7
        tokens[:, u] = torch.where(agree, pred[:, parent], tokens[:, u])
    tokens, ri = tokens.to(int_dtype), ri.to(data.draw(st.sampled_from([torch.int32,
                                                                        torch.int64])))
    temperature = data.draw(st.sampled_from([0.0, 0.5, 1.0, 2.0])) if op == "typical" else 0.0
    kwargs = dict(tree_tokens=tokens, retrieve_indices=ri, backend=backend)
    if op == "greedy_ids":
        kwargs["tree_pred"] = pred.to(int_dtype)
        fn = ops.accept_greedy_ids
    elif op == "greedy":
        kwargs["tree_logits"] = logits
        fn = ops.accept_greedy
    else:
        kwargs.update(tree_logits=logits, temperature=temperature, posterior_threshold=0.09,
                      posterior_alpha=0.3, generator=torch.Generator().manual_seed(1))
        fn = ops.accept_typical
    bad, why, unchecked = None, f"valid {op} B{B} T{T} V{V} temp {temperature}", ()
    mode, _, kind = kind.partition(":")
    if mode != "valid":
        names = ACCEPT_BAD[kind][0](kwargs, data)
        if names is not None:
            bad, why = names, f"malformed {op}: {kind}"
            if mode == "unchecked" and kind.startswith("value-"):
                bad, why, unchecked = None, f"unchecked {op}: {kind}", (acceptance,)
    tokens_now, ri_now = kwargs["tree_tokens"], kwargs["retrieve_indices"]
    inputs = [x for x in kwargs.values() if isinstance(x, torch.Tensor)]
    if op == "greedy_ids":
        pred_now = kwargs["tree_pred"]
    else:
        pred_now = pred

    def check(out):
        lengths, path, nxt = out
        assert [lengths.dtype, path.dtype, nxt.dtype] == [torch.int32, torch.int64,
                                                           torch.int64], why
        assert lengths.shape == (B,) and path.shape == (B, ri_now.shape[1]) and nxt.shape == (B,)
        if unchecked:  # garbage in: in bounds, and the backends agree (greedy)
            assert (lengths >= 1).all() and (lengths <= ri_now.shape[1]).all(), why
            for b in range(B):  # the steps taken after the root are nodes
                taken = path[b, 1 : int(lengths[b])]
                assert ((taken >= 0) & (taken < T)).all(), why
            if op != "typical" or temperature == 0:
                other = "torch" if backend == "triton" else "triton"
                ids = pred_now if op == "greedy_ids" else pred
                with mock.patch.object(acceptance, "check_values", lambda device: False):
                    twin = ops.accept_greedy_ids(ids, tokens_now, ri_now, backend=other)
                for a, c in zip(out, twin, strict=True):
                    assert torch.equal(a, c), f"{why}: torch and triton differ"
            return
        if op != "typical" or temperature == 0:
            want_len, rows, want_next = greedy_naive(pred, tokens_now, ri_now)
        else:
            want_len, rows = typical_naive(logits, tokens_now, ri_now, temperature, 0.09, 0.3)
            want_next = None
            for b in range(B):  # a sample of the last accepted node's distribution
                last = int(ri_now[rows[b], want_len[b] - 1])
                assert torch.isfinite(logits[b, last, int(nxt[b])]), why
        assert lengths.tolist() == want_len, why
        assert path.tolist() == [ri_now[r].tolist() for r in rows], why
        if want_next is not None:
            assert nxt.tolist() == want_next, why

    return Case(lambda: fn(**kwargs), bad, why, inputs, check=check, unchecked=unchecked)


ALL = ("greedy", "greedy_ids", "typical")
LOGITS = ("greedy", "typical")


def _ri(make):
    def mutate(kwargs, data):
        ri = kwargs["retrieve_indices"].clone()
        make(ri, data)
        kwargs["retrieve_indices"] = ri
        return ("retrieve_indices",)
    return mutate


def _ri_entry(ri, data, values):
    p = data.draw(st.integers(0, ri.shape[0] - 1))
    a = data.draw(st.integers(0, ri.shape[1] - 1))
    ri[p, a] = data.draw(st.sampled_from(values(ri)))


def _ri_node_out_of_range(ri, data):
    _ri_entry(ri, data, lambda r: [int(r.max()) + 1 + 10**3, -2, -(2**31)])


def _ri_row(ri, data):
    p = data.draw(st.integers(0, ri.shape[0] - 1))
    ri[p] = data.draw(st.sampled_from([-1, 0])) if ri.shape[1] > 1 else -1


def _ri_inner_pad(ri, data):
    if ri.shape[1] < 3:
        ri[0, 0] = -1
        return
    ri[0, 1] = -1
    ri[0, 2] = 1


def _ri_no_root(ri, data):
    ri[data.draw(st.integers(0, ri.shape[0] - 1)), 0] = 1


def _tokens_entry(key, values):
    def mutate(kwargs, data):
        t = kwargs[key].clone()
        if t.numel() == 0:
            return None  # B = 0: no token to break
        b = data.draw(st.integers(0, t.shape[0] - 1))
        u = data.draw(st.integers(0, t.shape[1] - 1))
        V = kwargs["tree_logits"].shape[-1] if "tree_logits" in kwargs else 10**9
        t[b, u] = data.draw(st.sampled_from(values(V)))
        kwargs[key] = t
        return (key,)
    return mutate


ACCEPT_BAD = {  # kind: (mutate, ops it applies to); "value-" kinds only show with checks on
    "value-ri-node": (_ri(_ri_node_out_of_range), ALL),
    "value-ri-row": (_ri(_ri_row), ALL),
    "value-ri-inner-pad": (_ri(_ri_inner_pad), ALL),
    "value-ri-no-root": (_ri(_ri_no_root), ALL),
    "value-token-range": (_tokens_entry("tree_tokens", lambda V: [V, V + 7, -1, -(2**31)]),
                          LOGITS),
    "value-pred-negative": (_tokens_entry("tree_pred", lambda V: [-1, -5]), ("greedy_ids",)),
    "ri-no-columns": (_set("retrieve_indices", lambda kw: kw["retrieve_indices"][:, :0]), ALL),
    "ri-no-rows": (_set("retrieve_indices", lambda kw: kw["retrieve_indices"][:0]), ALL),
    "ri-float": (_set("retrieve_indices", lambda kw: kw["retrieve_indices"].float()), ALL),
    "ri-3d": (_set("retrieve_indices", lambda kw: kw["retrieve_indices"][None]), ALL),
    "tokens-shape": (_set("tree_tokens", lambda kw: kw["tree_tokens"][:, :-1]), ALL),
    "tokens-float": (_set("tree_tokens", lambda kw: kw["tree_tokens"].float()), ALL),
    "tokens-not-tensor": (_set_drawn("tree_tokens", NOT_A_TENSOR), ALL),
    "logits-int": (_set("tree_logits", lambda kw: kw["tree_logits"].long()), LOGITS),
    "logits-2d": (_set("tree_logits", lambda kw: kw["tree_logits"][..., 0]), LOGITS),
    "logits-no-vocab": (_set("tree_logits", lambda kw: kw["tree_logits"][..., :0]), LOGITS),
    "pred-float": (_set("tree_pred", lambda kw: kw["tree_pred"].float()), ("greedy_ids",)),
    "pred-no-nodes": (_set("tree_pred", lambda kw: kw["tree_pred"][:, :0]), ("greedy_ids",)),
    "backend-name": (_set("backend", "Triton"), ALL),
    "temperature-nan": (_set("temperature", float("nan")), ("typical",)),
    "temperature-negative": (_set("temperature", -0.5), ("typical",)),
    "temperature-str": (_set("temperature", "1"), ("typical",)),
    "threshold-inf": (_set("posterior_threshold", float("inf")), ("typical",)),
    "alpha-bool": (_set("posterior_alpha", False), ("typical",)),
    "generator-int": (_set("generator", 7), ("typical",)),
}


def _accept_kinds(op):
    kinds = [k for k, (_, applies) in ACCEPT_BAD.items() if op in applies]
    return [f"malformed:{k}" for k in kinds] + [
        f"unchecked:{k}" for k in kinds if k.startswith("value-")]


@pytest.mark.parametrize("op,backends", [
    ("greedy_ids", {"torch": 60, "triton": 25}), ("greedy", {"torch": 40, "triton": 15}),
    ("typical", {"torch": 80})])
def test_fuzz_acceptance_valid(op, backends):
    for backend, examples in backends.items():
        fuzz_test(lambda data, b, k: acceptance_case(data, b, k, op))(backend, "valid",
                                                                      examples)


@pytest.mark.parametrize("op,backend,kind", [
    pytest.param(op, backend, kind, id=f"{op}-{backend}-{kind}")
    for op, backends in (("greedy_ids", BACKENDS), ("greedy", BACKENDS), ("typical", ["torch"]))
    for backend in backends for kind in _accept_kinds(op)])
def test_fuzz_acceptance_malformed(op, backend, kind):
    examples = 4 if backend == "torch" else 2
    fuzz_test(lambda data, b, k: acceptance_case(data, b, k, op))(backend, kind, examples)


# ------------------------------------------------------------ pack_tree_mask and sample_tokens


@pytest.mark.parametrize("kind", ["valid", "int", "1d", "3d", "list"])
def test_fuzz_pack_tree_mask(kind):
    fuzz_test(pack_tree_mask_case)("torch", kind, 60 if kind == "valid" else 3)


def pack_tree_mask_case(data, backend, kind) -> Case:
    gen = seeded(data)
    T, U = data.draw(st.integers(0, 40)), data.draw(st.integers(0, 70))
    mask = torch.rand(T, U, generator=gen) < data.draw(st.floats(0.0, 1.0))
    arg, bad, why = mask, None, f"valid [{T}, {U}]"
    if kind != "valid":
        arg = {"int": mask.int(), "1d": mask.flatten(), "3d": mask[None],
               "list": mask.tolist()}[kind]
        bad, why = ("mask",), f"malformed: {kind}"

    def check(packed):
        W = -(-U // 32)
        assert packed.dtype == torch.int32 and packed.shape == (T, W), why
        rows = mask.tolist()
        for t in range(T):
            for w in range(W):
                word = sum(1 << s for s in range(32) if 32 * w + s < U and rows[t][32 * w + s])
                assert int(packed[t, w]) == (word - 2**32 if word >= 2**31 else word), why
        assert torch.equal(ops.unpack_tree_mask(packed, U), mask), why

    inputs = [arg] if isinstance(arg, torch.Tensor) else []
    return Case(lambda: ops.pack_tree_mask(arg), bad, why, inputs, check=check)


SAMPLE_BAD = ["int", "no-vocab", "scalar", "list", "temp-nan", "temp-negative", "temp-str",
              "temp-bool", "generator"]


@pytest.mark.parametrize("kind", ["valid", *SAMPLE_BAD])
def test_fuzz_sample_tokens(kind):
    fuzz_test(sample_tokens_case)("torch", kind, 60 if kind == "valid" else 3)


def sample_tokens_case(data, backend, kind) -> Case:
    gen = seeded(data)
    shape = data.draw(st.lists(st.integers(0, 3), min_size=0, max_size=2))
    V = data.draw(st.integers(1, 9))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16, torch.float64]))
    logits = (torch.randn(*shape, V, generator=gen) * 3).to(dtype)
    if data.draw(st.booleans(), label="masked") and V > 1:
        logits[..., 1:][torch.rand(*shape, V - 1, generator=gen) < 0.5] = float("-inf")
    temperature = data.draw(st.sampled_from([0.0, 0.3, 1.0, 5.0]))
    kwargs = dict(logits=logits, temperature=temperature,
                  generator=torch.Generator().manual_seed(3))
    bad, why = None, f"valid {tuple(logits.shape)} temp {temperature}"
    change = {
        "int": ("logits", logits.long()), "no-vocab": ("logits", logits[..., :0]),
        "scalar": ("logits", torch.tensor(1.0)), "list": ("logits", [0.1, 0.2]),
        "temp-nan": ("temperature", float("nan")), "temp-negative": ("temperature", -1.0),
        "temp-str": ("temperature", "hot"), "temp-bool": ("temperature", True),
        "generator": ("generator", "seed"),
    }.get(kind)
    if change is not None:
        kwargs[change[0]] = change[1]
        bad, why = (change[0],), f"malformed: {kind}"

    def check(out):
        assert out.dtype == torch.int64 and out.shape == logits.shape[:-1], why
        assert ((out >= 0) & (out < V)).all(), why
        if temperature == 0:
            assert torch.equal(out, logits.argmax(-1)), why
        else:
            assert torch.isfinite(logits.gather(-1, out[..., None])).all(), why

    inputs = [kwargs["logits"]] if isinstance(kwargs["logits"], torch.Tensor) else []
    return Case(lambda: ops.sample_tokens(**kwargs), bad, why, inputs, check=check)


# --------------------------------------- valid edge cases: torch and Triton agree (owned ops)


@pytest.mark.parametrize("B,A", [(0, 3), (2, 0), (0, 0), (3, 1)], ids=["B0", "A0", "B0-A0",
                                                                        "one-node"])
def test_compaction_edge_cases_agree(B, A):
    gen = torch.Generator().manual_seed(B * 10 + A)
    k, _ = guarded((2, B, 9, 2, 3), torch.float32, gen)
    v, _ = guarded((2, B, 9, 2, 3), torch.float32, gen)
    idx = torch.arange(A).expand(B, A).contiguous()
    acc = torch.full((B,), A, dtype=torch.int32)
    results = []
    for backend in BACKENDS:
        kk, vv, lens = k.clone(), v.clone(), torch.arange(B, dtype=torch.int32) * 2
        ops.compact_kv_cache(kk, vv, lens, idx, acc, backend=backend)
        results.append((bits(kk), bits(vv), lens))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
    assert results[0][2].tolist() == [2 * b + A for b in range(B)]


@pytest.mark.parametrize("B", [0, 2])
def test_acceptance_edge_cases_agree(B):
    for tree in (mk.build_tree([]), mk.build_tree([[0]])):  # one node; one path of two
        T = tree.num_nodes
        pred = torch.arange(B * T).view(B, T) % 3
        tokens = torch.zeros(B, T, dtype=torch.long)
        got = [ops.accept_greedy_ids(pred, tokens, tree.retrieve_indices, backend=b)
               for b in BACKENDS]
        for a, c in zip(*got, strict=True):
            assert a.dtype == c.dtype and torch.equal(a, c)


# ------------------------- regressions: defects this suite found in the first campaign (issue 18)

def _attention_args(B=2, T=3, D=64, S=16):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, T, 2, D, generator=g), torch.randn(B, S, 1, D, generator=g),
            torch.randn(B, S, 1, D, generator=g), torch.tensor([3, 9][:B], dtype=torch.int32),
            torch.tril(torch.ones(T, T, dtype=torch.bool)))


def test_regression_tree_attention_int32_max_length_is_refused():
    q, k, v, _, mask = _attention_args()
    lens = torch.tensor([2**31 - 1, 0], dtype=torch.int32)
    with pytest.raises(ValueError, match="cache_seqlens"):
        ops.tree_attention(q, k, v, lens, mask, backend="torch")


def test_regression_tree_attention_torch_nan_in_unused_slots():
    q, k, v, lens, mask = _attention_args()
    k[0, 6:], v[0, 6:] = float("nan"), float("inf")  # sequence 0 uses slots 0..5
    out = ops.tree_attention(q, k, v, lens, mask, backend="torch")
    assert torch.isfinite(out).all()


def _same_outcome(calls, names: tuple[str, ...]):
    """Each call's output shapes, or "refused" for a ValueError naming one of ``names``
    (a defect's fix may return the empty result or refuse the call; the backends must agree)."""
    outcomes = []
    for call in calls:
        try:
            out = call()
            outcomes.append([tuple(o.shape) for o in out] if isinstance(out, tuple)
                            else tuple(out.shape))
        except ValueError as e:
            outcomes.append("refused" if any(n in str(e) for n in names) else str(e))
    assert all(o == outcomes[0] for o in outcomes), outcomes
    return outcomes[0]


def test_regression_tree_attention_T0_agrees():
    q, k, v, lens, mask = _attention_args()
    got = _same_outcome([lambda b=b: ops.tree_attention(q[:, :0], k, v, lens, mask[:0, :0],
                                                        backend=b) for b in BACKENDS],
                        ("q", "tree_mask", "T"))
    assert got in ((2, 0, 2, 64), "refused")


def test_regression_tree_attention_D0_is_refused():
    q, k, v, lens, mask = _attention_args()
    with pytest.raises(ValueError, match="q|k_cache|head dim"):
        ops.tree_attention(q[..., :0], k[..., :0], v[..., :0], lens, mask, backend="torch")


@pytest.mark.parametrize("scale", ["a", [1.0], float("nan"), float("inf")])
def test_regression_tree_attention_softmax_scale_is_checked(scale):
    q, k, v, lens, mask = _attention_args(D=8)
    with pytest.raises((ValueError, TypeError), match="softmax_scale"):
        ops.tree_attention(q, k, v, lens, mask, scale, backend="torch")


def test_regression_heads_topk_K0_agrees():
    h = torch.randn(3, 16)
    w1, b1, w2 = torch.randn(0, 16, 16), torch.randn(0, 16), torch.randn(0, 50, 16)
    got = _same_outcome([lambda b=b: ops.medusa_heads_topk(h, w1, b1, w2, 3, backend=b)
                         for b in BACKENDS], ("w1", "w2", "K"))
    assert got in ([(3, 0, 3), (3, 0, 3)], "refused")
