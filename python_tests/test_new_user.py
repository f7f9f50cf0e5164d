"""What a new user meets in the first hour (issue 23): CPU threads, the top-level kernel exports
the README names, the import cost, giving heads to a model, a plain checkpoint's missing pieces,
demo.build's output directory, one dtype vocabulary, a meta-device prompt."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch
from tiny_models import make_hf_model, save_random_heads

import medusa_kernels as mk
from medusa_kernels import _cli
from medusa_kernels._dtypes import DTYPE_CHOICES, DTYPE_NAMES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def section(title: str) -> str:
    start = README.index(title)
    end = re.search(r"\n#{2,3} ", README[start + len(title):])
    return README[start:start + len(title) + end.start() if end else None]


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    """An HF checkpoint with neither heads nor tokenizer.json (what transformers saves)."""
    root = tmp_path_factory.mktemp("plain")
    make_hf_model("llama-mha", seed=3, path=root / "m")
    save_random_heads(root / "h", num_heads=2, seed=3)
    assert not os.path.exists(root / "m" / "tokenizer.json")
    return root


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --- 1. threads -------------------------------------------------------------------------------


def test_threads_flag_values():
    assert _cli.threads_flag("auto") == "auto" and _cli.threads_flag("AUTO") == "auto"
    assert _cli.threads_flag("3") == 3
    for bad in ("0", "-2", "x", "1.5", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="auto or a thread count >= 1"):
            _cli.threads_flag(bad)


def test_auto_threads_leaves_busy_cores_alone(monkeypatch):
    """auto = the cores the load average leaves idle, in [1, torch's default]: one thread on a
    loaded 2-core machine (where torch's default ran 12-30x slower), all of them when idle."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    for load, want in ((8.4, 1), (1.6, 1), (1.0, 1), (0.6, 1), (0.4, 2), (0.0, 2)):
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        assert _cli.auto_threads() == want, load
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert _cli.auto_threads() == 2  # never above torch's own default


def test_cpu_threads_sets_and_restores(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(_cli, "auto_threads", lambda: 1)
    with _cli.cpu_threads("auto") as t:
        assert t.threads == 1 == torch.get_num_threads()
    with _cli.cpu_threads(2) as t:
        assert t.threads == 2 == torch.get_num_threads()
    assert torch.get_num_threads() == before
    monkeypatch.setenv("OMP_NUM_THREADS", str(before))  # the user's choice stands
    monkeypatch.setattr(_cli, "auto_threads", lambda: pytest.fail("auto despite OMP_NUM_THREADS"))
    with _cli.cpu_threads("auto") as t:
        assert t.threads == before


def test_every_cli_takes_threads():
    from medusa_kernels.calibrate import parse_args as calibrate
    from medusa_kernels.demo.build import parse_args as build
    from medusa_kernels.generate import parse_args as generate
    from medusa_kernels.train import parse_args as train

    for parse, argv in ((generate, []), (calibrate, []), (build, []),
                        (train, ["medusa1", "--model", "m", "--out", "o"])):
        assert parse(argv).threads == "auto"
        assert parse(argv + ["--threads", "1"]).threads == 1


# --- 2, 3. exports and import cost ------------------------------------------------------------


def kernel_table_ops() -> list[str]:
    """Every op the README's kernel table names (first column: `name(...)`)."""
    table = section("### Kernels")
    names = []
    for row in table.splitlines():
        if row.startswith("| `"):
            first = row.split(" | ")[0]
            names += re.findall(r"`(\w+)\(", first)
    return names


def test_every_op_in_the_readme_table_is_a_top_level_name():
    names = kernel_table_ops()
    for must in ("tree_attention", "medusa_heads_topk", "lm_head_topk", "compact_kv_cache",
                 "accept_greedy", "accept_exact", "sample_logits", "filter_logits",
                 "sample_tokens"):
        assert must in names, must  # the table documents it
    for name in names:
        assert name in mk.__all__, name
        assert getattr(mk, name) is getattr(mk.ops, name), name
    assert "re-exported from `medusa_kernels`" in section("### Kernels")
    code = "from medusa_kernels import " + ", ".join(names) + "\nprint('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_import_loads_nothing_but_the_package():
    """In an interpreter that has loaded nothing (``-S``: no site, so not even what an editable
    install's finder brings), ``import medusa_kernels`` adds only itself to sys.modules: not
    torch, and not typing (several ms on its own: the "4-8 ms" a new user measured)."""
    code = ("import sys\nbefore = set(sys.modules)\nsys.path.insert(0, sys.argv[1])\n"
            "import medusa_kernels\nprint(' '.join(sorted(set(sys.modules) - before)))")
    out = subprocess.run([sys.executable, "-S", "-c", code, ROOT], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["medusa_kernels"]


def test_bench_records_the_median_of_fresh_interpreters(monkeypatch):
    """The bench's meta figure is the README's: ``-X importtime``'s cumulative microseconds on
    the module's own line, the median of the runs (here faked: 3000, 1000, 2000 us)."""
    from medusa_kernels.bench import __main__ as bench

    figures = iter([3000, 1000, 2000])
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        us = next(figures)
        err = (f"import time:        50 |        50 |   sys\n"
               f"import time:        40 | {us:10d} | medusa_kernels\n")
        return subprocess.CompletedProcess(cmd, 0, "", err)

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    assert bench.import_seconds("medusa_kernels", 3) == 0.002
    assert all(c[1:4] == ["-X", "importtime", "-c"] and c[4] == "import medusa_kernels"
               for c in calls) and len(calls) == 3


def test_readme_states_how_the_import_time_is_measured():
    text = " ".join(README.split())
    assert 'python -X importtime -c "import medusa_kernels"' in text
    assert "median of 5" in text
    assert "under 1 ms" not in text


# --- 4. heads for a model that has none -------------------------------------------------------


def test_readme_heads_recipe_commands_parse():
    """The commands of "Medusa heads for a model without them" are real commands: each parses
    with its CLI's own parser (the full run is in bench/results/2026-12-07-cpu-heads-recipe.md)."""
    from medusa_kernels.calibrate import parse_args as calibrate
    from medusa_kernels.generate import parse_args as generate
    from medusa_kernels.train import parse_args as train

    block = section("### Medusa heads for a model without them")
    commands = re.findall(r"```bash\n(.*?)```", block, flags=re.S)[0]
    seen = set()
    for line in commands.replace("\\\n", " ").splitlines():
        line = line.split("#")[0].strip()
        if not line.startswith("python -m medusa_kernels."):
            continue
        argv = shlex.split(line)
        module = argv[2].removeprefix("medusa_kernels.")
        if module == "tree":
            assert argv[3] == "calibrate", line
            calibrate(argv[4:])
        else:
            {"train": train, "generate": generate}[module](argv[3:])
        seen.add(argv[3] if module in ("train", "tree") else module)
    assert seen == {"medusa1", "generate", "calibrate"}, seen


# --- 5. a plain checkpoint: every missing piece at once ---------------------------------------


def test_plain_checkpoint_reports_every_missing_piece_at_once(plain_dir, capsys):
    from medusa_kernels.generate import main

    m = str(plain_dir / "m")
    base = ["--model", m, "--device", "cpu", "--max-new-tokens", "3", "--threads", "1"]
    # Medusa asked for (a tree) and text given: both pieces in one line, before loading
    assert main(base + ["--prompt", "hi", "--tree", "small_7"]) == 2
    line = one_line(capsys.readouterr().err)
    assert f"no Medusa heads in --model {m}" in line and "no tokenizer.json" in line
    assert main(base + ["--prompt", "hi", "--medusa", str(plain_dir)]) == 2  # a dir without
    line = one_line(capsys.readouterr().err)
    assert f"no Medusa heads in --medusa {plain_dir}" in line and "no tokenizer.json" in line
    # Medusa only by default: plain decoding with a one-line note; the tokenizer still an error
    assert main(base + ["--prompt", "hi"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "no tokenizer.json" in line and "Medusa" not in line
    assert main(base + ["--input-ids", "1,2,3"]) == 0
    out, err = capsys.readouterr()
    assert len(out.split()) == 3
    notes = [x for x in err.splitlines() if "note:" in x]
    assert len(notes) == 1 and "no Medusa heads" in notes[0] and "decoding plainly" in notes[0]
    assert "[plain] 3 tokens" in err and "1 CPU thread" in err
    assert main(base + ["--input-ids", "1,2,3", "--no-medusa"]) == 0
    assert "note:" not in capsys.readouterr().err
    assert main(base + ["--input-ids", "1,2", "--medusa", str(plain_dir / "h")]) == 0
    assert "[medusa, tree" in capsys.readouterr().err


# --- 6. demo.build never writes over the installed package by default ------------------------


def test_demo_build_writes_a_new_directory_by_default(tmp_path, monkeypatch, capsys):
    from medusa_kernels.demo import ASSETS
    from medusa_kernels.demo.build import main, out_dir, parse_args

    monkeypatch.chdir(tmp_path)
    assert out_dir(parse_args([])) == str(tmp_path / "demo_build")
    assert out_dir(parse_args(["--out", "x"])) == str(tmp_path / "x")
    assert out_dir(parse_args(["--into-package"])) == ASSETS
    assert out_dir(parse_args(["--into-package", "--out", ASSETS])) == os.path.abspath(ASSETS)
    shipped = os.path.join(ASSETS, "model", "model.safetensors")
    stamp = os.path.getmtime(shipped) if os.path.exists(shipped) else None
    for argv, part in ((["--out", ASSETS], "add --into-package"),
                       (["--out", os.path.join(ASSETS, ".")], "add --into-package"),
                       (["--into-package", "--out", "elsewhere"], "drop --out")):
        assert main(["--quick", *argv]) == 2
        assert part in one_line(capsys.readouterr().err)
    if stamp is not None:
        assert os.path.getmtime(shipped) == stamp
    assert not os.path.exists(tmp_path / "demo_build")


# --- 7. one dtype vocabulary ------------------------------------------------------------------


def test_every_dtype_flag_takes_load_models_names(plain_dir, capsys):
    from medusa_kernels.bench.__main__ import parse_args as bench
    from medusa_kernels.checkpoint import check_load_args
    from medusa_kernels.generate import parse_args as generate
    from medusa_kernels.train import parse_args as train

    train_argv = ["medusa1", "--model", "m", "--out", "o"]
    for name, canonical in DTYPE_NAMES.items():
        want = getattr(torch, canonical)
        assert check_load_args("m", None, name, "cpu")[0] == want
        assert getattr(torch, generate(["--dtype", name]).dtype) == want
        assert getattr(torch, bench(["--dtype", name]).dtype) == want
        args = train(train_argv + ["--dtype", name, "--save-dtype", name])
        assert getattr(torch, args.dtype) == want == getattr(torch, args.save_dtype)
    listed = str(DTYPE_CHOICES)
    with pytest.raises(ValueError) as api:
        check_load_args("m", None, "float8", "cpu")
    assert f"dtype must be one of {listed}" in str(api.value) and "'float8'" in str(api.value)
    for parse, argv, flag in ((generate, [], "--dtype"), (bench, [], "--dtype"),
                              (train, train_argv, "--dtype"), (train, train_argv, "--save-dtype")):
        with pytest.raises(SystemExit):
            parse(argv + [flag, "float8"])
        err = capsys.readouterr().err
        assert f"argument {flag}: must be one of {listed}, got 'float8'" in err, err
    from medusa_kernels.generate import main

    assert main(["--model", str(plain_dir / "m"), "--input-ids", "1,2", "--max-new-tokens", "2",
                 "--no-medusa", "--dtype", "fp64", "--threads", "1"]) == 0
    capsys.readouterr()


# --- 8. a prompt whose values cannot be read --------------------------------------------------


def test_meta_device_prompt_is_named(plain_dir):
    model = mk.load_model(plain_dir / "m")
    for prompt, where in ((torch.tensor([1, 2, 3], device="meta"), "prompt"),
                          (torch.tensor([[1, 2]], device="meta"), "prompt"),
                          ([torch.tensor([1, 2], device="meta")], "prompt[0]")):
        with pytest.raises(ValueError) as info:
            mk.generate(model, prompt, max_new_tokens=2, medusa=False)
        msg = str(info.value)
        assert msg.startswith(f"{where} is a tensor on the meta device"), msg
        assert "on the CPU or on the model's device" in msg
