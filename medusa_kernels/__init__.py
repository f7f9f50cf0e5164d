"""medusa_kernels: fused GPU kernels and a thin PyTorch decoder for Medusa decoding.

Kernels (the README's table; each ``backend="auto" | "torch" | "triton" | "cuda"``):
``tree_attention`` (``pack_tree_mask``), ``medusa_heads_topk``, ``shared_heads_topk``,
``lm_head_topk``, ``compact_kv_cache``, ``accept_greedy`` (``accept_greedy_ids``),
``accept_typical``, ``accept_exact`` (``accept_exact_ids``), ``sample_logits``, ``filter_logits``,
``sample_tokens``, and the decoder's fused ``rms_norm``, ``rope_kv_write``, ``gated_act``,
``embedding``.
Decoding: ``load_model`` (or ``demo.load()``) then ``generate``; settings:
``GenerationConfig``; trees: ``build_tree``, ``TREES``.

The names below load at first use (PEP 562, as transformers does): ``import medusa_kernels``
imports neither torch nor Triton, so the CLIs answer ``--help`` at once and a script pays for
what it uses. Nothing heavier than ``sys`` is imported here (not ``typing``, ``types`` or
``importlib``: ``typing`` alone would cost several ms in an interpreter that has not loaded it).
"""

import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (type checkers: True)

__version__ = "0.1.0"

# public name -> the submodule that defines it
_EXPORTS = {
    "MedusaModel": "checkpoint", "load_medusa_heads": "checkpoint", "load_model": "checkpoint",
    "save_medusa_heads": "checkpoint",
    "GenerationResult": "decoding", "GenerationStream": "decoding", "StreamStep": "decoding",
    "generate": "decoding",
    "GenerationConfig": "generation_config",
    "MedusaHeads": "heads",
    "ModelConfig": "model", "Transformer": "model",
    "accept_exact": "ops", "accept_exact_ids": "ops", "accept_greedy": "ops",
    "accept_greedy_ids": "ops", "accept_typical": "ops", "compact_kv_cache": "ops",
    "embedding": "ops", "filter_logits": "ops", "gated_act": "ops", "lm_head_topk": "ops",
    "medusa_heads_topk": "ops", "pack_tree_mask": "ops", "rms_norm": "ops",
    "rope_kv_write": "ops", "sample_logits": "ops", "sample_tokens": "ops",
    "shared_heads_topk": "ops", "tree_attention": "ops",
    "TREES": "tree", "TreeBuffers": "tree", "build_tree": "tree",
}  # fmt: skip
_SUBMODULES = {"bench", "calibrate", "chat", "checkpoint", "decoding", "demo",
               "generation_config", "gguf_loader", "heads", "model", "ops", "smollm2", "text",
               "training", "tree"}

__all__ = [
    "GenerationConfig", "GenerationResult", "GenerationStream", "MedusaHeads", "MedusaModel",
    "ModelConfig", "StreamStep", "TREES", "Transformer", "TreeBuffers", "accept_exact",
    "accept_exact_ids", "accept_greedy", "accept_greedy_ids", "accept_typical", "build_tree",
    "compact_kv_cache", "embedding", "filter_logits", "gated_act", "generate", "lm_head_topk",
    "load_medusa_heads", "load_model", "medusa_heads_topk", "pack_tree_mask", "rms_norm",
    "rope_kv_write", "sample_logits", "sample_tokens", "save_medusa_heads", "shared_heads_topk",
    "tree_attention",
]  # the lazy names below (kept equal to _EXPORTS by a test)

if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
    from .checkpoint import MedusaModel, load_medusa_heads, load_model, save_medusa_heads
    from .decoding import GenerationResult, GenerationStream, StreamStep, generate
    from .generation_config import GenerationConfig
    from .heads import MedusaHeads
    from .model import ModelConfig, Transformer
    from .ops import (
        accept_exact,
        accept_exact_ids,
        accept_greedy,
        accept_greedy_ids,
        accept_typical,
        compact_kv_cache,
        embedding,
        filter_logits,
        gated_act,
        lm_head_topk,
        medusa_heads_topk,
        pack_tree_mask,
        rms_norm,
        rope_kv_write,
        sample_logits,
        sample_tokens,
        shared_heads_topk,
        tree_attention,
    )
    from .tree import TREES, TreeBuffers, build_tree


def __getattr__(name: str):
    from importlib import import_module  # here, not at the top: first use pays for it

    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | _SUBMODULES)


class _Package(type(sys)):  # types.ModuleType
    """``medusa_kernels.generate`` is both the function and the CLI module: importing the module
    (``from medusa_kernels.generate import main``) would make Python bind it as the package's
    ``generate``, shadowing the function. The binding is skipped, so ``mk.generate`` stays the
    function whatever was imported before (the module stays in ``sys.modules``)."""

    def __setattr__(self, name: str, value) -> None:
        if name in _EXPORTS and isinstance(value, type(sys)):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
