"""Launch every Triton kernel once per launch configuration it takes at GPU shapes, with launch
capture on (triton_aot.py); the results are not checked here (the kernel tests do that at small
shapes), only compiled afterwards by test_triton_compile.py and bench/static_report.py.

Two kinds of launch: kernels whose constexprs depend on tree size, GQA ratio, head dim, dtype and
paging but not on batch or context length run at tiny batch and context in the interpreter; the
heads kernels are called at the benchmark shapes themselves on ``meta`` tensors (recorded with
their grids for an H100's 132 SMs, never run), each inside ``case(...)``.

    TRITON_INTERPRET=1 python gpu_shape_launches.py LAUNCHES.json
"""

from __future__ import annotations

import importlib
import itertools
import os
import sys
import warnings

import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run under TRITON_INTERPRET=1"
import triton_aot  # noqa: E402
from triton_aot import case, install_capture  # noqa: E402

install_capture(sys.argv[1])

from medusa_kernels.ops import heads_topk  # noqa: E402
from medusa_kernels.ops.acceptance import accept_greedy_ids_triton  # noqa: E402
from medusa_kernels.ops.activation import TRITON_ACTIVATIONS, gated_act_triton  # noqa: E402
from medusa_kernels.ops.compact_kv import compact_kv_cache_triton  # noqa: E402
from medusa_kernels.ops.rms_norm import rms_norm_triton  # noqa: E402
from medusa_kernels.ops.rotary import rope_kv_write_triton  # noqa: E402
from medusa_kernels.ops.tree_attention import (  # noqa: E402
    pack_tree_mask,
    tree_attention_triton,
    tree_node_depths,
)
from medusa_kernels.tree import TREES, build_tree  # noqa: E402

torch.manual_seed(0)
DT = torch.float16  # the capture adds the bf16 variant of every fp16 launch
H100_SMS = 132


def _tree_attention(T, G, D, packed, paged, splits, Hkv=1, window=None, softcap=None,
                    block_m=None):
    """One launch at a tiny context with what the compiled kernel depends on from a real one:
    T, G = Hq / Hkv, D, the split count, page size 256, and which ints are 1 or divisible by
    16 (Hkv 16 stands for 32, 2 for 8; a contiguous capacity of 256 + T for L + T)."""
    mask = build_tree(TREES["mc_sim_7b_63"]).tree_mask if T == 64 else torch.tril(
        torch.ones(T, T, dtype=torch.bool))
    if Hkv > 1:
        Hkv = 16 if Hkv % 16 == 0 else 2
    q = torch.randn(1, T, G * Hkv, D, dtype=DT)
    if paged:
        k = torch.randn(3, 256, Hkv, D, dtype=DT)
        table = torch.tensor([[2, 0]], dtype=torch.int32)
    else:
        k, table = torch.randn(1, 256 + T, Hkv, D, dtype=DT), None
    m = pack_tree_mask(mask) if packed else mask
    seqlens = torch.tensor([20], dtype=torch.int32)
    depths = tree_node_depths(mask).to(torch.int32) if window else None
    tree_attention_triton(q, k, torch.randn_like(k), seqlens, m, block_table=table,
                          num_splits=splits, sliding_window=window, softcap=softcap,
                          tree_depths=depths, block_m=block_m)


