"""Plain greedy decoding on the CPU against transformers' ``generate``, side by side.

    python -m medusa_kernels.bench.cpu_decoder [--models smollm2-135m,llama-156m] [--runs 5]
        [--prompt 32] [--new 32] [--threads 1] [--model-dir DIR] [--json PATH]

Random-weight Llamas (fp32): ``smollm2-135m`` (SmolLM2-135M's shapes: 30 layers, d 576, GQA 9:3,
head dim 64, I 1536, V 49152, tied embeddings: deep and narrow, per-op cost matters) and
``llama-156m`` (d 1024, 8 layers, GQA 16:4, I 2816, V 32000: the GEMVs dominate). Ours is
``generate(..., medusa=False)``; transformers' is ``LlamaForCausalLM.generate`` on the same
weight values (``e2e.hf_twin``: its own row-major tensors where our CPU path keeps a weight
column-major, ``Transformer._cpu_layout``, which it does only for weights that fit in the
cache; these models' stream, and both read the very same row-major tensors), greedy, with
its dynamic cache and its static cache.
``--model-dir``: a checkpoint instead (both load it themselves, fp32; EOS ignored by both). Each
run decodes one random prompt with each peer in turn (ours, dynamic, static, ours, ...: load
drift hits them alike); tokens/s count the tokens after the first decode step, over the process
CPU time they took (one thread: immune to other processes' share of a busy machine, not to their
memory traffic). ``weight_gbps``: the
weights one token reads (``e2e.weight_bytes``) times tokens/s. Prints one row per run and the
median and spread; ``speedup`` = ours / the faster transformers cache, per run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from medusa_kernels.checkpoint import MedusaModel, load_model
from medusa_kernels.decoding import generate
from medusa_kernels.model import ModelConfig

from .e2e import hf_twin, random_model, weight_bytes

MODELS = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                         rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         max_position_embeddings=2048),
    "llama-156m": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                       num_layers=8, num_heads=16, num_kv_heads=4, head_dim=64,
                       max_position_embeddings=2048),
}  # fmt: skip


def run_model(name: str, runs: int, prompt_len: int, new: int, model_dir: str | None = None):
    if model_dir is None:
        cfg = ModelConfig(**MODELS[name])
        model = MedusaModel(random_model(cfg, 1, torch.float32, torch.device("cpu")).base, None)
        hf = hf_twin(model.base)
    else:  # both load the checkpoint's weights themselves, fp32
        from transformers import AutoModelForCausalLM

        model = load_model(model_dir, dtype=torch.float32)
        cfg = model.base.cfg
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        hf.generation_config.eos_token_id = None  # ours ignores EOS too: the same tokens
    weights = weight_bytes(model.base)
    params = sum(p.numel() for p in model.base.parameters())
    prompt = torch.randint(cfg.vocab_size, (prompt_len,),
                           generator=torch.Generator().manual_seed(1)).tolist()
    peers = {  # each: () -> (tokens, tokens timed, CPU seconds)
        "ours": lambda: _ours(model, prompt, new),
        "hf_dynamic": lambda: _hf(hf, prompt, new),
        "hf_static": lambda: _hf(hf, prompt, new, cache_implementation="static"),
    }
    outputs, tps = {}, {k: [] for k in peers}
    for fn in peers.values():  # warm-up
        fn()
    for _ in range(runs):
        for k, fn in peers.items():
            tokens, n, seconds = fn()
            outputs[k] = tokens
            tps[k].append(n / seconds)
    rows = []
    for k in peers:
        med = statistics.median(tps[k])
        rows.append(dict(model=name, impl=k, params=params, weight_bytes=weights,
                         tokens_per_s=med, tps_min=min(tps[k]), tps_max=max(tps[k]),
                         tps_runs=tps[k], weight_gbps=weights * med / 1e9,
                         identical_to_ours=outputs[k] == outputs["ours"]))
    best_hf = [max(d, s) for d, s in zip(tps["hf_dynamic"], tps["hf_static"], strict=True)]
    ratios = [o / h for o, h in zip(tps["ours"], best_hf, strict=True)]
    rows[0].update(speedup_vs_best_hf=statistics.median(ratios), speedup_min=min(ratios),
                   speedup_max=max(ratios))
    return rows


def _ours(model, prompt, new):
    """(tokens, tokens after the first decode step, process CPU seconds they took)."""
    stamps = []
    stream = generate(model, [prompt], max_new_tokens=new, medusa=False, eos_token_id=None,
                      stream=True)  # fmt: skip
    for _ in stream:
        stamps.append(time.process_time())
    tokens = stream.result.tokens[0]
    return tokens, len(tokens) - 2, stamps[-1] - stamps[1]


def _hf(hf, prompt, new, **kwargs):
    """The same for transformers' greedy ``generate`` (a streamer stamps each new token: the
    first stamp is the prompt, the second prefill's token, the third the first step's)."""
    from transformers.generation.streamers import BaseStreamer

    stamps = []

    class Stamps(BaseStreamer):
        def put(self, value):
            stamps.append(time.process_time())

        def end(self):
            pass

    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                          min_new_tokens=new, do_sample=False, streamer=Stamps(), **kwargs)
    tokens = out[0, len(prompt):].tolist()
    return tokens, len(tokens) - 2, stamps[-1] - stamps[2]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m medusa_kernels.bench.cpu_decoder")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model-dir", default=None,
                   help="a checkpoint (HF directory or .gguf) instead of the random models: "
                        "ours via load_model, transformers via from_pretrained (HF dir), fp32")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    load = os.getloadavg()
    rows = []
    names = [args.model_dir] if args.model_dir else args.models.split(",")
    for name in names:
        for row in run_model(name, args.runs, args.prompt, args.new, args.model_dir):
            rows.append(row)
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in row.items() if k != "tps_runs"), flush=True)
    meta = dict(torch=torch.__version__, threads=args.threads, runs=args.runs,
                prompt=args.prompt, new=args.new, loadavg_before=load,
                loadavg_after=os.getloadavg(), seconds=time.time() - start)
    try:
        import transformers

        meta["transformers"] = transformers.__version__
    except ImportError:
        pass
    print(json.dumps(meta))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
