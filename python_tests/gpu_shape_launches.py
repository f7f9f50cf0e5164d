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

import os
import sys

import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run under TRITON_INTERPRET=1"
from triton_aot import case, install_capture  # noqa: E402

install_capture(sys.argv[1])

from medusa_kernels.ops import heads_topk  # noqa: E402
from medusa_kernels.ops.acceptance import accept_greedy_ids_triton  # noqa: E402
from medusa_kernels.ops.compact_kv import compact_kv_cache_triton  # noqa: E402
from medusa_kernels.ops.tree_attention import pack_tree_mask, tree_attention_triton  # noqa: E402
from medusa_kernels.tree import TREES, build_tree  # noqa: E402

torch.manual_seed(0)
DT = torch.float16  # the capture adds the bf16 variant of every fp16 launch
H100_SMS = 132


def _tree_attention(T, G, D, packed, paged, splits):
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    q = torch.randn(1, T, G, D, dtype=DT)
    S, page = 128 + T, 64
    if paged:
        k = torch.randn(S // page + 1, page, 1, D, dtype=DT)
        table = torch.arange(k.shape[0], dtype=torch.int32)[None]
    else:
        k, table = torch.randn(1, S, 1, D, dtype=DT), None
    m = pack_tree_mask(mask) if packed else mask
    seqlens = torch.tensor([100], dtype=torch.int32)
    tree_attention_triton(q, k, torch.randn_like(k), seqlens, m, block_table=table,
                          num_splits=splits)


def tree_attention_launches():
    # every row-block config (rows = T * G) and head dim, packed mask as generate uses it
    for T, G, D in [(1, 1, 128), (16, 1, 128), (64, 1, 128), (16, 4, 128), (64, 4, 128),
                    (128, 8, 128), (64, 1, 64), (16, 1, 64), (64, 8, 64)]:
        for splits in (1, 2):
            _tree_attention(T, G, D, True, False, splits)
    # the bool mask and paged caches at the 7B tree shape
    for packed in (False, True):
        for paged in (False, True):
            for splits in (1, 2):
                _tree_attention(64, 4, 128, packed, paged, splits)


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


if __name__ == "__main__":
    tree_attention_launches()
    compact_launches()
    acceptance_launches()
    heads_launches()
