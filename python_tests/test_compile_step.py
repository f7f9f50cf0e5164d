"""The decode step under torch.compile with the default Inductor backend, fullgraph: the same
tokens, counts, cache and lengths as eager, and no copy of a KV cache in the generated code
(the fused rope + cache write and the compaction mutate the caches in place: Inductor passes
the cache inputs to them as they are, never a clone, and writes nothing back at the end)."""

import re

import pytest
import torch
from tiny_models import step_inputs
from torch._inductor.utils import run_and_get_code

pytestmark = pytest.mark.slow  # about a minute per step on one CPU core


def cache_copies(code: str, cache) -> list[str]:
    """Lines of Inductor's code that copy a cache: a buffer of a cache's shape, a copy_ back
    into a graph input, or a clone."""
    shape = re.escape(str(tuple(cache.k.shape)))
    bad = []
    for line in code.splitlines():
        if re.search(rf"empty_strided\w*\({shape}", line) or ".copy_(" in line or \
                re.search(r"\bclone\b", line):
            bad.append(line.strip())
    return bad


@pytest.mark.parametrize("medusa", [False, True], ids=["plain", "medusa"])
def test_inductor_step_same_tokens_no_cache_copy(medusa):
    m, tb, step, root, last_hidden, running, caches = step_inputs(medusa)
    with torch.inference_mode():
        eager = step(m, tb, caches[0], root, last_hidden, running)
        fn = torch.compile(lambda c: step(m, tb, c, root, last_hidden, running), fullgraph=True)
        compiled, codes = run_and_get_code(fn, caches[1])
    assert torch.equal(compiled[0], eager[0]) and torch.equal(compiled[1], eager[1])  # tokens
    torch.testing.assert_close(compiled[3], eager[3], rtol=1e-5, atol=1e-5)  # hidden
    for name in ("k", "v", "seqlens"):
        torch.testing.assert_close(getattr(caches[1], name), getattr(caches[0], name))
    code = "\n".join(codes)
    assert "rope_kv_write" in code  # the fused op is in the graph, called on the caches
    assert cache_copies(code, caches[1]) == []
    if medusa:
        assert "compact_kv_cache" in code


def test_cache_copy_detector_sees_a_copy():
    """The detector finds the copies the old step compiled to (a cache-shaped buffer)."""
    cache = type("C", (), {"k": torch.empty(2, 2, 96, 2, 32)})()
    code = "buf3 = empty_strided_cpu((2, 2, 96, 2, 32), (12288, 6144, 64, 32, 1), torch.float32)"
    assert cache_copies(code, cache) == [code]
    assert cache_copies("arg8_1.copy_(buf3)", cache) == ["arg8_1.copy_(buf3)"]
    assert cache_copies("buf4 = empty_strided_cpu((2, 16, 32), (512, 32, 1))", cache) == []
