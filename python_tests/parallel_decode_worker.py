"""The decoding part of a tensor-parallel test rank (``parallel_worker.py`` runs it after the
building blocks; test_parallel_ranks.py compares the results with one process).

``decode_part``: for every family checkpoint, loads this rank's part with ``load_model(...,
tp=True)`` (the process group comes from torchrun's environment) and records ``family_outputs``:
logits of a prefill and of a tree step, greedy and Medusa greedy generations, typical-acceptance
sampling, the heads' top-k, and the bytes of the weights this rank holds. Then the heads' top-k
on exact ties across shard boundaries, what loading a checkpoint whose head counts do not divide
raises, the generate CLI, the bench's e2e section in its tensor-parallel mode and (with ``big``)
the memory a rank's load takes. ``family_outputs`` and ``tie_outputs`` also run in the test
process as the TP = 1 reference.
"""

from __future__ import annotations

import os
import threading
import time

import torch

from medusa_kernels import generate, load_medusa_heads, load_model

TREE = [[0], [1], [0, 0], [1, 0], [0, 0, 0], [0, 1]]  # depth 3, top-2


def weight_bytes(module: torch.nn.Module | None) -> int:
    """Bytes of the parameters a module holds (tied tensors once)."""
    if module is None:
        return 0
    return sum(p.numel() * p.element_size() for p in module.parameters())


def family_outputs(model, spec: dict) -> dict:
    """What one rank computes with ``model`` (a whole one in the test process); tensors come
    back on the CPU."""
    base, heads, dev = model.base, model.heads, model.device
    tokens, lengths = spec["tokens"].to(dev), spec["lengths"].to(dev)
    B, P = tokens.shape
    out = {"bytes": (weight_bytes(base), weight_bytes(heads))}
    with torch.inference_mode():
        cache = base.new_cache(B, P + 8)
        hidden = base.prefill(tokens, lengths, cache)
        out["prefill_logits"] = base.logits(hidden)
        out["prefill_greedy"] = base.greedy(hidden)
        chain = torch.ones(3, 3, dtype=torch.bool, device=dev).tril()  # a 3-token chain
        step = base.step(spec["step_tokens"].to(dev), cache, chain, torch.arange(3, device=dev))
        out["step_logits"] = base.logits(step)
        out["step_greedy"] = base.greedy(step)
        out["kv_heads"] = cache.k.shape[3]
        if heads is not None:
            flat = hidden.flatten(0, 1)
            out["heads_top3"] = heads.topk(flat, 3)
            out["heads_logits"] = heads(flat[:4])
    gen = dict(max_new_tokens=spec["new"])
    out["plain"] = generate(model, spec["prompts"], medusa=False, **gen).tokens
    medusa = generate(model, spec["prompts"], tree=TREE, **gen)
    out["medusa"] = (medusa.tokens, medusa.accepted_per_step)
    sampled = generate(model, spec["prompts"], tree=TREE, temperature=0.7, seed=5, **gen)
    out["typical"] = (sampled.tokens, sampled.accepted_per_step)
    out["unseeded"] = generate(model, spec["prompts"], tree=TREE, temperature=0.7, **gen).tokens
    return to_cpu(out)


def to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def tie_outputs(heads_dirs: list[str], hidden: torch.Tensor, ks, tp=None, device="cpu") -> dict:
    """Top-k of integer-valued heads (exact logits, duplicated rows across shard bounds)."""
    out = {}
    for path in heads_dirs:
        heads = load_medusa_heads(path, torch.float32, device,
                                  **({} if tp is None else {"tp": tp}))
        with torch.inference_mode():
            out[os.path.basename(path)] = {k: to_cpu(heads.topk(hidden.to(device), k))
                                           for k in ks}
    return out


def memory_mb() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, value = line.split(":", 1)
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) / 1024
    return out


def measure_load(path: str) -> dict:
    """Load ``path`` tensor-parallel while a thread samples RssAnon every millisecond: the
    anonymous memory before, at its peak during the load, and after; the bytes held."""
    if not os.path.exists("/proc/self/status"):
        return {}
    peak, done = [memory_mb()["RssAnon"]], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], memory_mb()["RssAnon"])
            time.sleep(0.001)

    before = memory_mb()["RssAnon"]
    thread = threading.Thread(target=sample)
    thread.start()
    model = load_model(path, dtype=torch.float32, tp=True)
    done.set()
    thread.join()
    after = memory_mb()["RssAnon"]
    return {"before": before, "peak": max(peak[0], after), "after": after,
            "held": weight_bytes(model.base) + weight_bytes(model.heads)}


def bench_rows(model_dir: str, heads_dir: str, device: torch.device) -> list[dict]:
    """The e2e bench section in its tensor-parallel mode (quick, L = 64 only)."""
    from medusa_kernels.bench import e2e
    from medusa_kernels.bench._common import BenchContext

    ctx = BenchContext(device=torch.device(device.type), dtype=torch.float32, quick=True,
                       shapes="L=64", model_dir=model_dir, medusa_dir=heads_dir,
                       tree="small_7")
    return [{k: v for k, v in row.items() if k != "sample"} for row in e2e.run(ctx)]


def decode_part(inputs: dict, tp, device: torch.device) -> dict:
    """Everything above on this rank, on ``device``; ``seconds``: where its time went."""
    start = time.perf_counter()
    torch.manual_seed(1000 + tp.rank)  # rank-dependent random state: load_model syncs it
    out, seconds = {"rank": tp.rank, "families": {}}, {}
    for name, base_dir, heads_dir in inputs["families"]:
        model = load_model(base_dir, medusa=heads_dir, dtype=torch.float32,
                           device=device.type, tp=True)
        assert model.tp == tp and model.tp.world == int(os.environ["WORLD_SIZE"])
        out["families"][name] = family_outputs(model, inputs["spec"])
        seconds[name] = time.perf_counter() - start - sum(seconds.values())
    out["ties"] = tie_outputs(inputs["tie_heads"], inputs["tie_hidden"], inputs["ks"], tp,
                              device)
    errors = {}
    for label, path in inputs["bad"].items():
        try:
            load_model(path, dtype=torch.float32, device=device.type, tp=True)
        except ValueError as e:
            errors[label] = str(e)
    out["errors"] = errors
    out["cli"] = cli_output(inputs["cli"])
    seconds["ties, errors, cli"] = time.perf_counter() - start - sum(seconds.values())
    if inputs.get("bench"):
        out["bench"] = bench_rows(*inputs["bench"], device)
    if inputs.get("big") and device.type == "cpu":
        out["load_memory"] = measure_load(inputs["big"])
    seconds["bench, memory"] = time.perf_counter() - start - sum(seconds.values())
    out["seconds"] = seconds
    return out


def cli_output(argv: list[str]) -> tuple[int, str, str]:
    """``python -m medusa_kernels.generate ARGV`` in this rank: (exit code, stdout, stderr)."""
    import contextlib
    import io

    from medusa_kernels.generate import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(argv)
    return code, stdout.getvalue(), stderr.getvalue()
