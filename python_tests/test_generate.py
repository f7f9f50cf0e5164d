"""The Medusa loop: lossless greedy, forced candidates, batching, EOS, streaming, bad input."""

import subprocess
import sys

import pytest
import torch
from tiny_models import VOCAB, make_hf_model, save_random_heads, step_inputs

from medusa_kernels import generate, load_model

TREES = ["mc_sim_7b_63", "chain_4", "wide_8", "root_only", [[0], [1], [0, 0]]]


@pytest.fixture(scope="module", params=[("llama-gqa-llama3rope", 0), ("qwen2", 1)])
def model(request, tmp_path_factory):
    arch, seed = request.param
    base = tmp_path_factory.mktemp("base")
    heads = tmp_path_factory.mktemp("heads")
    make_hf_model(arch, seed=seed, path=base)
    save_random_heads(heads, seed=seed)
    return load_model(base, medusa=heads, dtype=torch.float32)


def prompts(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = [3, 11, 1, 7][:batch]
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("tree", TREES, ids=lambda t: t if isinstance(t, str) else "custom")
@pytest.mark.parametrize("batch", [1, 2, 4])
def test_greedy_medusa_equals_plain_greedy(model, tree, batch):
    ids = prompts(batch, seed=batch)
    plain = generate(model, ids, max_new_tokens=20, medusa=False)
    fast = generate(model, ids, max_new_tokens=20, medusa=True, tree=tree)
    assert fast.tokens == plain.tokens
    assert all(len(t) == 20 for t in fast.tokens)


def oracle(reference, rank=0, right_heads=None, topk=10):
    """Proposer whose head k puts the true token k + 2 ahead at ``rank`` (for the first
    ``right_heads`` heads; the rest guess wrong)."""

    def propose(last_hidden, root, num_generated):
        B = root.shape[0]
        g = torch.Generator().manual_seed(sum(num_generated))
        guesses = torch.randint(0, VOCAB, (B, 5, topk), generator=g)
        for b, n in enumerate(num_generated):
            for k in range(5):
                true = reference[b][n + k] if n + k < len(reference[b]) else None
                row = [t for t in torch.randperm(VOCAB, generator=g).tolist() if t != true][:topk]
                if true is not None and (right_heads is None or k < right_heads):
                    row[rank] = true
                guesses[b, k] = torch.tensor(row)
        return guesses.to(root.device)

    return propose


@pytest.mark.parametrize("right_heads,rank,best_path", [(None, 0, 5), (None, 1, 3), (2, 0, 3)],
                         ids=["all-right", "right-at-rank1", "half-right"])
def test_forced_candidates_accept_more_and_stay_lossless(model, right_heads, rank, best_path):
    # mc_sim_7b_63: deepest all-rank-0 path is 4 deep, deepest all-rank-1 path is [1, 1]
    ids = prompts(3, seed=5)
    plain = generate(model, ids, max_new_tokens=30, medusa=False)
    longer = generate(model, ids, max_new_tokens=36, medusa=False)  # the oracle looks ahead
    fast = generate(model, ids, max_new_tokens=30, medusa=True, tree="mc_sim_7b_63",
                    propose=oracle(longer.tokens, rank, right_heads))
    assert fast.tokens == plain.tokens
    best = max(max(step) for step in fast.accepted_per_step)
    assert best == best_path  # root + the right guesses the tree reaches
    assert fast.mean_accepted > best_path - 1
    assert fast.steps < plain.steps


def test_eos_and_max_new_tokens_per_sequence(model):
    ids = prompts(3, seed=7)
    plain = generate(model, ids, max_new_tokens=25, medusa=False)
    eos = plain.tokens[1][6]  # sequence 1 stops at its 7th token (others maybe earlier/later)
    ref = [t[: t.index(eos) + 1] if eos in t else t for t in plain.tokens]
    for medusa in (False, True):
        got = generate(model, ids, max_new_tokens=25, medusa=medusa, eos_token_id=eos,
                       propose=oracle(plain.tokens) if medusa else None)
        assert got.tokens == ref


def test_stream_yields_the_same_tokens(model):
    ids = prompts(2, seed=3)
    stream = generate(model, ids, max_new_tokens=15, stream=True)
    pieces = [[], []]
    for new in stream:
        for b, toks in enumerate(new):
            pieces[b].extend(toks)
    assert pieces == stream.result.tokens
    assert pieces == generate(model, ids, max_new_tokens=15, medusa=False).tokens
    assert stream.result.steps == len(stream.result.accepted_per_step) > 0
    assert stream.result.wall_time > 0


def test_sampling_is_seeded_and_typical_runs(model):
    ids = prompts(2, seed=4)
    a = generate(model, ids, max_new_tokens=12, temperature=0.8, seed=3)
    b = generate(model, ids, max_new_tokens=12, temperature=0.8, seed=3)
    assert a.tokens == b.tokens and all(len(t) == 12 for t in a.tokens)
    plain = generate(model, ids, max_new_tokens=12, medusa=False, temperature=0.8, seed=3)
    assert all(len(t) == 12 for t in plain.tokens)


def test_tensor_prompt_and_stats(model):
    ids = torch.tensor(prompts(1, seed=9))
    r = generate(model, ids, max_new_tokens=10, medusa=False)
    assert r.mean_accepted == 1.0 and r.steps == 9 and r.num_tokens == 10


def test_bad_input_is_refused(model, tmp_path):
    with pytest.raises(ValueError, match=r"prompt\[0\] is empty"):
        generate(model, [[]], max_new_tokens=4)
    with pytest.raises(ValueError, match="vocab_size"):
        generate(model, [[VOCAB + 3]], max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [[1, 2]], max_new_tokens=0)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, [[1, 2]], max_new_tokens=100, max_seq_len=64)
    with pytest.raises(ValueError, match="Medusa heads"):
        generate(load_model(model.model_dir), [[1, 2]], max_new_tokens=4, medusa=True)
    with pytest.raises(ValueError, match=r"path \[0, 0, 0, 0, 0, 0\]"):
        generate(model, [[1, 2]], max_new_tokens=4, tree=[[0]] + [[0] * n for n in range(2, 7)])


