"""``python -m medusa_kernels.generate``: stream Medusa (or plain) decoding to the terminal.

    python -m medusa_kernels.generate                      # the bundled demo model
                                                           # (on a CPU with the tree chosen
                                                           # for CPUs: calibrated_tree_cpu.json)
    python -m medusa_kernels.generate --model DIR [--medusa DIR] --prompt "def "
    python -m medusa_kernels.generate --model DIR --input-ids 1,2,3 --no-medusa

The text is decoded with the model dir's tokenizer.json (``tokenizers``); without one, pass
``--input-ids`` and token ids are printed. Ends with tokens/s, steps and mean accepted tokens.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from .checkpoint import load_model
from .decoding import generate
from .tree import DEFAULT_TREE, TREES

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m medusa_kernels.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="base model dir (HF layout); default: the bundled demo model")
    p.add_argument("--medusa", default=None, help="Medusa heads dir (default: heads in --model)")
    p.add_argument("--prompt", default=None, help="prompt text (needs tokenizer.json)")
    p.add_argument("--input-ids", default=None, help="comma-separated prompt token ids")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (lossless)")
    p.add_argument("--posterior-threshold", type=float, default=0.09)
    p.add_argument("--posterior-alpha", type=float, default=0.3)
    p.add_argument("--tree", default=None,
                   help=f"tree name {sorted(TREES)} or JSON file (default: mc_sim_7b_63; the "
                        "demo on a CPU: its calibrated_tree_cpu.json)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-medusa", action="store_true", help="plain decoding (the baseline)")
    p.add_argument("--no-cuda-graph", action="store_true", help="run steps eagerly on CUDA")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    dtype = DTYPES[args.dtype] if args.dtype else None
    if args.model is None:
        from .demo import CPU_TREE
        from .demo import path as demo_path

        args.model, demo_heads = demo_path()
        args.medusa = args.medusa or demo_heads
        if args.prompt is None and args.input_ids is None:
            args.prompt = "def "
        if args.tree is None and torch.device(args.device).type == "cpu" and \
                os.path.isfile(CPU_TREE):
            args.tree = CPU_TREE  # a CPU pays for every tree node: the size timed best there
    model = load_model(args.model, medusa=args.medusa, dtype=dtype, device=args.device)
    tokenizer = model.tokenizer()
    if args.input_ids is not None:
        ids = [int(t) for t in args.input_ids.split(",") if t.strip()]
    elif args.prompt is not None:
        if tokenizer is None:
            sys.exit(f"{args.model} has no tokenizer.json: pass --input-ids instead of --prompt")
        ids = tokenizer.encode(args.prompt).ids
    else:
        sys.exit("give --prompt TEXT or --input-ids 1,2,3")
    use_medusa = not args.no_medusa
    if use_medusa and model.heads is None:
        sys.exit("no Medusa heads found: pass --medusa DIR, or --no-medusa for plain decoding")
    eos = model.eos_token_id()
    stream = generate(
        model, [ids], max_new_tokens=args.max_new_tokens, medusa=use_medusa,
        temperature=args.temperature, posterior_threshold=args.posterior_threshold,
        posterior_alpha=args.posterior_alpha, tree=args.tree, eos_token_id=eos, stream=True,
        seed=args.seed, cuda_graph=False if args.no_cuda_graph else None,
    )  # fmt: skip
    out: list[int] = []
    shown = ""
    if args.prompt is not None:
        print(args.prompt, end="", flush=True)
    for new in stream:
        out.extend(new[0])
        if tokenizer is not None:
            text = tokenizer.decode(out)  # decode the whole so merges across steps are right
            print(text[len(shown):], end="", flush=True)
            shown = text
        else:
            print(" ".join(map(str, new[0])), end=" ", flush=True)
    r = stream.result
    mode = f"medusa, tree {os.path.basename(args.tree or DEFAULT_TREE)}" if use_medusa else "plain"
    print(
        f"\n\n[{mode}] {r.num_tokens} tokens in {r.wall_time:.2f} s "
        f"({r.tokens_per_second:.1f} tokens/s after prefill), {r.steps} steps, "
        f"{r.mean_accepted:.2f} accepted tokens per step",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
