"""Each family decodes as transformers does: Qwen3, Phi-3 (fused projections, partial rotary,
longrope), Gemma-2/3 (sandwich (1 + w) norms, scaled embeddings, soft-caps, local/global
layers and ropes), and the sliding windows of Mistral, Qwen2/3 and Phi-3.

A tiny random checkpoint per family, saved by transformers' save_pretrained (Gemma-2's sharded),
built once per module: logits at every position (prefill, then one token at a time), greedy
tokens equal to transformers' own forward + argmax loop over a ragged batch whose prompts and
generations span several windows, and Medusa output equal to plain greedy, with random heads
and with forced candidates whose accepted paths cross the window edge. Then again with the Triton
kernels (the interpreter on a CPU, fp32) wherever they cover the arguments."""

import importlib
import json

import pytest
import torch
import transformers
from conftest import HAS_CUDA
from test_generate import oracle
from tiny_models import FAMILIES, VOCAB, make_hf_model, save_random_heads

from medusa_kernels import generate, load_model
from medusa_kernels.checkpoint import save_base_model
from medusa_kernels.ops import _backend

LONG = "phi3-longrope"  # original_max_position_embeddings = 40: its prompts start beyond it
NEW = 20  # tokens generated: with the prompts, several windows (windows are 4-6 tokens)


def prompts(name, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = [45, 41, 52] if name == LONG else [13, 3, 9]
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths[:batch]]


def hf_greedy(hf, prompt, n):
    """transformers' own greedy: full forward, argmax of the last position, n times."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def fam(request, tmp_path_factory):
    name = request.param
    base, heads = tmp_path_factory.mktemp(name), tmp_path_factory.mktemp(name + "-heads")
    hf = make_hf_model(name, seed=1, layers=3, path=base,
                       max_shard_size="40KB" if name == "gemma2" else None)
    if name == "gemma2":
        assert len(list(base.glob("model-*.safetensors"))) > 1
    save_random_heads(heads, seed=1)
    model = load_model(base, medusa=heads, dtype=torch.float32)
    expected = [hf_greedy(hf, p, NEW + 6) for p in prompts(name)]
    return name, hf, model, expected


def test_logits_at_every_position(fam):
    name, hf, model, _ = fam
    base = model.base
    n, start = (56, 42) if name == LONG else (26, 5)
    ids = torch.randint(0, VOCAB, (2, n), generator=torch.Generator().manual_seed(3))
    one, zero = torch.ones(1, 1, dtype=torch.bool), torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        ref = hf(ids).logits
        cache = base.new_cache(2, n)
        got = base.logits(base.prefill(ids[:, :start], torch.tensor([start] * 2,
                                                                    dtype=torch.int32), cache))
        torch.testing.assert_close(got, ref[:, :start], atol=1e-4, rtol=1e-4)
        for t in range(start, n):
            got = base.logits(base.step(ids[:, t:t + 1], cache, one, zero))[:, 0]
            cache.seqlens += 1
            torch.testing.assert_close(got, ref[:, t], atol=1e-4, rtol=1e-4, msg=f"position {t}")


def test_greedy_equals_transformers_argmax_loop(fam):
    name, hf, model, expected = fam
    got = generate(model, prompts(name), max_new_tokens=NEW, medusa=False)
    assert got.tokens == [e[:NEW] for e in expected]


@pytest.mark.parametrize("tree", [None, "chain_4", [[0], [1], [0, 0], [1, 0], [0, 0, 0]]],
                         ids=["default", "chain_4", "custom"])
def test_medusa_equals_plain_greedy(fam, tree):
    name, hf, model, expected = fam
    fast = generate(model, prompts(name), max_new_tokens=NEW, tree=tree)
    assert fast.tokens == [e[:NEW] for e in expected]


def test_forced_paths_across_the_window_edge(fam):
    """Right guesses accepted 4 deep: the deepest node sits 4 past the prefix, so with windows
    of 4-6 the tree's nodes see different slices of the prefix."""
    name, hf, model, expected = fam
    tree = "mc_sim_7b_63"  # depth 4 (the CPU default tree is shallower)
    fast = generate(model, prompts(name), max_new_tokens=NEW, propose=oracle(expected), tree=tree)
    assert fast.tokens == [e[:NEW] for e in expected]
    assert max(max(step) for step in fast.accepted_per_step) == 5
    half = generate(model, prompts(name), max_new_tokens=NEW, propose=oracle(expected, rank=1),
                    tree=tree)
    assert half.tokens == fast.tokens