def test_cli_streams_and_reports(tmp_path):
    make_hf_model("llama-mha", path=tmp_path / "m")
    save_random_heads(tmp_path / "h")
    cmd = [sys.executable, "-m", "medusa_kernels.generate", "--model", str(tmp_path / "m"),
           "--medusa", str(tmp_path / "h"), "--input-ids", "1,2,3", "--max-new-tokens", "8",
           "--tree", "small_15"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.split()) == 8
    assert "accepted tokens per step" in out.stderr
    plain = subprocess.run(cmd + ["--no-medusa"], capture_output=True, text=True, timeout=120)
    assert plain.stdout.split() == out.stdout.split()


def test_finished_sequence_that_overshot_does_not_overflow_the_cache(model):
    # sequence 0 (the longest prompt) accepts 5 tokens a step and overshoots max_new_tokens in
    # its last step; sequence 1 accepts 1 a step, so the tree is still written for sequence 0
    # at its advanced seqlens: the cache must hold that (an overflow raises on the CPU)
    ids = prompts(2, seed=9)[::-1]
    plain = generate(model, ids, max_new_tokens=7, medusa=False)
    longer = generate(model, ids, max_new_tokens=20, medusa=False)
    fast = generate(model, ids, max_new_tokens=7, medusa=True, tree="mc_sim_7b_63",
                    propose=oracle([longer.tokens[0], []]))
    assert fast.tokens == plain.tokens
    assert max(step[0] for step in fast.accepted_per_step) == 5


