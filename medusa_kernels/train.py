"""``python -m medusa_kernels.train``: self-distillation data, Medusa-1 and Medusa-2 heads.

    # 1. the base model answers the prompts (greedy, or --temperature T); resumable
    python -m medusa_kernels.train distill --model BASE --prompts prompts.jsonl --out data/
    # 2. Medusa-1: frozen backbone, heads only
    python -m medusa_kernels.train medusa1 --model BASE --data data/ --out run/ --steps 2000
    # shared heads (ResBlocks + the frozen lm_head) over the 8192 most frequent targets:
    python -m medusa_kernels.train medusa1 --model BASE --data data/ --out run/ \\
        --heads shared --vocab 8192 --head-layers 2
    # Medusa-2: joint, backbone held to the original by KL on self-distilled data
    python -m medusa_kernels.train medusa2 --model BASE --data data/ --out run2/ \\
        --heads-warmup-steps 500 --unfreeze-last 4
    # all in one (distils into run/data first), several GPUs:
    torchrun --nproc_per_node 8 -m medusa_kernels.train medusa1 --model BASE \\
        --prompts prompts.jsonl --out run/

Prompts: ``.jsonl`` (a string, token list, or {"prompt"|"text"|"input_ids": ...} a line),
``.json`` list, or plain text one prompt a line; ``demo[:N]`` cuts N prompts from the shipped
demo model's corpus. Data (``--data``): a dataset dir written by ``distill`` (layout in
``medusa_kernels/training/data.py``) or a ``.jsonl`` of {"input_ids", "prompt_len"} /
{"text"} / {"prompt", "response"} samples. Loss is on response tokens unless
``--train-on-prompt``.

Outputs in ``--out``: ``heads/`` (public Medusa heads layout: config.json +
medusa_lm_head.safetensors), for Medusa-2 ``model/`` (HF layout, original config.json and
tokenizer files; ``load_model(out/model, medusa=out/heads)``), ``head_accuracy.json`` and
``train_report.json``.

``head_accuracy.json`` (format ``medusa_kernels.head_accuracy.v1``), measured on held-out
samples (``--eval-data``, else ``--eval-fraction`` of the data) every ``--eval-every`` steps:
``accuracies[k][r]``: fraction of held-out positions t where head k's rank-r token (r = 0 the
most likely) equals token t + k + 2, ranks exclusive, r < ``topk`` (the K x R table
``calibrate.grow_tree`` takes); ``top1[k]`` = accuracies[k][0], ``top5[k]`` = sum of ranks
0..4; ``loss[k]`` head k's mean cross-entropy; ``positions[k]`` positions counted; ``base``: the
same for the base lm_head (token t + 1); ``step``, ``num_heads``, ``topk``, ``eval_samples``;
``history``: one {step, top1, top5, loss, base_top1} per evaluation (step 0 = fresh heads).

``--measure-accept N`` (one command for the GPU check): after training, greedy Medusa decoding
of N held-out prompts with the trained heads vs fresh heads (initialised from the lm_head), mean
accepted tokens per step, and whether greedy Medusa output equals plain greedy; in
``train_report.json`` (and ``--report FILE``). E.g. with the shipped demo model::

    python -m medusa_kernels.train medusa1 --model medusa_kernels/assets/demo/model \\
        --prompts demo:2048 --max-new-tokens 96 --num-heads 4 --seq-len 512 --batch-size 32 \\
        --steps 1500 --out /tmp/m1 --measure-accept 32 \\
        --report bench/results/train_medusa1_demo.json
"""

from __future__ import annotations

import argparse
import os

from ._cli import (
    DEBUG_HELP,
    THREADS_HELP,
    Parser,
    check_dir,
    check_file,
    cpu_threads,
    exit_process,
    run_cli,
    threads_flag,
)
from ._dtypes import DTYPE_CHOICES, dtype_flag

PROG = "python -m medusa_kernels.train"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="base model dir (HF layout)")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if any, else cpu")
    p.add_argument("--dtype", type=dtype_flag, default=None, metavar="DTYPE",
                   help=f"backbone weights, one of {DTYPE_CHOICES} (default: bf16 for "
                        "generation and a frozen backbone on CUDA, fp32 when it trains or on CPU)")
    p.add_argument("--threads", type=threads_flag, default="auto", help=THREADS_HELP)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help=DEBUG_HELP)


