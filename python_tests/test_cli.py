"""The command lines: a bad argument or file is one line on stderr and exit status 2, never a
traceback (``--debug`` shows it); ``python -m medusa_kernels.tree`` alone prints its help at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import make_hf_model, save_random_heads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MISSING = "/nonexistent/model-dir"


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)


def one_error_line(err: str, *parts: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "error:" in lines[0], err
    for part in parts:
        assert part in lines[0], (part, lines[0])


def mains():
    from medusa_kernels.bench.__main__ import main as bench
    from medusa_kernels.calibrate import main as calibrate
    from medusa_kernels.demo.build import main as build
    from medusa_kernels.generate import main as generate
    from medusa_kernels.train import main as train
    from medusa_kernels.tree.__main__ import main as tree

    return {
        "generate": (generate, ["--model", MISSING]),
        "tree calibrate": (tree, ["calibrate", "--model", MISSING]),
        "calibrate": (calibrate, ["--model", MISSING, "--prompts", "p.txt"]),
        "train distill": (train, ["distill", "--model", MISSING, "--prompts", "demo:4",
                                  "--out", "x"]),
        "train medusa1": (train, ["medusa1", "--model", MISSING, "--data", "d", "--out", "x"]),
        "train medusa2": (train, ["medusa2", "--model", MISSING, "--prompts", "demo:4",
                                  "--out", "x"]),
        "demo.build": (build, ["--heads-only", "--out", MISSING]),
        "bench": (bench, ["--only", "e2e", "--model", MISSING]),
    }


@pytest.mark.parametrize("name", list(mains()))
def test_missing_model_dir_is_one_line_and_exit_2(name, capsys):
    main, argv = mains()[name]
    assert main(argv) == 2
    one_error_line(capsys.readouterr().err, MISSING)


def test_missing_model_dir_as_a_process():
    out = run("medusa_kernels.generate", "--model", MISSING)
    assert out.returncode == 2 and out.stdout == ""
    one_error_line(out.stderr, f"--model {MISSING}: no such directory")
    debug = run("medusa_kernels.generate", "--model", MISSING, "--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    assert "FileNotFoundError" in debug.stderr


def test_tree_without_a_command_prints_help_at_once():
    start = time.perf_counter()
    out = run("medusa_kernels.tree", timeout=30)
    seconds = time.perf_counter() - start
    assert out.returncode == 0 and out.stdout.startswith("usage: python -m medusa_kernels.tree")
    assert "calibrate" in out.stdout
    assert seconds < 5, seconds  # no torch import, no calibration: ~0.1 s on a quiet machine
    bad = run("medusa_kernels.tree", "calibrat", timeout=30)
    assert bad.returncode == 2
    one_error_line(bad.stderr, "unknown command 'calibrat'")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    make_hf_model("llama-mha", seed=6, path=root / "m")
    save_random_heads(root / "h", num_heads=3, seed=6)
    (root / "broken.json").write_text('{"choices": [[0], ')
    (root / "nochoices.json").write_text(json.dumps({"nodes": 3}))
    (root / "prompts.txt").write_text("hello\n")
    return root


def test_generate_cli_file_and_argument_errors(tiny, capsys):
    from medusa_kernels.generate import main

    base = ["--model", str(tiny / "m"), "--medusa", str(tiny / "h"), "--input-ids", "1,2",
            "--max-new-tokens", "4", "--device", "cpu"]
    cases = [
        (["--tree", str(tiny / "broken.json")], [str(tiny / "broken.json"), "not a readable JSON"]),
        (["--tree", str(tiny / "nochoices.json")], ['needs a "choices" key']),
        (["--tree", "mc_sim_7b_63"], ["tree 'mc_sim_7b_63'", "only 3 Medusa heads"]),
        (["--max-new-tokens", "2.5"], ["--max-new-tokens", "invalid int value: '2.5'"]),
        (["--max-new-tokens", "0"], ["max_new_tokens", "got 0"]),
        (["--max-new-tokens", "1000000000000"], ["max_new_tokens"]),
        (["--temperature", "nan"], ["temperature", "nan"]),
        (["--temperature", "-1"], ["temperature"]),
        (["--eos-token-id", "</s>"], ["--eos-token-id", "'</s>'"]),
        (["--eos-token-id", "500"], ["eos_token_id", "500", "vocab_size = 101"]),
        (["--seed", "-3"], ["seed"]),
        (["--input-ids", "1,a"], ["--input-ids", "'1,a'"]),
        (["--input-ids", "1,5000"], ["prompt[1] = 5000"]),
        (["--prompt", "hi", "--input-ids", "3"], ["not both"]),
        (["--device", "tpu"], ["--device", "tpu"]),
        (["--medusa", MISSING], [f"--medusa {MISSING}"]),
        (["--no-such-flag"], ["unrecognized arguments: --no-such-flag"]),
    ]
    for extra, parts in cases:
        argv = base + extra
        if extra[0] == "--prompt":
            argv = [a for a in base if a not in ("--input-ids", "1,2")] + extra
        assert main(argv) == 2, extra
        one_error_line(capsys.readouterr().err, *parts)
    no_tok = [a for a in base if a not in ("--input-ids", "1,2")] + ["--prompt", "hi"]
    assert main(no_tok) == 2
    one_error_line(capsys.readouterr().err, "no tokenizer.json", "--input-ids")
    assert main(base + ["--no-medusa", "--eos-token-id", "none"]) == 0
    out, err = capsys.readouterr()
    assert len(out.split()) == 4 and "[plain] 4 tokens" in err


def test_calibrate_and_train_cli_errors(tiny, capsys):
    from medusa_kernels.calibrate import main as calibrate
    from medusa_kernels.train import main as train

    m, h = str(tiny / "m"), str(tiny / "h")
    cases = [
        (calibrate, ["--model", m, "--medusa", h, "--prompts", str(tiny / "nope.txt")],
         ["--prompts", "nope.txt", "no such file"]),
        (calibrate, ["--model", m, "--medusa", h, "--prompts", str(tiny / "prompts.txt"),
                     "--batch", "0"], ["--batch must be >= 1"]),
        (calibrate, ["--model", m, "--nodes", "-3"], ["--nodes must be >= 0"]),
        (calibrate, ["--model", m, "--device", "cuda:7" if not torch.cuda.is_available()
                     else "xpu"], ["--device"]),
        (train, ["medusa1", "--model", m, "--out", "x"], ["needs --data DATASET or --prompts"]),
        (train, ["distill", "--model", m, "--prompts", str(tiny / "nope.jsonl"), "--out", "x"],
         ["--prompts", "no such file"]),
        (train, ["distill", "--model", m, "--prompts", "demo:zero", "--out", "x"],
         ["demo:N needs a count"]),
        (train, ["medusa1", "--model", m, "--data", str(tiny), "--out", "x", "--steps", "0"],
         ["--steps must be >= 1"]),
        (train, [], ["required: command"]),
    ]
    for main, argv, parts in cases:
        assert main(argv) == 2, argv
        one_error_line(capsys.readouterr().err, *parts)


# --- property-based: whatever the flags, a result or one clear line ---------------------------

GOOD = {
    "--max-new-tokens": ["1", "3"], "--temperature": ["0", "0.5"], "--tree": ["small_15", "wide_8"],
    "--seed": ["0", "7"], "--eos-token-id": ["none", "5"], "--posterior-alpha": ["0.3"],
}
BAD = {
    "--max-new-tokens": ["0", "-4", "2.5", "x", "10000000000000"],
    "--temperature": ["nan", "-1", "inf", "warm"],
    "--tree": ["mc_sim_7b_63", "nope", "/tmp/no/such.json"],
    "--seed": ["-1", "abc", "1.5", str(2**64)],
    "--eos-token-id": ["</s>", "1,x", "-2", "999"],
    "--posterior-alpha": ["2", "nan", "x"],
    "--posterior-threshold": ["-0.1", "1.1"],
    "--input-ids": ["", "a", "1,,x", "-5", "101"],
    "--device": ["gpu", "cuda:9"] if not torch.cuda.is_available() else ["gpu"],
    "--dtype": ["float8"],
}


@st.composite
def flag_sets(draw):
    flags: dict[str, str] = {}
    bad: set[str] = set()
    kinds = ["absent", "good"] if draw(st.booleans()) else ["absent", "good", "bad", "bad"]
    for flag in sorted(set(GOOD) | set(BAD)):
        choice = draw(st.sampled_from(kinds))
        if choice == "good" and flag in GOOD:
            flags[flag] = draw(st.sampled_from(GOOD[flag]))
        elif choice == "bad" and flag in BAD:
            flags[flag] = draw(st.sampled_from(BAD[flag]))
            bad.add(flag)
    return flags, bad


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=flag_sets())
def test_generate_cli_answers_any_flags_with_a_result_or_one_line(tiny, capsys, case):
    from medusa_kernels.generate import main

    flags, bad = case
    argv = ["--model", str(tiny / "m"), "--medusa", str(tiny / "h"), "--device", "cpu"]
    flags.setdefault("--input-ids", "1,2,3")
    flags.setdefault("--max-new-tokens", "2")
    for flag, value in flags.items():
        argv += [flag, value]
    rc = main(argv)  # argparse's own errors (a bad --dtype) come back as 2 and one line too
    out, err = capsys.readouterr()
    if bad:
        assert rc == 2, (argv, out, err)
        one_error_line(err)
    else:
        assert rc == 0, (argv, err)
        assert "tokens in" in err and "Traceback" not in err
        assert 1 <= len(out.split()) <= int(flags["--max-new-tokens"])


@pytest.mark.parametrize("world", ["1", "2"])
def test_exit_process_under_torchrun_skips_the_teardown(world):
    """A torchrun rank (WORLD_SIZE > 1) flushes what it printed and leaves with its code without
    the interpreter's teardown (where gloo's destructors can abort a finished run); one process
    exits normally, atexit handlers included."""
    script = ("import atexit, sys\n"
              "from medusa_kernels._cli import exit_process\n"
              "atexit.register(lambda: print('teardown', flush=True))\n"
              "print('tokens', end='')\n"
              "print('stats', end='', file=sys.stderr)\n"
              "exit_process(3)\n")
    env = dict(os.environ, WORLD_SIZE=world)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 3
    assert out.stderr == "stats"
    assert out.stdout == ("tokens" if world == "2" else "tokensteardown\n")