def test_default_tree_cut_to_the_heads_named_tree_kept_whole(tmp_path):
    """A 2-head checkpoint decodes with the default tree cut to depth 2 (still lossless); the
    same tree asked for by name is too deep, which is a clear error."""
    make_hf_model("llama-gqa-llama3rope", seed=2, path=tmp_path / "base")
    save_random_heads(tmp_path / "heads", num_heads=2, seed=2)
    m = load_model(tmp_path / "base", medusa=tmp_path / "heads", dtype=torch.float32)
    ids = prompts(2, seed=3)
    plain = generate(m, ids, max_new_tokens=16, medusa=False)
    fast = generate(m, ids, max_new_tokens=16)
    assert fast.tokens == plain.tokens
    with pytest.raises(ValueError, match="deep but there are only 2 Medusa heads"):
        generate(m, ids, max_new_tokens=4, tree="mc_sim_7b_63")


@pytest.mark.parametrize("medusa", [False, True], ids=["plain", "medusa"])
def test_step_compiles_whole_with_torch_compile(medusa):
    """The step is one graph for torch.compile (fullgraph: no graph break, no host value read
    while tracing) and computes what the eager step does: tokens, counts, cache and lengths."""
    m, tb, step, root, last_hidden, running, caches = step_inputs(medusa)
    with torch.inference_mode():
        eager = step(m, tb, caches[0], root, last_hidden, running)
        compiled = torch.compile(lambda c: step(m, tb, c, root, last_hidden, running),
                                 backend="aot_eager", fullgraph=True)(caches[1])
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert eager[1].tolist()[1] == 0 and eager[1].tolist()[0] >= 1
    for name in ("k", "v", "seqlens"):
        torch.testing.assert_close(getattr(caches[1], name), getattr(caches[0], name))


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(top_k=5), ValueError, r"top_k = 5 needs temperature > 0"),
    (dict(top_p=0.9), ValueError, r"top_p = 0.9 needs temperature > 0"),
    (dict(temperature=0.7, top_k=0), ValueError, r"top_k must be an int >= 1"),
    (dict(temperature=0.7, top_k=True), TypeError, r"top_k must be an int"),
    (dict(temperature=0.7, top_p=0.0), ValueError, r"top_p must be a number in \(0, 1\]"),
    (dict(temperature=0.7, top_p=1.5), ValueError, r"top_p must be a finite number in"),
    (dict(temperature=0.7, top_p="0.9"), TypeError, r"top_p must be a finite number"),
    (dict(temperature=0.7, top_k=4, acceptance="typical"), ValueError,
     r"top_k = 4 needs acceptance='exact'"),
    (dict(acceptance="greedy"), ValueError, r"acceptance must be one of \['exact', 'typical'\]"),
    (dict(acceptance=None, config="x"), TypeError, r"config must be a GenerationConfig"),
], ids=lambda v: None)
def test_sampling_settings_are_checked(model, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        generate(model, [[1, 2]], max_new_tokens=4, **kwargs)
    # plain decoding takes top_k / top_p whatever the acceptance rule
    generate(model, [[1, 2]], max_new_tokens=2, medusa=False, temperature=0.5, top_k=3,
             acceptance="typical")


def test_cli_sampling_flags(model, capsys, tmp_path):
    """--top-k / --top-p / --acceptance reach generate; exact Medusa sampling prints the tokens
    plain sampling prints for the same seed; a flag without --temperature is one error line."""
    from medusa_kernels.generate import main

    heads = str(tmp_path / "heads")
    save_random_heads(heads, seed=0)
    base = ["--model", model.model_dir, "--medusa", heads, "--input-ids", "1,2,3",
            "--max-new-tokens", "12", "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9",
            "--seed", "4", "--tree", "small_15"]
    outs = []
    for extra in ([], ["--no-medusa"], ["--acceptance", "exact"]):
        assert main(base + extra) == 0
        outs.append(capsys.readouterr().out.split())
    assert outs[0] == outs[1] == outs[2] and len(outs[0]) == 12
    assert main(base[:-10] + ["--top-k", "3"]) == 2
    assert "error: top_k = 3 needs temperature > 0" in capsys.readouterr().err
    assert main(base + ["--acceptance", "typical"]) == 2
    assert "needs acceptance='exact'" in capsys.readouterr().err