def _distill_args(p: argparse.ArgumentParser, prefix: str = "") -> None:
    p.add_argument("--max-new-tokens", type=int, default=256, help="response length cap")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument(f"--{prefix}batch-size", type=int, default=16, help="prompts per generate call")
    p.add_argument("--top-logits", type=int, default=0,
                   help="keep the base model's top-k log-probs per response token (Medusa-2 KL)")
    p.add_argument("--format", choices=["jsonl", "safetensors"], default="jsonl",
                   help="dataset format")


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("distill", help="self-distillation dataset from a prompt file")
    _common(d)
    d.add_argument("--prompts", required=True, help="prompt file or demo[:N]")
    d.add_argument("--out", required=True, help="dataset dir (resumes if it exists)")
    d.add_argument("--limit", type=int, default=None, help="first N prompts only")
    d.add_argument("--save-hidden", action="store_true",
                   help="greedy: also keep the hidden states the decoder computed (fp16), for "
                        "Medusa-1 heads trained without running the backbone again")
    _distill_args(d)

    for mode in ("medusa1", "medusa2"):
        t = sub.add_parser(mode, help="Medusa-1: frozen backbone" if mode == "medusa1"
                           else "Medusa-2: backbone and heads together")
        _common(t)
        t.add_argument("--out", required=True, help="output dir")
        t.add_argument("--data", default=None, help="dataset (dir, .jsonl or .safetensors)")
        t.add_argument("--prompts", default=None,
                       help="self-distil these prompts first (into --data or OUT/data)")
        _distill_args(t, prefix="distill-")
        t.add_argument("--num-heads", type=int, default=5)
        t.add_argument("--num-layers", "--head-layers", dest="num_layers", type=int, default=1,
                       help="ResBlocks per head")
        t.add_argument("--heads", dest="heads_kind", choices=["separate", "shared"],
                       default="separate",
                       help="separate: each head its own vocabulary projection (public Medusa "
                            "heads); shared: ResBlocks ending in the base model's lm_head "
                            "(frozen), 1/(V/d) of the parameters")
        t.add_argument("--vocab", type=int, default=None, metavar="N",
                       help="trimmed draft vocabulary: the N most frequent target tokens of the "
                            "training data (saved as the heads' token_map)")
        t.add_argument("--seq-len", type=int, default=2048)
        t.add_argument("--no-pack", action="store_true", help="one sample per row")
        t.add_argument("--train-on-prompt", action="store_true")
        t.add_argument("--batch-size", type=int, default=8,
                       help="packed rows per optimizer step, all processes together")
        t.add_argument("--micro-batch-size", type=int, default=None,
                       help="rows per forward per process (gradient accumulation)")
        t.add_argument("--steps", type=int, default=None, help="default: --epochs of the data")
        t.add_argument("--epochs", type=float, default=1.0)
        t.add_argument("--lr", type=float, default=None,
                       help="Medusa-1: heads' lr (1e-3); Medusa-2: backbone's lr (5e-5)")
        t.add_argument("--weight-decay", type=float, default=0.0)
        t.add_argument("--warmup-ratio", type=float, default=0.1)
        t.add_argument("--warmup-steps", type=int, default=None)
        t.add_argument("--min-lr-ratio", type=float, default=0.0)
        t.add_argument("--max-grad-norm", type=float, default=1.0, help="0: no clipping")
        t.add_argument("--head-decay", type=float, default=0.8, help="head k's weight decay^k")
        if mode == "medusa2":
            t.add_argument("--heads-lr-mult", type=float, default=4.0)
            t.add_argument("--heads-coefficient", type=float, default=0.2)
            t.add_argument("--heads-warmup-steps", type=int, default=0,
                           help="heads-only steps before the joint phase")
            t.add_argument("--heads-ramp", choices=["sine", "linear", "none"], default="sine")
            t.add_argument("--heads-ramp-steps", type=int, default=None)
            t.add_argument("--unfreeze-last", type=int, default=None,
                           help="train only the last N blocks and the final norm")
            t.add_argument("--backbone-loss", choices=["auto", "kl", "lm"], default="auto")
            t.add_argument("--teacher", choices=["auto", "stored", "model"], default="auto")
        t.add_argument("--eval-data", default=None)
        t.add_argument("--eval-fraction", type=float, default=0.05)
        t.add_argument("--eval-every", type=int, default=None)
        t.add_argument("--eval-topk", type=int, default=10)
        t.add_argument("--eval-max-rows", type=int, default=256)
        t.add_argument("--measure-accept", type=int, default=0, metavar="N",
                       help="after training: accepted tokens per step on N held-out prompts, "
                            "trained vs fresh heads")
        t.add_argument("--accept-tree", default=None)
        t.add_argument("--accept-max-new-tokens", type=int, default=None)
        t.add_argument("--report", default=None, help="also write the run report here")
        t.add_argument("--save-dtype", type=dtype_flag, default=None, metavar="DTYPE",
                       help=f"one of {DTYPE_CHOICES} (default: the model config's torch_dtype)")
        t.add_argument("--no-autocast", action="store_true", help="no bf16 autocast on CUDA")
        t.add_argument("--log-every", type=int, default=10)
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace):
    """The ``TrainConfig`` of a medusa1/medusa2 command line."""
    from .training.trainer import DTYPES, TrainConfig

    skip = {"command", "no_progress", "no_pack", "no_autocast", "distill_batch_size", "format",
            "dtype", "save_dtype", "debug", "threads"}
    kw = {k: v for k, v in vars(args).items() if k not in skip}
    return TrainConfig(
        mode=args.command, pack=not args.no_pack, progress=not args.no_progress,
        autocast=False if args.no_autocast else None, distill_batch_size=args.distill_batch_size,
        data_format=args.format, dtype=DTYPES.get(args.dtype or ""),
        save_dtype=DTYPES.get(args.save_dtype or ""), **kw,
    )  # fmt: skip


