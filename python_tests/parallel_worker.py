"""One rank of the tensor-parallel tests (test_parallel_ranks.py starts N of them with
torchrun's environment: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).

``python parallel_worker.py WORKDIR``: reads WORKDIR/inputs.pt, joins the gloo group through
``init_tp()``, runs every vocabulary-parallel piece and a small tensor-parallel decoder
(``tiny_forward``) on the weights ``read_shards`` gives this rank, then the package's own
decoder, loader and CLIs (``parallel_decode_worker.decode_part``), and writes
WORKDIR/rank{r}.pt for the test to compare with one process. ``MK_TEST_DEVICE=cuda`` runs it
on ``cuda:LOCAL_RANK`` with NCCL and also replays the vocabulary-parallel top-k and an
all-reduce from a captured CUDA graph (and ``generate`` captures its steps).

``tiny_forward`` is the test's decoder, written once for any world size: an embedding, layers
built from transformers tensors (separate q/k/v/gate/up with biases as Qwen2 and o_proj /
down_proj biases as attention_bias / mlp_bias; or Phi-3's fused qkv_proj / gate_up_proj with
Gemma's sandwich norms), the final norm. Its row-parallel outputs go through
``row_parallel_linear`` (all-reduce, then the bias once, before any sandwich norm).
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.nn.functional as F
from parallel_decode_worker import decode_part, to_cpu

from medusa_kernels._cli import exit_process
from medusa_kernels.parallel import (
    ReadStats,
    TPGroup,
    TPLayout,
    gather_vocab,
    init_tp,
    lm_head_topk_parallel,
    medusa_heads_topk_parallel,
    rank_device,
    read_shards,
    row_parallel_linear,
    shard_topk,
    vocab_parallel_embedding,
    vocab_range,
)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def attention_heads(x, w, p, layout: TPLayout) -> torch.Tensor:
    """Causal GQA attention of this rank's heads: x [B, T, d] -> [B, T, Hq_r * D] (before
    o_proj). ``w``: this rank's tensors under transformers' names, layer prefix ``p``."""
    B, T, _ = x.shape
    hq, hkv, D = layout.local_num_heads, layout.local_num_kv_heads, layout.head_dim
    a = p + "self_attn."
    if a + "qkv_proj.weight" in w:
        q, k, v = F.linear(x, w[a + "qkv_proj.weight"]).split([hq * D, hkv * D, hkv * D], -1)
    else:
        q, k, v = (F.linear(x, w[a + f"{n}_proj.weight"], w.get(a + f"{n}_proj.bias"))
                   for n in "qkv")
    q = q.view(B, T, hq, D).transpose(1, 2)
    k = k.view(B, T, hkv, D).transpose(1, 2).repeat_interleave(hq // hkv, 1)
    v = v.view(B, T, hkv, D).transpose(1, 2).repeat_interleave(hq // hkv, 1)
    scores = q @ k.transpose(-1, -2) * D**-0.5
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    return (probs @ v).transpose(1, 2).reshape(B, T, hq * D)


def mlp_hidden(x, w, p) -> torch.Tensor:
    """SiLU-gated MLP of this rank's intermediate chunk: x [B, T, d] -> [B, T, I_r]."""
    m = p + "mlp."
    if m + "gate_up_proj.weight" in w:
        gate, up = F.linear(x, w[m + "gate_up_proj.weight"]).chunk(2, -1)
    else:
        gate, up = (F.linear(x, w[m + f"{n}_proj.weight"], w.get(m + f"{n}_proj.bias"))
                    for n in ("gate", "up"))
    return F.silu(gate) * up


def tiny_forward(tokens, w, layout: TPLayout, tp: TPGroup, num_layers: int) -> torch.Tensor:
    """tokens [B, T] -> final normed hidden [B, T, d], the same on every rank."""
    x = vocab_parallel_embedding(tokens, w["model.embed_tokens.weight"], tp, layout.vocab_size)
    for i in range(num_layers):
        p = f"model.layers.{i}."
        sandwich = p + "pre_feedforward_layernorm.weight" in w
        h = attention_heads(rms_norm(x, w[p + "input_layernorm.weight"]), w, p, layout)
        h = row_parallel_linear(h, w[p + "self_attn.o_proj.weight"],
                                w.get(p + "self_attn.o_proj.bias"), tp)
        if sandwich:  # Gemma: the norm of the full (all-reduced) attention output
            h = rms_norm(h, w[p + "post_attention_layernorm.weight"])
        x = x + h
        pre = "pre_feedforward_layernorm" if sandwich else "post_attention_layernorm"
        h = mlp_hidden(rms_norm(x, w[p + pre + ".weight"]), w, p)
        h = row_parallel_linear(h, w[p + "mlp.down_proj.weight"], w.get(p + "mlp.down_proj.bias"),
                                tp)
        if sandwich:
            h = rms_norm(h, w[p + "post_feedforward_layernorm.weight"])
        x = x + h
    return rms_norm(x, w["model.norm.weight"])


