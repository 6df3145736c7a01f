"""Pod training on one machine: 2 processes x 4 CPU devices against 1 process x 8.

Through the real trainer (`modes.start_training`, `Training`) on the tiny config, global batch 8:
  - the losses of 2 x 4 equal those of 1 x 8 (relative 1e-6: gloo's all-reduce sums in another
    order than the in-process one);
  - each process reads only its slice of every batch: process p's batch is rows [4p, 4p + 4) of
    the one-process batch, pixel for pixel;
  - a checkpoint written by 1 process resumes in 2 and one written by 2 resumes in 1, with the
    following losses equal to the uninterrupted runs';
  - evaluation metrics reduced over 2 processes (`--mode eval` of the one-process run's last
    checkpoint) equal the one-process metrics of the same weights, exactly.
The worker is this file run as a script: `python -m tests.test_multiprocess PHASE DIR`.
"""

import json
import os
import shutil
import sys

import numpy as np
import pytest

from tests.multiprocess import run_processes
from tests.tiny import ROOT

GLOBAL_BATCH = 8
TIMEOUT = 900  # seconds per group of processes: a wedged run fails instead of hanging the suite


def launch(phase: str, directory, processes: int):
    run_processes([sys.executable, "-m", "tests.test_multiprocess", phase, str(directory)],
                  processes=processes, devices_per_process=8 // processes, timeout=TIMEOUT,
                  cwd=ROOT, env={"PYTHONPATH": ROOT})


def load(directory, name):
    with open(os.path.join(directory, f"{name}.json")) as f:
        return {int(step): loss for step, loss in json.load(f).items()}


def relative(a, b) -> float:
    return abs(a - b) / abs(b)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three launches: 1 x 8 (train, resumable copy at step 2, eval), 2 x 4 (the same, plus
    the 1-process run resumed and evaluated), 1 x 8 (the 2-process run resumed)."""
    directory = tmp_path_factory.mktemp("multiprocess")
    launch("one", directory, 1)
    launch("two", directory, 2)
    launch("resume_two_in_one", directory, 1)
    return directory


def test_two_processes_train_as_one(runs):
    one, two = load(runs, "losses_one"), load(runs, "losses_two")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    for step in one:
        assert relative(two[step], one[step]) <= 1e-6, (step, two[step], one[step])


def test_each_process_reads_only_its_slice_of_every_batch(runs):
    whole = np.load(os.path.join(runs, "batches_one_p0.npz"))
    local = 8 // 2
    for p in (0, 1):
        mine = np.load(os.path.join(runs, f"batches_two_p{p}.npz"))
        assert mine["image"].shape[:2] == (4, local)  # 4 steps of 4 rows
        np.testing.assert_array_equal(mine["image"], whole["image"][:, p * local:(p + 1) * local])
        np.testing.assert_array_equal(mine["label"], whole["label"][:, p * local:(p + 1) * local])


def test_checkpoints_resume_at_the_other_process_count(runs):
    one, two = load(runs, "losses_one"), load(runs, "losses_two")
    one_in_two = load(runs, "losses_one_resumed_in_two")
    two_in_one = load(runs, "losses_two_resumed_in_one")
    assert sorted(one_in_two) == sorted(two_in_one) == [3, 4]
    for step in (3, 4):
        assert relative(one_in_two[step], two[step]) <= 1e-6, (step, one_in_two[step], two[step])
        assert relative(one_in_two[step], one[step]) <= 1e-6
        assert relative(two_in_one[step], one[step]) <= 1e-6, (step, two_in_one[step], one[step])


def test_metrics_reduced_over_processes_equal_one_process(runs):
    with open(os.path.join(runs, "eval_one.json")) as f:
        one = json.load(f)
    with open(os.path.join(runs, "eval_two.json")) as f:
        two = json.load(f)
    assert one["confusion"] == two["confusion"] and sum(map(sum, one["confusion"])) > 0
    assert one["metrics"] == two["metrics"]


# --- the worker ------------------------------------------------------------------------------------

class Recorder:
    """Passes a data iterator through, keeping every batch it hands out."""

    def __init__(self, inner):
        self.inner, self.batches = inner, []

    def __next__(self):
        batch = next(self.inner)
        self.batches.append({k: np.asarray(v) for k, v in batch.items()})
        return batch

    def get_state(self):
        return self.inner.get_state()

    def save(self, path):
        np.savez(path, **{k: np.stack([b[k] for b in self.batches]) for k in ("image", "label")})


def worker(phase: str, directory: str):
    from tests.multiprocess import start_worker

    jax = start_worker()
    from jax.experimental import multihost_utils

    from spectralmoe_jax import modes
    from spectralmoe_jax.evaluation.runner import Evaluator
    from spectralmoe_jax.run_config import parse
    from tests.tiny import tiny_config

    processes, lead = jax.process_count(), jax.process_index() == 0
    name = {1: "one", 2: "two"}[processes]
    config = tiny_config(batch_size=GLOBAL_BATCH, num_steps=4)
    config.eval.report = False
    run = parse(config)

    def path(*parts):
        return os.path.join(directory, *parts)

    def training(workdir):
        return modes.start_training(run, path(workdir))

    def write(name, value):
        with open(path(f"{name}.json"), "w") as f:
            json.dump(value, f)

    def write_losses(name, workdir, after=0):
        if lead:  # process 0 writes the run's metrics
            with open(path(workdir, "metrics.jsonl")) as f:
                records = [r for r in map(json.loads, f) if r["kind"] == "train"]
            write(name, {r["step"]: r["loss"] for r in records if r["step"] > after})

    def copy(source, target):
        if lead:
            shutil.copytree(path(source), path(target))
        multihost_utils.sync_global_devices(f"copied {target}")

    if phase == "resume_two_in_one":
        resumed = training("two_at_2")
        assert int(resumed.state.step) == 2
        resumed.run()
        write_losses("losses_two_resumed_in_one", "two_at_2", after=2)
        return
    # Train 2 steps (checkpoint), keep a copy to resume elsewhere, train on to step 4.
    train = training(f"run_{name}")
    train.iterator = Recorder(train.iterator)
    train.run(stop_after=2)
    copy(f"run_{name}", f"{name}_at_2")
    train.run()
    train.iterator.save(path(f"batches_{name}_p{jax.process_index()}.npz"))
    write_losses(f"losses_{name}", f"run_{name}")
    if phase == "one":  # the weights at step 4, evaluated in memory
        record = Evaluator(run).evaluate(train.model(), path("eval_one"), report=False)
        confusion = np.load(path("eval_one", "confusion.npy")).tolist()
        write("eval_one", {"metrics": record, "confusion": confusion})
        return
    # Two processes: the one-process checkpoints resumed here.
    resumed = training("one_at_2")
    assert int(resumed.state.step) == 2
    resumed.run()
    write_losses("losses_one_resumed_in_two", "one_at_2", after=2)
    # The one-process weights at step 4 through `--mode eval` over both processes.
    record = modes.eval(run, modes.Paths(workdir=path("run_one"), output=path("eval_two")))
    assert record["step"] == 4
    if lead:
        confusion = np.load(path("eval_two", "confusion.npy")).tolist()
        write("eval_two", {"metrics": {k: record[k] for k in record if k not in ("checkpoint", "step")},
                           "confusion": confusion})


if __name__ == "__main__":
    worker(*sys.argv[1:])