def tree_attention_benchmark_classes(arch: int, sms: int):
    """{(T, G, Hkv, num_splits)}: one of each launch the launcher picks at the benchmark shapes
    (B 1/8, Hq 32, T 1/64, Hkv 32/8, L 1k-64k, D 128, paged 256 or not, window 4096 or none) on
    a GPU of compute capability ``arch`` with ``sms`` SMs, deduplicated by what the compiled
    kernels depend on (SPLIT, TREE_N, the merge blocks, num_splits 1 or divisible by 16)."""
    ta = importlib.import_module("medusa_kernels.ops.tree_attention")
    sm_count, ta.sm_count = ta.sm_count, lambda device: sms
    classes = {}
    try:
        for T, Hkv, B, L, paged, window in itertools.product(
                (1, 64), (32, 8), (1, 8), (1024, 4096, 16384, 65536), (False, True),
                (None, 4096)):  # fmt: skip
            G, R = 32 // Hkv, T * 32 // Hkv
            cfg = ta._config(R, 128, DT, arch)
            capacity = -(-(L + T) // 256) * 256 if paged else L + T
            keys = capacity if window is None else min(capacity, window + T)
            splits = ta._num_splits(B * Hkv * -(-R // cfg.block_m), keys, cfg, R,
                                    torch.device("cuda", 0))  # fmt: skip
            merge = ta._merge_blocks(splits, R, 128) if splits > 1 else None
            key = (T, G, Hkv, splits == 1, splits % 16 == 0,
                   ta._tree_chunk(T, splits, cfg.block_n), merge)  # fmt: skip
            classes.setdefault(key, (T, G, Hkv, splits))
    finally:
        ta.sm_count = sm_count
    return sorted(classes.values())


class _OneProgram:
    """A kernel that runs only its first program: the capture records the specialisation of
    every launch all the same, the interpreter does 1/grid of the work (results unchecked)."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getattr__(self, name):  # fn, warmup, ...: the kernel's
        return getattr(self.kernel, name)

    def __getitem__(self, grid):
        return self.kernel[(1,) * len(grid)]


def tree_attention_launches():
    """The launches planned for H100/H200 (sm_90, 132 SMs) and for A100 (sm_80, 108 SMs), each
    captured for its own arch (the configuration depends on it)."""
    ta = importlib.import_module("medusa_kernels.ops.tree_attention")
    kernels, plan = (ta._tree_attention_kernel, ta._tree_attention_merge_kernel), ta.PLAN_ARCH
    ta._tree_attention_kernel, ta._tree_attention_merge_kernel = map(_OneProgram, kernels)
    try:
        with warnings.catch_warnings():  # the merge reads partials nobody wrote: casts overflow
            warnings.simplefilter("ignore", RuntimeWarning)
            for arch, sms in ((90, 132), (80, 108)):
                ta.PLAN_ARCH, triton_aot.CAPTURE_ARCHS = arch, (arch,)
                _tree_attention_launches(tree_attention_benchmark_classes(arch, sms), arch)
    finally:
        ta._tree_attention_kernel, ta._tree_attention_merge_kernel = kernels
        ta.PLAN_ARCH, triton_aot.CAPTURE_ARCHS = plan, None


def _tree_attention_launches(classes, arch):
    # every launch class at the benchmark shapes as generate runs it (contiguous cache, bool
    # mask); the options per (T, G, Hkv), split and not (they do not interact with the split
    # class otherwise): Gemma-2's window and softcap, every option at once (paged, packed
    # mask), each alone; the window is 128 (< the tiny cache, divisible by 16 as 4096 is)
    for T, G, Hkv, splits in classes:
        _tree_attention(T, G, 128, False, False, splits, Hkv)
    for T, G, Hkv in sorted({c[:3] for c in classes}):
        for splits in (1, 8):
            _tree_attention(T, G, 128, False, False, splits, Hkv, window=128, softcap=50.0)
            _tree_attention(T, G, 128, True, True, splits, Hkv, window=128, softcap=50.0)
        _tree_attention(T, G, 128, False, False, 8, Hkv, window=128)
        _tree_attention(T, G, 128, False, False, 8, Hkv, softcap=50.0)
        if arch >= 90 and T * G > 64:  # the bench's A/B: 64-row tiles (issue 19 item 8)
            for splits in (1, 8):
                _tree_attention(T, G, 128, False, False, splits, Hkv, block_m=64)
    # beyond the benchmark: the other row-block configs (rows = T * G: 16, 32, 1024 with four
    # mask words) and head dims (64, Phi-3's 96), split and not
    for T, G, D in [(16, 1, 128), (32, 1, 128), (128, 8, 128), (64, 1, 64), (16, 1, 64),
                    (64, 8, 64), (64, 1, 96)]:
        for splits in (1, 2):
            _tree_attention(T, G, D, True, False, splits)


def compact_launches():
    for Hkv in (8, 32):
        for D in (64, 128):
            for A in (2, 5):
                k = torch.randn(2, 1, 64, Hkv, D, dtype=DT)
                v = torch.randn_like(k)
                seqlens = torch.tensor([10], dtype=torch.int32)
                idx = torch.arange(A)[None] * 2
                compact_kv_cache_triton(k, v, seqlens, idx, torch.tensor([A], dtype=torch.int32))


def acceptance_launches():
    for name in ("mc_sim_7b_63", "chain_4", "root_only"):
        tb = build_tree(TREES[name], None, None, torch.device("cpu"))
        T = tb.num_nodes
        pred = torch.randint(0, 5, (2, T))
        tokens = torch.randint(0, 5, (2, T))
        accept_greedy_ids_triton(pred, tokens, tb.retrieve_indices)


def heads_launches():
    """Medusa heads (K 4-5) and lm_head at the benchmark shapes: d 4096, V 32000 / 128256, N 1, 8,
    64, 512 tokens, top-1 and top-10 in bf16 (fp16: the same configurations), and at V 32000
    the other launch configurations: N 32 (BLOCK_N 32), the largest k (32), fp32; and the lm_head
    with final logit soft-capping at Gemma-2-9B's shape (V 256000, d 3584, cap 30)."""
    meta = dict(device="meta")
    d, sms = 4096, heads_topk.sm_count
    heads_topk.sm_count = lambda device: H100_SMS
    try:
        for V in (32000, 128256):
            for N in (1, 8, 32, 64, 512):
                for k, dtype, K in [(1, torch.bfloat16, 5), (10, torch.bfloat16, 5),
                                    (10, torch.bfloat16, 4), (32, torch.bfloat16, 5),
                                    (1, torch.float32, 5), (10, torch.float32, 5),
                                    (32, torch.float32, 5)]:
                    if (k == 32 or dtype == torch.float32 or N == 32) and V != 32000:
                        continue
                    if dtype == torch.float32 and N not in (1, 8) and (N, k) != (64, 10):
                        continue  # fp32 programs take at most 16 tokens
                    h = torch.empty(N, d, dtype=dtype, **meta)
                    tag = f"N={N} V={V} d={d} k={k} {str(dtype).removeprefix('torch.')}"
                    with case(f"heads K={K} {tag}"):
                        heads_topk.medusa_heads_topk_triton(
                            h, torch.empty(K, d, d, dtype=dtype, **meta),
                            torch.empty(K, d, dtype=dtype, **meta),
                            torch.empty(K, V, d, dtype=dtype, **meta), k)
                    if K == 5:
                        with case(f"lm_head {tag}"):
                            heads_topk.lm_head_topk_triton(
                                h, torch.empty(V, d, dtype=dtype, **meta), k)
        for N in (1, 8, 64, 512):  # Gemma-2-9B's lm_head, final logit soft-capping 30
            for k in (1, 10):
                with case(f"lm_head N={N} V=256000 d=3584 k={k} bfloat16 softcap=30"):
                    heads_topk.lm_head_topk_triton(
                        torch.empty(N, 3584, dtype=torch.bfloat16, **meta),
                        torch.empty(256000, 3584, dtype=torch.bfloat16, **meta), k, softcap=30.0)
    finally:
        heads_topk.sm_count = sms


def fused_launches():
    """The decoder's fused ops at 7B shapes (d 4096, Hq 32, Hkv 8, D 128, I 11008, cache 32
    layers x 2048 slots) on ``meta`` tensors, decode (T 1) and a 64-node tree: residual add +
    RMSNorm (Llama, Gemma), rope + KV write (full and partial rotary R 96, q/k norms of both
    kinds), every activation of the gated-activation kernel."""
    meta = dict(device="meta", dtype=DT)
    d, Hq, Hkv, D, inter, NL, S = 4096, 32, 8, 128, 11008, 32, 2048
    for T in (1, 64):
        tag = f"T={T} d={d} Hq={Hq} Hkv={Hkv} D={D} I={inter}"
        x = torch.empty(1, T, d, **meta)
        for residual, unit_offset in itertools.product((None, x), (False, True)):
            with case(f"rms_norm {tag}"):
                rms_norm_triton(x, torch.empty(d, **meta), 1e-6, residual, unit_offset)
        qkv = torch.empty(1, T, Hq + 2 * Hkv, D, **meta)
        q, k, v = qkv.split([Hq, Hkv, Hkv], dim=2)
        caches = [torch.empty(NL, 1, S, Hkv, D, **meta) for _ in range(2)]
        pos = torch.empty(1, T, dtype=torch.int64, device="meta")
        w = torch.empty(D, **meta)
        for R, norm, unit_offset in [(D, False, False), (96, False, False), (D, True, False),
                                     (D, True, True)]:
            cos = torch.empty(1, T, R // 2, dtype=torch.float32, device="meta")
            with case(f"rope_kv_write R={R} {tag}"):
                rope_kv_write_triton(q, k, v, cos, cos, *caches, 3, pos, w if norm else None,
                                     w if norm else None, 1e-6, unit_offset)  # fmt: skip
        gate_up = torch.empty(1, T, 2 * inter, **meta)
        for act in sorted(set(TRITON_ACTIVATIONS.values())):
            name = next(n for n, c in TRITON_ACTIVATIONS.items() if c == act)
            with case(f"gated_act {name} {tag}"):
                gated_act_triton(gate_up, name)


if __name__ == "__main__":
    fused_launches()
    tree_attention_launches()
    compact_launches()
    acceptance_launches()
    heads_launches()