def check_args(args: argparse.Namespace) -> None:
    """The paths and counts of the command line, before anything loads."""
    check_dir("--model", args.model, "config.json")
    prompts = getattr(args, "prompts", None)
    if prompts is not None and not (prompts == "demo" or prompts.startswith("demo:")):
        check_file("--prompts", prompts)
    elif prompts is not None and prompts.startswith("demo:"):
        n = prompts.split(":", 1)[1]
        if not n.isdigit() or int(n) < 1:
            raise ValueError(f"--prompts demo:N needs a count N >= 1, got {prompts!r}")
    for flag in ("data", "eval_data"):
        path = getattr(args, flag, None)
        if path is not None and not os.path.exists(path):
            raise FileNotFoundError(f"--{flag.replace('_', '-')} {path}: no such file or "
                                    "directory")
    if args.command != "distill" and args.data is None and args.prompts is None:
        raise ValueError(f"{args.command} needs --data DATASET or --prompts FILE (to "
                         "self-distil first)")
    for flag in ("max_new_tokens", "batch_size", "num_heads", "num_layers", "seq_len", "steps",
                 "micro_batch_size", "limit", "distill_batch_size", "vocab"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if getattr(args, "temperature", 0.0) < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")


def _main(argv: list[str]) -> int:
    args = parse_args(argv)
    check_args(args)
    with cpu_threads(args.threads):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from .training.distill import DistillConfig, self_distill
    from .training.trainer import DTYPES, setup_distributed, train

    if args.command == "distill":
        rank, world, device, owned = setup_distributed(args.device)
        cfg = DistillConfig(args.model, args.prompts, args.out, args.max_new_tokens,
                            args.temperature, args.batch_size, args.seed, args.top_logits,
                            args.format, args.limit, str(device), DTYPES.get(args.dtype or ""),
                            not args.no_progress, args.save_hidden)
        from .parallel import group_ending

        with group_ending(owned):
            self_distill(cfg, rank=rank, world=world)
        return 0
    result = train(config_from_args(args))
    if result.accept:
        print(result.accept)
    return 0


def main(argv=None) -> int:
    """The command line; returns the exit status (2: a bad argument or file, one line)."""
    return run_cli(_main, argv, PROG)


if __name__ == "__main__":
    exit_process(main())
