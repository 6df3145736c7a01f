"""A run's bookkeeping: one metric record and one event file per evaluation, and evaluations
that compile once."""

import glob
import json
import os

import jax
import pytest

from tests.tiny import tiny_config
from spectralmoe_jax import modes
from spectralmoe_jax.run_config import parse


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """4 steps of the tiny run, evaluating at steps 2 and 4, TensorBoard on."""
    workdir = str(tmp_path_factory.mktemp("run"))
    config = tiny_config(num_steps=4)
    config.train.update(dict(eval_every=2, tensorboard=True))
    config.data.splits.target.domains = ("D004_2021",)
    run = parse(config)
    modes.train(run, modes.Paths(workdir=workdir))
    return run, workdir


def test_each_evaluation_is_recorded_once_in_one_event_file(trained):
    _, workdir = trained
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    evals = [r["step"] for r in records if r["kind"] == "eval"]
    assert evals == [2, 4]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    assert len(glob.glob(os.path.join(workdir, "tensorboard", "events.*"))) == 1
    assert sorted(os.listdir(os.path.join(workdir, "eval"))) == ["step_2", "step_4"]


def test_a_second_evaluation_compiles_nothing(trained):
    from spectralmoe_jax.build import build_segmentor
    from spectralmoe_jax.evaluation.runner import Evaluator

    run, workdir = trained
    model = build_segmentor(run.model, seed=run.seed, trained=workdir).model
    evaluator = Evaluator(run)
    evaluator.evaluate(model, os.path.join(workdir, "first"), report=False)
    events = []

    def count(event, duration, **_):
        if event in ("/jax/core/compile/jaxpr_trace_duration",
                     "/jax/core/compile/backend_compile_duration"):
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        evaluator.evaluate(model, os.path.join(workdir, "second"), report=False)
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    assert events == []
