"""The benchmark: ``python -m medusa_kernels.bench [--quick] [--only KERNEL] [--out DIR]``.

Sections, in this order, each a module here exposing ``run(ctx: BenchContext) -> list[dict]``:
``tree_attention``, ``heads_topk``, ``compact_kv`` (every kernel against its peers, with the
fraction of the bandwidth floor from a copy measured in the same run), ``e2e`` (plain vs
Medusa decode step with random weights, and real greedy generation: tokens/s, mean accepted
tokens, lossless check), ``step_profile`` (one graphed plain and Medusa step at the e2e shapes,
kernel by kernel: launches, time, share; written beside the JSON as ``<stem>-profile.json`` /
``.md``) and ``throughput`` (the demo decoded at B = 1, 4, 16, 64 with plain decoding, the fixed
default tree and the adaptive tree policy). Kernel rows carry the fraction of the bandwidth floor
and of the roofline; rows a stated target judges (``targets.py``) say met or missed. On a
CPU-only machine the Triton kernels run in the Triton interpreter as checks and the PyTorch
paths are timed; GPU numbers need a GPU.

Writes ``<date>-<device>[-quick].json`` (every number plus device, dtype, versions, commit,
date), ``.md`` (the tables) and ``.png`` (time vs context length per kernel, with the floor) to
the ``--out`` directory. See ``__main__.py`` for the options and ``report.py`` for the format.
"""

SECTIONS = ("tree_attention", "heads_topk", "compact_kv", "e2e", "step_profile", "throughput")


def main(argv=None) -> int:
    """Run the benchmark as ``python -m medusa_kernels.bench`` would; returns the exit code."""
    from .__main__ import main as _main

    return _main(argv)


__all__ = ["SECTIONS", "main"]
