"""`--mode compare` on the bundled demo tiles at tiny width: each method of the paper's Table 3
trains a few steps with a finite loss, only its own parameters and the head train (the frozen
weights stay bit-identical), it is evaluated on the target domain, and one table comes out."""

import json
import os

import jax
import numpy as np
import pytest

from spectralmoe_jax import comparison, modes
from spectralmoe_jax.models.vit import vit_config
from spectralmoe_jax.run_config import parse
from spectralmoe_jax.training.trainer import Training
from tests.tiny import tiny_config

# One method of each way of acting on the frozen ViT: deltas inside attention, prompt tokens,
# tokens after the blocks that read depth (each method's own math is tested in test_methods.py,
# test_in_block_methods.py and test_token_methods.py; SpectralMoE, REIN and the frozen baseline
# train in test_training.py / test_runs.py; `compare.methods` defaults to all nine). Each
# method compiles its own step, so the suite's time grows with this list.
METHODS = ("lora", "vpt", "depthforge")
STEPS = 2


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("compare"))
    config = tiny_config(num_steps=STEPS)
    config.train.checkpoint_every = STEPS
    config.data.splits.target.domains = ("D004_2021",)
    config.compare.methods = METHODS
    run = parse(config)
    seen = {}
    original = Training.run

    def recorded(self, *args, **kwargs):
        """Training.run, keeping each method's frozen and trainable leaves around it."""
        before = leaves(self.frozen), leaves(self.state.params)
        out = original(self, *args, **kwargs)
        paths = [jax.tree_util.keystr(p) for p, _ in
                 jax.tree_util.tree_flatten_with_path(self.state.params)[0]]
        seen[os.path.basename(self.workdir)] = dict(
            frozen_before=before[0], frozen_after=leaves(self.frozen), params_before=before[1],
            params_after=leaves(self.state.params), paths=paths)
        return out

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Training, "run", recorded)
        rows = modes.compare(run, modes.Paths(workdir=workdir))
    return run, workdir, rows, seen


def test_every_method_trains_with_only_its_own_parameters(compared):
    _, _, rows, seen = compared
    assert [row["method"] for row in rows] == list(METHODS)
    for row in rows:
        record = seen[row["method"]]
        assert row["steps"] == STEPS and np.isfinite(row["final_loss"]), row
        for before, after in zip(record["frozen_before"], record["frozen_after"]):
            np.testing.assert_array_equal(before, after)
        assert all(p.startswith(("['adapter']", "['head']")) for p in record["paths"]), row
        moved = {path.split("]")[0] for path, b, a in zip(
            record["paths"], record["params_before"], record["params_after"])
            if not np.array_equal(b, a)}
        assert moved == {"['adapter'", "['head'"}, (row["method"], moved)
        assert row["adapter"] > 0 and row["trainable"] == row["adapter"] + row["head"]


def test_the_table_has_a_row_per_method_and_the_target_domain(compared):
    _, workdir, rows, _ = compared
    with open(os.path.join(workdir, "comparison.md")) as f:
        table = f.read().splitlines()
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert header[:7] == ["method", "adapter (M)", "head (M)", "trainable (M)", "Table 3 (M)",
                          "step (ms)", "img/s"]
    assert "D004_2021 mIoU" in header and "D004_2021 mAcc" in header
    body = [[cell.strip() for cell in line.strip("|").split("|")] for line in table[2:2 + len(rows)]]
    assert [line[0] for line in body] == list(METHODS)
    by_method = {line[0]: dict(zip(header, line)) for line in body}
    # The paper's counts belong to its backbones' shapes: none at this width.
    assert {line[4] for line in body} == {"-"}
    _, cells = comparison.table_rows(rows, vit_config("dinov3_vitl16"))
    paper = {line[0]: line[4] for line in cells}
    assert paper == {"lora": "0.79", "vpt": "3.69", "depthforge": "2.99"}
    _, cells = comparison.table_rows([dict(rows[0], method=m) for m in ("set", "fada")],
                                     vit_config("dinov3_vitl16"))
    assert {line[0]: line[4] for line in cells} == {"set": "6.13*", "fada": "11.65*"}
    for row in rows:
        cells = by_method[row["method"]]
        assert cells["D004_2021 mIoU"] == f"{row['metrics']['D004_2021/mIoU']:.4f}"
        assert 0.0 <= row["metrics"]["mIoU"] <= 100.0
        assert float(cells["step (ms)"]) > 0
    with open(os.path.join(workdir, "comparison.json")) as f:
        assert [r["method"] for r in json.load(f)["rows"]] == list(METHODS)
    assert os.path.exists(os.path.join(workdir, "comparison.csv"))


def test_a_second_compare_reuses_finished_methods(compared):
    run, workdir, rows, _ = compared
    logs = {m: os.path.getsize(os.path.join(workdir, m, "metrics.jsonl")) for m in METHODS}
    again = modes.compare(run, modes.Paths(workdir=workdir))
    assert again == json.loads(json.dumps(rows))
    assert logs == {m: os.path.getsize(os.path.join(workdir, m, "metrics.jsonl")) for m in METHODS}
