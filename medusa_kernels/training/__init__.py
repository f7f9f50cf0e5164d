"""Training Medusa heads: self-distillation data, Medusa-1, Medusa-2, DDP.

CLI: ``python -m medusa_kernels.train {distill,medusa1,medusa2} ...`` (see ``train.py``).
Python::

    from medusa_kernels.training import TrainConfig, train
    r = train(TrainConfig(model="base/", prompts="prompts.jsonl", out="run/", steps=2000))
    # r.heads_dir -> load_model(r.model_dir, medusa=r.heads_dir)

Modules: ``data`` (prompt files, datasets, packing), ``distill`` (self-distillation),
``objectives`` (cache-free causal forward, losses, accuracies), ``trainer`` (the loops).
"""

from .data import Sample, collate, load_dataset, pack, read_prompts, shifted_targets
from .distill import DistillConfig, self_distill
from .objectives import causal_hidden, head_logits, heads_loss_sums, kl_sum, topk_kl_sum
from .trainer import ACCURACY_FILE, TrainConfig, TrainResult, lr_factor, ramp, train

__all__ = [
    "ACCURACY_FILE",
    "DistillConfig",
    "Sample",
    "TrainConfig",
    "TrainResult",
    "causal_hidden",
    "collate",
    "head_logits",
    "heads_loss_sums",
    "kl_sum",
    "load_dataset",
    "lr_factor",
    "pack",
    "ramp",
    "read_prompts",
    "self_distill",
    "shifted_targets",
    "topk_kl_sum",
    "train",
]
