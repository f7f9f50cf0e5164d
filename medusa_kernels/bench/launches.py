"""Kernel launches of one decode step, counted per decoder layer and outside the layers.

``count_launches(fn, model)`` runs ``fn`` under a ``TorchDispatchMode`` that counts every op
dispatch a GPU would run as a kernel: aten ops, and each of our custom ops once (what runs
inside a custom op is not seen by the mode). Not counted, because they launch nothing:

- views and metadata (``OpOverload.is_view``: view, t, transpose, select, slice, expand,
  split, unsqueeze, as_strided...; and ``_unsafe_view``, ``detach``, ``alias``);
- allocations (``empty``, ``empty_strided``, ``new_empty``...) and ``lift_fresh``;
- ops that return no tensor (``promote_types``, ``sym_size``...: host metadata);
- an aliasing op (``to``, ``contiguous``, ``reshape``: ``is_view`` in their schema) that
  returned its input (a cast to the same dtype): one that copied counts.

A Triton kernel launched outside a custom op counts once (the interpreter's own tensor ops
inside it do not).
It steers "auto" to the Triton kernels (the GPU's choice; on the CPU they run in the
interpreter) and switches off the CPU-only value checks (host reads a GPU run skips), for the
duration of the count. Ops between a decoder layer's pre-hook and its post-hook are that
layer's; the rest are "outside" (embedding, the step's positions and rope tables, the final
norm, lm_head top-1, the heads and acceptance of a Medusa step, the cache bookkeeping).

``launch_table()`` counts one plain and one Medusa step of a tiny random model per family
(``FAMILIES``) against the budget (``BUDGET``); the CPU bench prints it.
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# at most per decoder layer (Gemma-2/3: 12, their four norms), outside the layers per step
BUDGET = {"layer": 10, "layer_sandwich": 12, "plain_outside": 12, "medusa_outside": 16}

_NO_LAUNCH = {
    "_unsafe_view", "detach", "alias", "empty", "empty_strided", "new_empty",
    "new_empty_strided", "empty_like", "lift_fresh", "lift_fresh_copy", "_reshape_alias",
    "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size",
}  # fmt: skip


def launches(func) -> bool:
    """Whether the op ``func`` (an ``OpOverload``) launches a kernel on a GPU."""
    if func.namespace != "aten":
        return True  # a custom op: one launch (or one fused sequence)
    return not (func.is_view or func._schema.name.split("::")[-1] in _NO_LAUNCH)


def _storage(t) -> int | None:
    return t.untyped_storage().data_ptr() if isinstance(t, torch.Tensor) else None


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.where = "outside"
        self.ops: dict[str, Counter] = {}
        self.in_kernel = 0  # inside a Triton launch: the interpreter's own tensor ops

    def add(self, name: str) -> None:
        self.ops.setdefault(self.where, Counter())[name] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if func.namespace != "aten":  # a custom op: once, whatever it launches inside
            if not self.in_kernel:
                self.add(f"{func.namespace}::{name}")
            self.in_kernel += 1
            try:
                return func(*args, **(kwargs or {}))
            finally:
                self.in_kernel -= 1
        out = func(*args, **(kwargs or {}))
        if self.in_kernel:
            return out
        if not any(isinstance(t, torch.Tensor) for t in torch.utils._pytree.tree_leaves(out)):
            return out  # metadata on the host (promote_types, sym_size...): no launch
        if func.is_view:  # an aliasing op (to, contiguous...) launches when it copied
            if args and _storage(out) is not None and _storage(out) != _storage(args[0]):
                self.add(name)
        elif launches(func):
            self.add(name)
        return out

    @contextlib.contextmanager
    def triton_launches(self):
        """A Triton kernel launched outside a custom op counts once, under its name."""
        try:
            from triton.runtime import interpreter, jit
        except ImportError:
            yield
            return
        classes = (interpreter.InterpretedFunction, jit.JITFunction)
        runs = [c.run for c in classes]
        count = self

        def wrap(run):
            def counted(kernel, *args, **kwargs):
                if not count.in_kernel and not kwargs.get("warmup"):
                    count.add(getattr(kernel, "__name__", None) or kernel.fn.__name__)
                count.in_kernel += 1
                try:
                    return run(kernel, *args, **kwargs)
                finally:
                    count.in_kernel -= 1

            return counted

        for cls, run in zip(classes, runs, strict=True):
            cls.run = wrap(run)
        try:
            yield
        finally:
            for cls, run in zip(classes, runs, strict=True):
                cls.run = run


@contextlib.contextmanager
def triton_routed():
    """"auto" picks Triton where an op has it (and its kernel covers the arguments); the
    CPU-only value checks are off."""
    from medusa_kernels import ops
    from medusa_kernels.ops import _backend

    pick = _backend.pick_backend

    def prefer_triton(op, backend, device, impls, auto_order=("triton", "torch"), **kwargs):
        if backend == "auto" and "triton" in impls and kwargs.get("triton_ok", True):
            return "triton"
        return pick(op, backend, device, impls, auto_order, **kwargs)

    saved = []
    for info in pkgutil.iter_modules(ops.__path__):
        module = importlib.import_module(f"medusa_kernels.ops.{info.name}")
        for name, value in (("pick_backend", prefer_triton), ("check_values", lambda d: False)):
            if hasattr(module, name):
                saved.append((module, name, getattr(module, name)))
                setattr(module, name, value)
    try:
        yield
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)


def count_launches(fn, base) -> dict[str, Counter]:
    """Launches of ``fn()`` by place: "layer<i>" (decoder layer i of ``base``) or "outside";
    each a Counter of op names."""
    counter = _Count()
    hooks = []
    for i, layer in enumerate(base.layers):
        def enter(module, args, i=i):
            counter.where = f"layer{i}"

        def leave(module, args, out):
            counter.where = "outside"

        hooks += [layer.register_forward_pre_hook(enter), layer.register_forward_hook(leave)]
    try:
        with triton_routed(), torch.inference_mode(), counter.triton_launches(), counter:
            fn()
    finally:
        for h in hooks:
            h.remove()
    return counter.ops


def summary(ops: dict[str, Counter]) -> dict:
    """{"layer": the most launches of one layer, "outside": launches outside the layers,
    "total"}."""
    layers = [sum(c.values()) for k, c in ops.items() if k.startswith("layer")]
    outside = sum(ops.get("outside", Counter()).values())
    return {"layer": max(layers, default=0), "outside": outside,
            "total": outside + sum(layers)}


# tiny random models of each family the decoder supports, with what sets it apart switched on
_TINY = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4,
             num_kv_heads=2, head_dim=16, max_position_embeddings=512)
_LONG = dict(short_factor=[1.0 + 0.1 * i for i in range(6)],
             long_factor=[1.5 + 0.4 * i for i in range(6)])
FAMILIES = {
    "llama": dict(rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64)),
    "mistral-window": dict(model_type="mistral", layer_windows=(4, 4, 4)),
    "qwen2": dict(model_type="qwen2", num_kv_heads=1, qkv_bias=True, tie_word_embeddings=True,
                  layer_windows=(None, None, 4)),
    "qwen3": dict(model_type="qwen3", qk_norm=True),
    "phi3-longrope": dict(model_type="phi3", partial_rotary_factor=0.75,
                          rope_scaling=dict(rope_type="longrope", attention_factor=1.2,
                                            original_max_position_embeddings=40, **_LONG)),
    "gemma2": dict(model_type="gemma2", hidden_act="gelu_pytorch_tanh", norm_unit_offset=True,
                   sandwich_norms=True, embed_scale=8.0, query_pre_attn_scalar=12.0,
                   attn_softcap=1.5, final_softcap=2.0, layer_windows=(4, None, 4),
                   tie_word_embeddings=True),
    "gemma3": dict(model_type="gemma3_text", hidden_act="gelu_pytorch_tanh",
                   norm_unit_offset=True, sandwich_norms=True, embed_scale=8.0, qk_norm=True,
                   query_pre_attn_scalar=16.0, final_softcap=2.0, layer_windows=(5, None, 5),
                   local_rope_theta=100.0, rope_scaling=dict(rope_type="linear", factor=2.0),
                   tie_word_embeddings=True),
}  # fmt: skip
TREE = [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]


def step_launches(model, tree=TREE, batch: int = 2, context: int = 7) -> dict[str, dict]:
    """Launches of one plain step and one Medusa step (``tree``) of ``model`` (a
    ``MedusaModel`` with heads), ``batch`` sequences holding ``context`` tokens:
    {"plain": ops by place, "medusa": ops by place}."""
    from medusa_kernels.decoding import medusa_step, plain_step
    from medusa_kernels.tree import build_tree

    base, device = model.base, model.device
    gen = torch.Generator(device).manual_seed(0)
    cache = base.new_cache(batch, context + 16)
    with torch.inference_mode():
        cache.k.normal_(generator=gen)
        cache.v.normal_(generator=gen)
    root = torch.randint(base.cfg.vocab_size, (batch,), generator=gen, device=device)
    hidden = torch.randn(batch, base.cfg.hidden_size, generator=gen, device=device,
                         dtype=model.dtype)  # fmt: skip
    running = torch.ones(batch, dtype=torch.bool, device=device)
    out = {}
    for name, step, choices in (("plain", plain_step, []), ("medusa", medusa_step, tree)):
        tb = build_tree(choices, model.heads.num_heads, None, device)
        cache.seqlens.fill_(context)

        def call(step=step, tb=tb):
            step(model, tb, cache, root, hidden, running)

        call()  # first call: Triton compiles, caches fill
        cache.seqlens.fill_(context)
        out[name] = count_launches(call, base)
    return out


def tiny_model(family: str, seed: int = 0, dtype=torch.float16):
    """A ``MedusaModel`` of ``FAMILIES[family]`` with random weights (CPU, ``dtype``: fp16 by
    default, so the casts a GPU run makes are counted) and 3 heads."""
    from medusa_kernels.checkpoint import MedusaModel
    from medusa_kernels.heads import MedusaHeads
    from medusa_kernels.model import ModelConfig, Transformer

    torch.manual_seed(seed)
    cfg = ModelConfig(**{**_TINY, **FAMILIES[family]})
    base = Transformer(cfg).eval()
    heads = MedusaHeads(3, 1, cfg.hidden_size, cfg.vocab_size).eval()
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0, 0.1) if p.dim() == 2 else p.add_(torch.randn_like(p), alpha=0.1)
    return MedusaModel(base.to(dtype), heads.to(dtype))


def budget_problems(family_ops: dict[str, dict], sandwich: bool) -> list[str]:
    """What exceeds ``BUDGET`` in ``step_launches``' output."""
    problems = []
    per_layer = BUDGET["layer_sandwich" if sandwich else "layer"]
    for step in ("plain", "medusa"):
        s = summary(family_ops[step])
        if s["layer"] > per_layer:
            problems.append(f"{step}: {s['layer']} launches per layer > {per_layer}")
        if s["outside"] > BUDGET[f"{step}_outside"]:
            problems.append(f"{step}: {s['outside']} launches outside the layers > "
                            f"{BUDGET[f'{step}_outside']}")
    return problems