def test_longrope_short_prompts_and_the_crossing_refusal(tmp_path):
    """Within original_max_position_embeddings (40) the short factors apply; a prompt that
    starts below it and may grow past it is refused (transformers would recompute every
    position with the long factors)."""
    hf = make_hf_model(LONG, seed=2, layers=2, path=tmp_path)
    model = load_model(tmp_path, dtype=torch.float32)
    ps = prompts("short", batch=2, seed=4)
    got = generate(model, ps, max_new_tokens=10, medusa=False)
    assert got.tokens == [hf_greedy(hf, p, 10) for p in ps]
    with pytest.raises(ValueError, match="longrope.*original_max_position_embeddings = 40"):
        generate(model, ps, max_new_tokens=30, medusa=False)


# ----------------------------------------------------------------------------- Triton kernels

TABLES = {  # op: (its module, its backend table)
    "tree_attention": ("tree_attention", "_IMPLS"),
    "medusa_heads_topk": ("heads_topk", "_IMPLS"),
    "lm_head_topk": ("heads_topk", "_LM_IMPLS"),
    "accept_greedy": ("acceptance", "_GREEDY_IMPLS"),
    "compact_kv_cache": ("compact_kv", "_IMPLS"),
}


@pytest.fixture
def triton_calls(monkeypatch):
    """Route "auto" to Triton for every op where its kernel covers the arguments (fp32 tree
    attention included: the interpreter runs it) and count each op's Triton calls."""
    pick = _backend.pick_backend

    def prefer_triton(op, backend, device, impls, auto_order=("triton", "torch"), **kwargs):
        if backend == "auto" and "triton" in impls and kwargs.get("triton_ok", True):
            return "triton"
        return pick(op, backend, device, impls, auto_order, **kwargs)

    attention = importlib.import_module("medusa_kernels.ops.tree_attention")
    supports = attention.triton_supports
    monkeypatch.setattr(attention, "triton_supports", lambda q, *args, **kwargs: supports(
        q.half() if q.dtype == torch.float32 else q, *args, **kwargs))
    calls = dict.fromkeys(TABLES, 0)
    for op, (module_name, table_name) in TABLES.items():
        module = importlib.import_module(f"medusa_kernels.ops.{module_name}")
        monkeypatch.setattr(module, "pick_backend", prefer_triton)
        table = getattr(module, table_name)

        def counted(*args, _launch=table["triton"], _op=op, **kwargs):
            calls[_op] += 1
            return _launch(*args, **kwargs)

        monkeypatch.setitem(table, "triton", counted)
    return calls


@pytest.mark.skipif(not (HAS_CUDA or _backend.triton_interpreted()),
                    reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("name", ["qwen3", LONG, "gemma2", "gemma3", "mistral-window",
                                  "qwen2-window"])
def test_triton_kernels_decode_as_transformers(name, tmp_path, triton_calls):
    """Head dim 64 (a Triton size). The families whose math differs around the kernels: q/k
    norms and biases, partial rotary, a custom softmax scale (Gemma), windowed layers (prompts
    and generations of several windows) and soft-capped ones, the final soft-cap: every op runs
    its Triton kernel."""
    size = dict(head_dim=64)
    if name == LONG:  # Phi-3 checks the factors against hidden // heads: 48 rotary dims
        size = dict(hidden=128, num_attention_heads=2, num_key_value_heads=1, rope_scaling=dict(
            type="longrope", short_factor=[1.0 + 0.02 * i for i in range(24)],
            long_factor=[1.5 + 0.1 * i for i in range(24)]))
    hf = make_hf_model(name, seed=5, layers=2, path=tmp_path / "base", **size)
    save_random_heads(tmp_path / "heads", num_heads=2, d=128 if name == LONG else 64, seed=5)
    device = "cuda" if HAS_CUDA else "cpu"
    model = load_model(tmp_path / "base", medusa=tmp_path / "heads", dtype=torch.float32,
                       device=device)
    ps = prompts("short", batch=2, seed=6)  # (Phi-3: the short factors; long ones: above)
    fast = generate(model, ps, max_new_tokens=6, tree=[[0], [0, 0], [1]])
    assert fast.tokens == [hf_greedy(hf, p, 6) for p in ps]
    assert all(n > 0 for n in triton_calls.values()), triton_calls


def test_saved_weights_load_in_transformers(fam, tmp_path):
    """``save_base_model`` (what Medusa-2 training writes) gives transformers' own layout back:
    transformers loads it with no missing or unexpected tensor and computes the same logits."""
    name, hf, model, _ = fam
    cfg = json.loads(hf.config.to_json_string())
    save_base_model(model.base, tmp_path, cfg)
    again, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path,
                                                                   output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    again.eval()
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, hf(ids).logits, atol=1e-5, rtol=1e-5)
    assert load_model(tmp_path, dtype=torch.float32).base.cfg == model.base.cfg
