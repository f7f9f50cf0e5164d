"""The launch budget of the decode step: one plain and one Medusa step with the Triton backend
(what a GPU would launch), counted per decoder layer and outside the layers, for every family
(``medusa_kernels.bench.launches``: a TorchDispatchMode, each custom op and each Triton kernel
once, views and allocations not counted, the CPU-only value checks off).

Budget: <= 10 per layer (12 with Gemma-2/3's four norms), <= 12 outside in the plain step, <= 16
outside in the Medusa step. Before the fused ops (2026-12-07): 37 per layer and 28 outside for
Llama (Gemma-3: 81 and 42)."""

import pytest
import torch
from tiny_models import make_hf_model

from medusa_kernels.bench import launches
from medusa_kernels.checkpoint import MedusaModel
from medusa_kernels.heads import MedusaHeads
from medusa_kernels.model import ModelConfig, Transformer
from medusa_kernels.ops import _backend

pytestmark = pytest.mark.skipif(not _backend.HAS_TRITON, reason="needs triton (interpreter)")

FAMILIES = ["llama-gqa-llama3rope", "mistral-window", "qwen2", "qwen2-window", "qwen3",
            "qwen3-window", "phi3", "phi3-longrope", "gemma2", "gemma3"]  # fmt: skip


def hf_family_model(arch: str, dtype=torch.float16) -> MedusaModel:
    """The tiny transformers checkpoint of ``arch`` (3 layers: local and global layers both
    occur) as our decoder, with 3 random heads."""
    hf = make_hf_model(arch, seed=1, layers=3)
    base = Transformer(ModelConfig.from_hf(hf.config.to_dict()))
    base.load_hf_state_dict(hf.state_dict())
    heads = MedusaHeads(3, 1, base.cfg.hidden_size, base.cfg.vocab_size)
    return MedusaModel(base.to(dtype).eval(), heads.to(dtype).eval())


@pytest.mark.parametrize("arch", FAMILIES)
def test_step_launches_within_budget(arch):
    model = hf_family_model(arch)
    ops = launches.step_launches(model)
    per_layer = launches.BUDGET["layer_sandwich" if model.base.cfg.sandwich_norms else "layer"]
    for step in ("plain", "medusa"):
        layers = [k for k in ops[step] if k.startswith("layer")]
        assert len(layers) == model.base.cfg.num_layers, ops[step]  # every layer was seen
        for k in layers:
            assert sum(ops[step][k].values()) <= per_layer, (step, k, dict(ops[step][k]))
        outside = ops[step]["outside"]
        assert sum(outside.values()) <= launches.BUDGET[f"{step}_outside"], (step, dict(outside))
    # the fused ops are what runs (as their custom op, or their Triton kernel called eagerly):
    # two norms, one rope + cache write, one attention, one activation per layer
    layer = ops["medusa"]["layer1"]

    def launches_of(op):
        return sum(n for name, n in layer.items() if op in name)

    assert launches_of("rope_kv_write") == 1 and launches_of("gated_act") == 1, dict(layer)
    assert launches_of("tree_attention") == 1 and launches_of("rms_norm") >= 2, dict(layer)
    assert not {"index_put_", "cat", "pow", "rsqrt", "neg"} & set(layer), dict(layer)


def test_counter_counts_what_launches():
    """The counter itself: an eager op soup counts op for op, views and no-op casts do not,
    a copying cast does, and a custom op counts once whatever it runs inside."""
    x = torch.randn(3, 8, dtype=torch.float16)
    w = torch.randn(8, dtype=torch.float16)
    base = torch.nn.Module()
    base.layers = torch.nn.ModuleList()

    def soup():
        xf = x.float()  # copies: counted
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)  # 5
        _ = x.view(24).t().to(torch.float16)  # views and a same-dtype cast: nothing
        return w * xf.to(x.dtype)  # 2

    def fused():
        return torch.ops.launch_budget_test.norm(x, w)

    assert sum(launches.count_launches(soup, base)["outside"].values()) == 8
    ops = launches.count_launches(fused, base)["outside"]
    assert dict(ops) == {"launch_budget_test::norm": 1}


@torch.library.custom_op("launch_budget_test::norm", mutates_args=())
def _norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)


def test_launch_table_rows():
    rows = launches.launch_table(["llama", "gemma3"])
    assert [r["family"] for r in rows] == ["llama", "gemma3"]
    assert all(r["check_budget"] == "ok" for r in rows), rows
    assert rows[1]["plain_per_layer"] > rows[0]["plain_per_layer"]  # Gemma's sandwich norms
