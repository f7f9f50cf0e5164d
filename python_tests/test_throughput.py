"""The bench's throughput section on a tiny checkpoint (quick: B = 1, 4, 16): plain, fixed
tree, adaptive (table) and online policy rows at every batch, the four outputs identical, the
adaptive run following its table; without a table for the device the section calibrates one in
the run; the online policy's trace and its plot."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import make_hf_model, save_random_heads

from medusa_kernels.bench import SECTIONS, throughput
from medusa_kernels.bench._common import BenchContext
from medusa_kernels.policy import TreePolicy

TABLE = [{"batch": 1, "tree": [[0], [1], [0, 0]], "speedup": 1.4},
         {"batch": 4, "tree": [[0]], "speedup": 1.1},
         {"batch": 16, "tree": [], "speedup": 1.0}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("throughput")
    make_hf_model("llama-mha", seed=2, path=root / "model")
    save_random_heads(root / "heads", num_heads=3, seed=2)
    return root


def context(ckpt, tree=None) -> BenchContext:
    return BenchContext(device=torch.device("cpu"), dtype=torch.float32, quick=True,
                        model_dir=str(ckpt / "model"), medusa_dir=str(ckpt / "heads"), tree=tree)


def test_rows_per_batch_and_mode_with_a_table(ckpt, tmp_path):
    assert SECTIONS[-1] == "throughput"
    table = tmp_path / "table.json"
    TreePolicy(TABLE).save(table)
    ctx = context(ckpt, str(table))
    rows = throughput.run(ctx)
    assert [(r["impl"], r["B"]) for r in rows] == [
        (m, b) for b in throughput.QUICK_BATCHES for m in throughput.MODES]
    for row in rows:
        assert row["tokens"] == 16 * row["B"] and row["tokens_per_s"] > 0
        assert sum(row["trees"].values()) == row["steps"]
        if row["impl"] != "plain":
            assert row["check"] == "ok" and row["identical"] and row["speedup"] > 0
    by = {(r["impl"], r["B"]): r for r in rows}
    fixed = by["fixed", 1]
    assert fixed["tree"] == "small_7" and fixed["trees"] == {"8": fixed["steps"]}
    assert set(by["adaptive", 1]["trees"]) == {"4"}  # one sequence: the table's batch-1 tree
    assert by["adaptive", 16]["trees"]["1"] >= 1  # 16 rows: plain until half of them finish
    for b in throughput.QUICK_BATCHES:
        best = max(by["plain", b]["tokens_per_s"], by["fixed", b]["tokens_per_s"])
        adaptive, online = by["adaptive", b], by["online", b]
        assert adaptive["vs_best"] == pytest.approx(adaptive["tokens_per_s"] / best)
        assert online["vs_best"] == pytest.approx(online["tokens_per_s"] / best)
        assert online["vs_table"] == pytest.approx(online["tokens_per_s"] /
                                                   adaptive["tokens_per_s"])
        assert online["tree"] == "online" and online["check"] == "ok"
    assert any("adaptive policy --tree" in n for n in ctx.notes)
    assert by["adaptive", 1]["same_work_as_fixed"] is False


def test_a_table_of_the_fixed_tree_does_the_same_work(ckpt, tmp_path):
    from medusa_kernels.tree import TREES

    table = tmp_path / "same.json"
    TreePolicy([{"batch": 1, "tree": TREES["small_7"]}]).save(table)
    rows = throughput.run(context(ckpt, str(table)), batches=(2,))
    assert rows[2]["same_work_as_fixed"] is True and rows[2]["trees"] == rows[1]["trees"]
    assert rows[3]["impl"] == "online"


def test_without_a_table_the_section_calibrates_one(ckpt, tmp_path):
    import shutil

    shutil.copytree(ckpt, tmp_path / "ckpt")  # its own copy: a calibrated tree is added
    ckpt = tmp_path / "ckpt"
    acc = [[0.6, 0.2, 0.1], [0.5, 0.2, 0.1], [0.4, 0.2, 0.1]]
    (ckpt / "model" / "calibrated_tree_cpu.json").write_text(
        json.dumps({"choices": [[0], [0, 0]], "accuracies": acc}))
    ctx = context(ckpt)
    rows = throughput.run(ctx, batches=(1, 2))
    assert [r["B"] for r in rows] == [1] * 4 + [2] * 4
    assert rows[1]["tree"] == "calibrated_tree_cpu.json"
    assert all(r.get("check", "ok") == "ok" for r in rows)
    assert any("calibrated in this run" in n for n in ctx.notes)


def test_the_online_trace_and_its_plot(tmp_path):
    pytest.importorskip("matplotlib")
    assert throughput.main(["--out", str(tmp_path), "--batch", "3", "--max-new-tokens",
                            "24"]) == 0
    data = json.loads((tmp_path / "online_trace.json").read_text())
    assert data["identical_to_plain"] and len(data["step_nodes"]) == data["steps"]
    assert len(data["step_rows"]) == data["steps"] and max(data["step_rows"]) == 3
    assert sum(data["tree_steps"].values()) == data["steps"]
    assert (tmp_path / "online_trace.png").stat().st_size > 1000
