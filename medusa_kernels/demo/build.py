"""Build the demo checkpoint from nothing: ``python -m medusa_kernels.demo.build [--quick]``.

1. corpus: the standard library's top-level ``*.py`` files, sorted; every 10th is held out.
2. tokenizer: byte-level BPE (``tokenizers``) trained on the training files, eos ``<|endoftext|>``.
3. base model: a small Llama (tied embeddings, GQA) pretrained with the causal LM loss.
4-5. the training package (``medusa_kernels.training.train``, what ``python -m
   medusa_kernels.train medusa1`` runs) on the saved base: self-distillation of prompts cut
   from the training files (greedy, the package's decoder), then Medusa-1 heads (frozen
   backbone, head k learns token t + k + 2 with weight 0.8**k, heads initialised from the
   lm_head), with its own held-out head accuracies and accepted tokens per step of the trained
   vs untrained heads.
6. evaluation on held-out prompts (from the saved checkpoint): held-out loss, head top-1
   accuracy, mean accepted tokens per step of greedy Medusa decoding (checked equal to plain).

``--heads-only`` keeps the base of an earlier build in OUT and redoes steps 4-6.

Writes ``OUT/model`` (HF layout + tokenizer.json), ``OUT/heads`` (public heads layout) and
``OUT/build_report.json``. Default OUT is ``./demo_build`` (use it with ``demo.load(OUT)`` or
``generate --model OUT/model --medusa OUT/heads``); the installed package's own
``medusa_kernels/assets/demo`` is written only with ``--into-package`` (an ``--out`` naming it
without that flag is refused), which is how the shipped demo is made. The training run's own
files (distilled data, head_accuracy.json, train_report.json) go to a temporary directory, or
to ``--run-dir``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import sys
import sysconfig
import tempfile
import time

import torch
import torch.nn.functional as F

from .._cli import (
    DEBUG_HELP,
    THREADS_HELP,
    Parser,
    check_device,
    check_dir,
    check_file,
    cpu_threads,
    progress,
    run_cli,
    threads_flag,
)
from ..checkpoint import load_model, save_base_model, save_medusa_heads
from ..decoding import generate
from ..model import ModelConfig, Transformer
from ..training import Sample, TrainConfig, TrainResult, causal_hidden, collate, pack, train
from ..training.corpus import EOS, corpus, encode_all, prompts_from, windows
from ..training.trainer import evaluate as head_accuracies
from . import ASSETS

DEFAULT_OUT = "demo_build"  # in the working directory
FULL = dict(vocab=2048, d=256, layers=4, heads=4, kv_heads=2, ffn=704, seq=128, batch=16,
            lr=3e-3, pretrain_s=360.0, pretrain_steps=4000, distil_prompts=2048, prompt_len=24,
            gen_len=96, heads_steps=2000, heads_rows=1, heads_seq=1024, heads_lr=1e-3,
            accept_prompts=16, eval_prompts=24, eval_new=96, num_heads=4, max_files=10**6)
QUICK = dict(FULL, vocab=384, d=64, layers=2, heads=2, kv_heads=1, ffn=128, seq=64, batch=8,
             pretrain_s=20.0, pretrain_steps=40, distil_prompts=16, gen_len=24, heads_steps=30,
             heads_seq=256, accept_prompts=2, eval_prompts=4, eval_new=24, max_files=12)


def log(msg: str) -> None:
    print(f"[demo.build {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train_tokenizer(texts: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def hf_config(s: dict, eos: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": s["vocab"], "hidden_size": s["d"], "intermediate_size": s["ffn"],
        "num_hidden_layers": s["layers"], "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv_heads"], "head_dim": s["d"] // s["heads"],
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048,
        "tie_word_embeddings": True, "bos_token_id": None, "eos_token_id": eos,
        "torch_dtype": "float16", "hidden_act": "silu", "attention_bias": False,
    }  # fmt: skip


def lm_loss(model: Transformer, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of windows batch [B, T + 1]."""
    hidden = causal_hidden(model, batch[:, :-1])
    return F.cross_entropy(model.logits(hidden).flatten(0, 1).float(), batch[:, 1:].flatten())


