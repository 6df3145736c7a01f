"""The engine: exact resume, NaN stop, frozen weights, checkpoint errors, multi-device step."""

import errno
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from tests.conftest import jaxpr_equations
from tests.tiny import ROOT, tiny_training
from spectralmoe_jax.errors import UserError
from spectralmoe_jax.io.checkpoint import CheckpointError
from spectralmoe_jax.training import mesh as mesh_lib
from spectralmoe_jax.training.trainer import NonFiniteLossError, trained_item


def read_losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if r["kind"] == "train"}


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    training = tiny_training(workdir, num_steps=4)
    frozen_before = leaves(training.frozen)
    params_before = leaves(training.state.params)
    training.run()
    return workdir, training, frozen_before, params_before


def test_resume_is_exact(uninterrupted, tmp_path):
    workdir, full, _, _ = uninterrupted
    first = tiny_training(str(tmp_path), num_steps=4)
    first.run(stop_after=2)  # "killed" right after the step-2 checkpoint
    first.close()  # as its process ending would: the workdir's lock is released
    resumed = tiny_training(str(tmp_path), num_steps=4)
    assert int(resumed.state.step) == 2
    resumed.run()
    expected, got = read_losses(workdir), read_losses(str(tmp_path))
    assert sorted(got) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        assert got[step] == expected[step], (step, got[step], expected[step])  # bitwise on CPU
    for a, b in zip(leaves(full.state.params), leaves(resumed.state.params)):
        np.testing.assert_array_equal(a, b)


def test_train_step_is_one_program_without_host_round_trips(uninterrupted):
    """Layers under scan; no while loop or cond (on a GPU XLA reads their predicates on the
    host every iteration) and no callback to Python anywhere in the step."""
    _, training, _, _ = uninterrupted
    batch = mesh_lib.global_batch(next(training.iterator), training.mesh)
    jaxpr = jax.make_jaxpr(training.train_step)(training.state, training.frozen, batch).jaxpr
    names = [eqn.primitive.name for eqn in jaxpr_equations(jaxpr)]
    assert "scan" in names
    assert not {n for n in names if n in ("while", "cond") or "callback" in n}


def test_frozen_weights_are_bit_identical_and_trainables_move(uninterrupted):
    _, training, frozen_before, params_before = uninterrupted
    for before, after in zip(frozen_before, leaves(training.frozen)):
        np.testing.assert_array_equal(before, after)
    moved = [not np.array_equal(b, a) for b, a in zip(params_before, leaves(training.state.params))]
    assert sum(moved) > len(moved) // 2


class PoisonedIterator:
    """Passes batches through, but the `at`-th one carries NaN pixels."""

    def __init__(self, inner, at):
        self.inner, self.at, self.count = inner, at, 0

    def __next__(self):
        batch = next(self.inner)
        self.count += 1
        if self.count == self.at:
            batch = dict(batch, image=np.full_like(batch["image"], np.nan))
        return batch

    def get_state(self):
        return self.inner.get_state()


def test_nan_loss_stops_and_last_checkpoint_restores(uninterrupted, tmp_path):
    training = tiny_training(str(tmp_path), num_steps=4)
    training.iterator = PoisonedIterator(training.iterator, at=3)
    with pytest.raises(NonFiniteLossError, match="step 3.*last good checkpoint is step 2"):
        training.run()
    assert training.checkpointer.latest_step() == 2
    training.close()
    restored = tiny_training(str(tmp_path), num_steps=4)
    assert int(restored.state.step) == 2
    # The checkpoint holds the uninterrupted run's step-2 state: compare losses.
    assert read_losses(str(tmp_path))[2] == read_losses(uninterrupted[0])[2]


def test_full_disk_is_a_clear_error_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    training = tiny_training(str(tmp_path), num_steps=2)
    training.run(stop_after=2)
    assert training.checkpointer.latest_step() == 2

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(training.checkpointer.manager, "save", full_disk)
    with pytest.raises(CheckpointError, match="disk is full.*step 2.*untouched"):
        training.save()
    assert training.checkpointer.latest_step() == 2
    assert training.checkpointer.restore(
        trained=trained_item(jax.tree.map(np.asarray, training.state))) is not None


def test_unwritable_workdir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match="not writable"):
        tiny_training(str(blocker / "run"))


ONE_STEP_SCRIPT = textwrap.dedent("""
    import os, sys
    devices = int(sys.argv[1])
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={devices}")
    sys.path.insert(0, os.getcwd())
    import jax, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    from tests.tiny import tiny_config
    from spectralmoe_jax.modes import start_training
    from spectralmoe_jax.run_config import parse
    from spectralmoe_jax.training import mesh as mesh_lib
    from spectralmoe_jax.training.train_state import make_loss_fn

    config = tiny_config(batch_size=8, num_steps=1)
    config.mesh.data = devices  # the batch of 8 split over `devices` data shards
    run = parse(config)
    training = start_training(run, sys.argv[2])
    batch = mesh_lib.global_batch(next(training.iterator), training.mesh)
    # The step's objective and its gradient, with the batch sharded over the mesh: the AdamW
    # update after it is elementwise, so equal gradients make equal steps.
    loss_fn = make_loss_fn(training.graphdef, num_classes=run.data.num_classes,
                           loss_config=run.loss)
    rng = jax.random.fold_in(training.state.rng, 0)
    (loss, _), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        training.state.params, training.frozen, training.state.stats, batch, rng)
    out = {str(i): np.asarray(g) for i, g in enumerate(jax.tree.leaves(grads))}
    np.savez(sys.argv[3], loss=float(loss), **out)
""")


def run_one_step(devices, tmp_path):
    out = tmp_path / f"step_{devices}.npz"
    result = subprocess.run([sys.executable, "-c", ONE_STEP_SCRIPT, str(devices),
                             str(tmp_path / f"work{devices}"), str(out)],
                            capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    return dict(np.load(out))


def test_train_step_on_8_devices_equals_one_device(tmp_path):
    one, eight = run_one_step(1, tmp_path), run_one_step(8, tmp_path)
    loss_one, loss_eight = one.pop("loss"), eight.pop("loss")
    assert abs(loss_eight - loss_one) <= 1e-5 * abs(loss_one)
    scale = max(np.abs(g).max() for g in one.values())
    for key in one:  # float32 tolerance, relative to the gradient's scale
        np.testing.assert_allclose(eight[key], one[key], rtol=1e-4, atol=1e-5 * scale, err_msg=key)

