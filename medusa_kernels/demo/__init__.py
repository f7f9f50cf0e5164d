"""The built-in demo model: a small Llama trained on the Python standard library's sources,
with Medusa-1 heads trained on its own greedy outputs. Built by ``python -m
medusa_kernels.demo.build``; shipped in ``medusa_kernels/assets/demo``."""

from __future__ import annotations

import os

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "demo")
# trees calibrated for the demo: grown from its heads' accuracies (63 nodes), and the size
# `tree calibrate --nodes auto` timed best on a CPU
TREE_FILES = tuple(os.path.join(ASSETS, n) for n in ("calibrated_tree.json",
                                                    "calibrated_tree_cpu.json"))
CPU_TREE = TREE_FILES[1]


def path(root: str | os.PathLike | None = None) -> tuple[str, str]:
    """(base model dir, heads dir) of the demo checkpoint under ``root`` (default: shipped)."""
    root = str(root or ASSETS)
    model_dir, heads_dir = os.path.join(root, "model"), os.path.join(root, "heads")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        how = "--into-package" if os.path.realpath(root) == os.path.realpath(ASSETS) else \
            f"--out {root}"
        raise FileNotFoundError(
            f"no demo checkpoint in {root}: build it with python -m medusa_kernels.demo.build {how}"
        )
    return model_dir, heads_dir


# the held-out prompts every tool uses: calibration on one seed, measurement on another
CALIBRATION_SEED, MEASURE_SEED = 11, 13


def load(root: str | os.PathLike | None = None, device="cpu", dtype=None):
    """The demo ``MedusaModel`` (base, heads and tokenizer) from ``root`` (default: shipped)."""
    from ..checkpoint import load_model

    model_dir, heads_dir = path(root)
    return load_model(model_dir, medusa=heads_dir, dtype=dtype, device=device)


def prompts(model, n: int = 16, seed: int = CALIBRATION_SEED) -> list[list[int]]:
    """``n`` prompts of 24 tokens cut from the demo's held-out stdlib files (never seen in
    training); ``model`` gives the tokenizer (a ``MedusaModel`` or a ``tokenizers.Tokenizer``)."""
    from ..training.data import demo_prompts

    tokenizer = model.tokenizer() if hasattr(model, "base") else model
    return demo_prompts(tokenizer, n, split="held", seed=seed)


def report(root: str | os.PathLike | None = None) -> dict:
    """The build report (settings, held-out loss, head accuracies, mean accepted)."""
    import json

    with open(os.path.join(str(root or ASSETS), "build_report.json")) as f:
        return json.load(f)