def lr_at(step: int, frac: float, lr: float, warmup: int = 30) -> float:
    return lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def pretrain(model: Transformer, data: torch.Tensor, s: dict, device, show: bool = True) -> int:
    """Causal LM pretraining until ``pretrain_steps`` or ``pretrain_s`` seconds, whichever
    comes first (the bar counts that fraction in thousandths, so its ETA holds for both)."""
    opt = torch.optim.AdamW(model.parameters(), lr=s["lr"], betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(1)
    start, step = time.perf_counter(), 0
    model.train()
    bar = progress(total=1000, desc="pretrain", unit="‰", enabled=show)
    while step < s["pretrain_steps"]:
        frac = max(step / s["pretrain_steps"], (time.perf_counter() - start) / s["pretrain_s"])
        bar.update(min(int(frac * 1000), 1000) - bar.n)
        if frac >= 1:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, frac, s["lr"])
        batch = windows(data, s["batch"], s["seq"] + 1, gen).to(device)
        loss = lm_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            elapsed = time.perf_counter() - start
            bar.set_postfix(step=step, loss=f"{loss.item():.3f}")
            log(f"pretrain step {step} loss {loss.item():.3f} ({elapsed:.0f} s)")
        step += 1
    bar.update(1000 - bar.n)
    bar.close()
    model.eval()
    return step


@torch.no_grad()
def eval_loss(model: Transformer, data: torch.Tensor, s: dict, device, n: int = 64) -> float:
    gen = torch.Generator().manual_seed(2)
    batch = windows(data, n, s["seq"] + 1, gen).to(device)
    return sum(lm_loss(model, b).item() * len(b) for b in batch.split(16)) / n


def train_heads(model_dir: str, run_dir: str, prompts: list[list[int]], s: dict, device,
                seed: int, show: bool = True) -> TrainResult:
    """Self-distil ``prompts`` with the base in ``model_dir`` and train Medusa-1 heads on the
    result: the training package, as ``python -m medusa_kernels.train medusa1`` runs it."""
    os.makedirs(run_dir, exist_ok=True)
    prompt_file = os.path.join(run_dir, "prompts.jsonl")
    with open(prompt_file, "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in prompts)
    cfg = TrainConfig(
        model=model_dir, out=run_dir, mode="medusa1", prompts=prompt_file,
        max_new_tokens=s["gen_len"], distill_batch_size=64, num_heads=s["num_heads"],
        num_layers=1, seq_len=s["heads_seq"], batch_size=s["heads_rows"],
        steps=s["heads_steps"], lr=s["heads_lr"], warmup_steps=10, min_lr_ratio=0.1,
        measure_accept=s["accept_prompts"], seed=seed, device=str(device), progress=show,
        log_every=50,
    )  # fmt: skip
    return train(cfg)


def evaluate(out: str, held: torch.Tensor, s: dict, eos: int, show: bool = True) -> dict:
    """Held-out numbers from the saved checkpoint (float32 on CPU)."""
    model_dir, heads_dir = os.path.join(out, "model"), os.path.join(out, "heads")
    m = load_model(model_dir, medusa=heads_dir, dtype=torch.float32, device="cpu")
    loss = eval_loss(m.base, held, s, "cpu")
    prompts = prompts_from(held, s["eval_prompts"], s["prompt_len"], seed=7, eos=eos)
    plain = [generate(m, [p], max_new_tokens=s["eval_new"], medusa=False).tokens[0]
             for p in progress(prompts, desc="evaluate: plain", unit="prompt", enabled=show)]
    samples = [Sample(torch.tensor(p + t, dtype=torch.int32), len(p))
               for p, t in zip(prompts, plain, strict=True)]
    rows = pack([len(x) for x in samples], s["heads_seq"], True)
    batch = collate(samples, rows, s["heads_seq"])
    acc = head_accuracies(m.base, m.heads, [batch], topk=5, world=1,
                          autocast=contextlib.nullcontext)
    res: dict = {"held_out_loss": round(loss, 4), "held_out_head_top1": acc["top1"],
                 "held_out_head_top5": acc["top5"]}
    for tree in ("mc_sim_7b_63", "small_15"):
        outs = [generate(m, [p], max_new_tokens=s["eval_new"], medusa=True, tree=tree)
                for p in progress(prompts, desc=f"evaluate: {tree}", unit="prompt",
                                  enabled=show)]  # one at a time: mean over steps of each
        counts = [n for r in outs for step in r.accepted_per_step for n in step if n > 0]
        res[f"mean_accepted_{tree}"] = round(sum(counts) / len(counts), 4)
        res[f"identical_to_plain_{tree}"] = [r.tokens[0] for r in outs] == plain
    tok = m.tokenizer()
    res["sample"] = {"prompt": tok.decode(prompts[0]), "continuation": tok.decode(plain[0])}
    return res


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(prog="python -m medusa_kernels.demo.build", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None,
                   help=f"output dir (default: {DEFAULT_OUT}; never the shipped assets unless "
                        "--into-package)")
    p.add_argument("--into-package", action="store_true",
                   help=f"write over the installed package's demo ({ASSETS})")
    p.add_argument("--quick", action="store_true", help="tiny smoke build (seconds)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda: larger builds)")
    p.add_argument("--threads", type=threads_flag, default="auto", help=THREADS_HELP)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heads-only", action="store_true",
                   help="keep OUT/model (an earlier build's base and tokenizer) and redo steps "
                        "4-6: self-distillation, the heads, the evaluation")
    p.add_argument("--run-dir", default=None,
                   help="keep the heads' training run (data, accuracies, report) here")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help=f"override a setting, e.g. pretrain_s=1200 d=384 ({sorted(FULL)})")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    return p.parse_args(argv)


