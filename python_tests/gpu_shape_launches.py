"""Launch every Triton kernel once per launch configuration it takes at GPU shapes (the
constexprs depend on tree size, GQA ratio, head dim, dtype, paging, not on batch or context
length), at tiny batch and context so the interpreter finishes in seconds. Run by
test_triton_compile.py with launch capture on; the results are not checked here (the kernel
tests do that at small shapes), only compiled afterwards.

    TRITON_INTERPRET=1 python gpu_shape_launches.py SPECS.json
"""

from __future__ import annotations

import os
import sys

import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run under TRITON_INTERPRET=1"
from triton_aot import install_capture  # noqa: E402

install_capture(sys.argv[1])

from medusa_kernels.ops.acceptance import accept_greedy_ids_triton  # noqa: E402
from medusa_kernels.ops.compact_kv import compact_kv_cache_triton  # noqa: E402
from medusa_kernels.ops.heads_topk import (  # noqa: E402
    lm_head_topk_triton,
    medusa_heads_topk_triton,
)
from medusa_kernels.ops.tree_attention import pack_tree_mask, tree_attention_triton  # noqa: E402
from medusa_kernels.tree import TREES, build_tree  # noqa: E402

torch.manual_seed(0)
DT = torch.float16  # the capture adds the bf16 variant of every fp16 launch


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
    # the launch config depends on the token-block bucket of N (1 = GEMV, 2-32, 33-64, > 64)
    d, V = 128, 300
    for N, ks in ((1, (1, 10, 32)), (8, (1, 10, 32)), (33, (10,)), (70, (10,))):
        for k in ks:
            K = 2
            h = torch.randn(N, d, dtype=DT)
            medusa_heads_topk_triton(h, 0.05 * torch.randn(K, d, d, dtype=DT),
                                     torch.randn(K, d, dtype=DT),
                                     0.05 * torch.randn(K, V, d, dtype=DT), k)
        lm_head_topk_triton(torch.randn(N, d, dtype=DT), 0.05 * torch.randn(V, d, dtype=DT), 1)


if __name__ == "__main__":
    tree_attention_launches()
    compact_launches()
    acceptance_launches()
    heads_launches()