def launch_table(families=None, dtype=torch.float16) -> list[dict]:
    """One row per family: launches per layer and outside the layers of a plain and a Medusa
    step, and ``check_budget`` ("ok", or what exceeds ``BUDGET``)."""
    rows = []
    for family in families or FAMILIES:
        model = tiny_model(family, dtype=dtype)
        ops = step_launches(model)
        plain, medusa = summary(ops["plain"]), summary(ops["medusa"])
        problems = budget_problems(ops, model.base.cfg.sandwich_norms)
        rows.append(dict(impl="launches", family=family, plain_per_layer=float(plain["layer"]),
                         plain_outside=float(plain["outside"]),
                         medusa_per_layer=float(medusa["layer"]),
                         medusa_outside=float(medusa["outside"]),
                         check_budget="ok" if not problems else "; ".join(problems)))
    return rows


def main() -> None:
    """Print the table (``python -m medusa_kernels.bench.launches``; set TRITON_INTERPRET=1 on
    a CPU so the Triton paths are taken)."""
    torch.set_num_threads(1)
    print("| family | plain: per layer | outside | Medusa: per layer | outside | budget |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in launch_table():
        print(f"| {r['family']} | {r['plain_per_layer']:.0f} | {r['plain_outside']:.0f} | "
              f"{r['medusa_per_layer']:.0f} | {r['medusa_outside']:.0f} | {r['check_budget']} |")


if __name__ == "__main__":
    main()