BASE_SETTINGS = ("vocab", "d", "layers", "heads", "kv_heads", "ffn", "seq", "batch", "lr",
                 "pretrain_s", "pretrain_steps", "max_files")


def build_base(s: dict, train_texts: list[str], model_dir: str, device, show: bool = True
               ) -> dict:
    """Steps 2-3: tokenizer and pretrained base, saved to ``model_dir``; what the report keeps."""
    t0 = time.perf_counter()
    tok = train_tokenizer(train_texts, s["vocab"])
    eos = tok.token_to_id(EOS)
    data = encode_all(tok, train_texts)
    s["vocab"] = tok.get_vocab_size()
    log(f"tokenizer: vocab {s['vocab']}, {len(data)} training tokens")
    cfg_json = hf_config(s, eos)
    model = Transformer(ModelConfig.from_hf(cfg_json))
    for name, p in model.named_parameters():
        if p.dim() == 2:
            std = 0.02 / math.sqrt(2 * s["layers"]) if name.endswith(("wo.weight", "w2.weight")) \
                else 0.02
            torch.nn.init.normal_(p, std=std)
    model = model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f} M parameters")
    steps = pretrain(model, data, s, device, show)
    save_base_model(model.to("cpu", torch.float16), model_dir, cfg_json)
    tok.save(os.path.join(model_dir, "tokenizer.json"))
    with open(os.path.join(model_dir, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": eos}, f, indent=2)
    log(f"saved the base to {model_dir}")
    return {"parameters": n_params, "pretrain_steps": steps,
            "pretrain_tokens": steps * s["batch"] * s["seq"],
            "pretrain_seconds": round(time.perf_counter() - t0, 1)}


def out_dir(args: argparse.Namespace) -> str:
    """The absolute output dir: ``--out``, else the shipped assets with ``--into-package``, else
    ./demo_build. The shipped assets only with ``--into-package`` (a ValueError otherwise)."""
    if args.out is None:
        return ASSETS if args.into_package else os.path.abspath(DEFAULT_OUT)
    out = os.path.abspath(args.out)
    shipped = os.path.realpath(out) == os.path.realpath(ASSETS)
    if shipped and not args.into_package:
        raise ValueError(f"--out {args.out} is the installed package's demo: add --into-package "
                         "to write over it, or give another directory")
    if args.into_package and not shipped:
        raise ValueError(f"--into-package writes the package's demo ({ASSETS}); drop --out "
                         f"{args.out} or --into-package")
    return out


def _main(argv: list[str]) -> int:
    args = parse_args(argv)
    args.out = out_dir(args)
    check_device("--device", args.device)
    if args.heads_only:
        check_dir("--out (with --heads-only)", os.path.join(args.out, "model"), "config.json")
        check_file("--out (with --heads-only)", os.path.join(args.out, "build_report.json"))
    with cpu_threads(args.threads) as threads:
        args.threads = threads.threads
        return _build(args)


def _build(args: argparse.Namespace) -> int:
    show = not args.no_progress
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    s = dict(QUICK if args.quick else FULL)
    out = os.path.abspath(args.out)
    model_dir, heads_dir = os.path.join(out, "model"), os.path.join(out, "heads")
    previous = None
    if args.heads_only:  # the base of the earlier build in OUT, with its settings
        from . import report as read_report

        previous = read_report(out)
        s.update({k: previous["settings"][k] for k in BASE_SETTINGS})
    for kv in args.set:
        k, sep, v = kv.partition("=")
        if not sep:
            raise ValueError(f"--set takes KEY=VALUE, got {kv!r}")
        if k not in s:
            raise ValueError(f"--set: unknown setting {k!r}; known: {sorted(s)}")
        if previous is not None and k in BASE_SETTINGS:
            raise ValueError(f"--set {k}: a base setting; --heads-only keeps the earlier base")
        try:
            s[k] = type(s[k])(float(v)) if isinstance(s[k], (int, float)) else v
        except ValueError:
            raise ValueError(f"--set {k}: expected a number, got {v!r}") from None
    device = torch.device(args.device)
    t0 = time.perf_counter()
    train_texts, held_texts = corpus(s["max_files"])
    log(f"corpus: {len(train_texts)} training files, {len(held_texts)} held out")
    if previous is None:
        base = build_base(s, train_texts, model_dir, device, show)
    else:
        base = {k: previous[k] for k in
                ("parameters", "pretrain_steps", "pretrain_tokens", "pretrain_seconds")}
        log(f"--heads-only: the base in {model_dir} (built {previous.get('date', '?')})")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    eos = tok.token_to_id(EOS)
    data, held = encode_all(tok, train_texts), encode_all(tok, held_texts)

    log("self-distillation and Medusa-1 heads (the training package)")
    prompts = prompts_from(data, s["distil_prompts"], s["prompt_len"], seed=5, eos=eos)
    with tempfile.TemporaryDirectory() as tmp:
        run = train_heads(model_dir, args.run_dir or tmp, prompts, s, device, args.seed, show)
        with open(os.path.join(args.run_dir or tmp, "train_report.json")) as f:
            train_report = json.load(f)
    heads = run.heads
    save_medusa_heads(heads.to("cpu", torch.float16), heads_dir, base_model_name_or_path="../model")
    log(f"saved the heads to {heads_dir}; evaluating on held-out prompts")
    results = evaluate(out, held, s, eos, show)
    size = sum(os.path.getsize(os.path.join(d, f)) for d in (model_dir, heads_dir)
               for f in os.listdir(d))
    report = {
        "results": results,
        "settings": s,
        "quick": args.quick,
        "heads_only": previous is not None,  # True: base and its figures from the earlier build
        "base_built": previous.get("base_built", previous.get("date")) if previous else
        time.strftime("%Y-%m-%d %H:%M:%S"),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": str(device),
        "threads": args.threads,
        **base,
        "heads_parameters": sum(p.numel() for p in heads.parameters()),
        "heads_steps": run.steps,
        "heads_training": {k: train_report[k] for k in
                           ("seconds", "samples", "rows", "eval_samples", "head_accuracy",
                            "accept", "final_loss")},
        "training_tokens": len(data),
        "held_out_tokens": len(held),
        "checkpoint_bytes": size,
        "total_seconds": round(time.perf_counter() - t0, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "stdlib": sysconfig.get_paths()["stdlib"],
    }
    with open(os.path.join(out, "build_report.json"), "w") as f:
        json.dump(report, f, indent=2)
    log(json.dumps(results, indent=2))
    return 0


def main(argv=None) -> int:
    """``python -m medusa_kernels.demo.build``; returns the exit status (2: a bad argument or
    file, one line on stderr)."""
    return run_cli(_main, argv, "python -m medusa_kernels.demo.build")


if __name__ == "__main__":
    sys.exit(main())