def tiny_outputs(tokens, w, layout: TPLayout, tp: TPGroup, num_layers: int, num_heads: int):
    """Hidden states, gathered logits, greedy and top-5 tokens, Medusa heads' top-4."""
    V = layout.vocab_size
    hidden = tiny_forward(tokens, w, layout, tp, num_layers)
    flat = hidden.flatten(0, 1)
    lm_head = w["lm_head.weight"]
    w1 = torch.stack([w[f"medusa_head.{h}.0.linear.weight"] for h in range(num_heads)])
    b1 = torch.stack([w[f"medusa_head.{h}.0.linear.bias"] for h in range(num_heads)])
    w2 = torch.stack([w[f"medusa_head.{h}.1.weight"] for h in range(num_heads)])
    return {
        "hidden": hidden,
        "logits": gather_vocab(F.linear(hidden, lm_head), tp, V),
        "greedy": lm_head_topk_parallel(flat, lm_head, 1, tp, V),
        "top5": lm_head_topk_parallel(flat, lm_head, 5, tp, V),
        "heads": medusa_heads_topk_parallel(flat, w1, b1, w2, 4, tp, V),
    }


def memory_mb() -> dict[str, float]:
    """This process's resident memory (MB) by kind, from /proc/self/status (empty without)."""
    out = {}
    if not os.path.exists("/proc/self/status"):
        return out
    with open("/proc/self/status") as f:
        for line in f:
            key, value = line.split(":", 1)
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) / 1024
    return out


def measure_read(files, layout: TPLayout) -> dict:
    """Read this rank's shards of a bigger checkpoint and measure what the process holds."""
    before = memory_mb()
    stats = ReadStats()
    shards = read_shards(files, layout, stats=stats)
    after = memory_mb()
    held = sum(t.numel() * t.element_size() for t in shards.values())
    return {"stats": vars(stats), "held": held, "before": before, "after": after}


def graph_replay(w, layout: TPLayout, tp: TPGroup, dev: torch.device) -> dict:
    """Capture ``lm_head_topk_parallel`` and an all-reduce in one CUDA graph, replay it on new
    inputs and compare with eager calls (NCCL collectives inside the graph)."""
    lm_head, V = w["lm_head.weight"], layout.vocab_size
    gen = torch.Generator(device=dev).manual_seed(1)  # the same inputs on every rank
    h = torch.randn(8, lm_head.shape[1], device=dev, dtype=lm_head.dtype, generator=gen)
    x = torch.randn(8, 16, device=dev, generator=gen)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture needs
        for _ in range(2):
            lm_head_topk_parallel(h, lm_head, 5, tp, V)
            tp.all_reduce(x.clone())
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        values, indices = lm_head_topk_parallel(h, lm_head, 5, tp, V)
        reduced = tp.all_reduce(x.clone())
    h.copy_(torch.randn(h.shape, device=dev, dtype=h.dtype, generator=gen))
    x.copy_(torch.randn(x.shape, device=dev, generator=gen))
    graph.replay()
    eager_values, eager_indices = lm_head_topk_parallel(h, lm_head, 5, tp, V)
    return {"graph": (values.clone(), indices.clone(), reduced.clone()),
            "eager": (eager_values, eager_indices, tp.all_reduce(x.clone()))}


def main(workdir: str) -> None:
    inputs = torch.load(os.path.join(workdir, "inputs.pt"), weights_only=False)
    dev = rank_device(os.environ.get("MK_TEST_DEVICE", "cpu"))
    tp = init_tp(device=dev, timeout=datetime.timedelta(seconds=60))
    out = {"tp": (tp.rank, tp.world, tp.owned, tp.group is not None),
           "env": (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))}
    out["all_reduce"] = tp.all_reduce(torch.arange(4.0, device=dev) + 10 * tp.rank)
    out["all_gather"] = tp.all_gather(torch.tensor([[tp.rank, -tp.rank]], device=dev))

    # sharded checkpoint -> this rank's tensors -> the small TP decoder
    layout = TPLayout.from_hf_config(inputs["config"], tp.world, tp.rank)
    stats = ReadStats()
    w = read_shards(inputs["files"], layout, stats=stats)
    out["stats"] = vars(stats)
    out["shapes"] = {name: tuple(t.shape) for name, t in w.items()}
    w = {name: t.to(dev) for name, t in w.items()}
    out["model"] = tiny_outputs(inputs["tokens"].to(dev), w, layout, tp, inputs["num_layers"],
                                inputs["num_medusa_heads"])
    if dev.type == "cuda":
        out["cuda_graph"] = graph_replay(w, layout, tp, dev)

    # top-k merge with ties across shard boundaries
    logits = inputs["tie_logits"].to(dev)
    V = logits.shape[-1]
    start, stop = vocab_range(V, tp.world, tp.rank)
    out["ties"] = {k: shard_topk(logits[..., start:stop], k, tp, V) for k in inputs["ks"]}

    if "big_files" in inputs:
        big = TPLayout.from_hf_config(inputs["big_config"], tp.world, tp.rank)
        out["memory"] = measure_read(inputs["big_files"], big)
    if "decode" in inputs:  # the decoder, the loader and the CLIs (parallel_decode_worker.py)
        out["decode"] = decode_part(inputs["decode"], tp, dev)
    torch.save(to_cpu(out), os.path.join(workdir, f"rank{tp.rank}.pt"))
    tp.close()  # a barrier, then destroy


if __name__ == "__main__":
    main(sys.argv[1])
    exit_process(0)  # as the CLIs leave under torchrun: no interpreter teardown
