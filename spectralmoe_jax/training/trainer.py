"""The training loop, top to bottom: mesh, input, model, optimiser, checkpoint, loop.

Read it like big_vision's train.py: each banner is one stage, in execution order.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import numpy as np
from absl import logging
from flax import nnx
from tqdm import tqdm

from spectralmoe_jax.errors import UserError
from spectralmoe_jax.io import workdir as workdir_lib
from spectralmoe_jax.io.checkpoint import Checkpointer
from spectralmoe_jax.io.metric_writer import MetricWriter
from spectralmoe_jax.models.segmentor import split_model
from spectralmoe_jax.training import mesh as mesh_lib
from spectralmoe_jax.training.optimizer import make_optimizer
from spectralmoe_jax.training.train_state import init_train_state, make_train_step


class NonFiniteLossError(UserError, FloatingPointError):
    """Training produced a NaN or infinite loss; the last good checkpoint is kept."""


def trained_item(state) -> dict:
    """What evaluation needs of a run: the trained parameters and the statistics they keep, as
    plain nested dicts (the checkpoint's `trained` item)."""
    return {"params": nnx.to_pure_dict(state.params), "stats": nnx.to_pure_dict(state.stats)}


BAD_TILES_FILE = "bad_tiles.txt"  # tiles skipped with config.data.on_bad_tile='skip'


def check_workdir_config(run, workdir: str) -> None:
    """Before anything is built: a workdir with checkpoints continues only the run it holds
    (`RunConfig.identity` against its config.json); else one line of what differs and how to
    start over, or, with `train.restart`, the previous run moved aside."""
    saved = (workdir_lib.read_config(workdir) or {}).get("config")
    if not saved or not has_checkpoints(workdir) or run.source is None:
        return  # nothing to resume, or nothing to compare: the parameter tree still is
    from spectralmoe_jax.run_config import run_identity

    found = workdir_lib.differences(run_identity(saved), run.identity())
    _start_over_or_refuse(workdir, [f"config {d}" for d in found], run.train.restart)


def _start_over_or_refuse(workdir: str, found: list[str], restart: bool) -> None:
    """`workdir.start_over_or_refuse`, the previous run moved by process 0 while the others
    wait for it."""
    workdir_lib.start_over_or_refuse(workdir, found, restart=restart,
                                     move=jax.process_index() == 0)
    if found and jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("previous run moved aside")


def has_checkpoints(workdir: str) -> bool:
    folder = os.path.join(workdir, "checkpoints")
    return os.path.isdir(folder) and any(name.isdigit() for name in os.listdir(folder))


class Training:
    """Everything a run holds: built once, then `run()` loops. Tests drive it step by step.

    `run` is the `RunConfig`; `model` the segmentor from `build.build_segmentor`, its parameters
    already placed on `mesh`; `lock` the `WorkdirLock` the run holds (released by `close`).
    """

    def __init__(self, run, workdir: str, model, mesh, *, lock=None):
        from spectralmoe_jax.data.pipeline import make_train_iterator

        self.config = run
        self.workdir = workdir
        self.lock = lock
        tc = run.train

        # --- Mesh --------------------------------------------------------------------------
        self.mesh = mesh
        if tc.batch_size % jax.process_count():
            raise UserError(f"train.batch_size {tc.batch_size} is not divisible by the "
                            f"{jax.process_count()} processes")

        # --- Model and optimiser -----------------------------------------------------------
        self.graphdef, params, self.frozen, stats = split_model(model)
        self.tx, self.schedule = make_optimizer(tc, params)
        state = init_train_state(params, self.tx, run.seed, stats)
        self.state_sharding = jax.tree.map(lambda _: mesh_lib.replicated(mesh), state)
        template = jax.tree.map(np.asarray, state)
        template_trained = trained_item(template)
        template_train = {"step": template.step, "opt_state": template.opt_state,
                          "rng": template.rng}

        # --- Checkpoints: this run's, or another run's -----------------------------------------
        directory = os.path.join(workdir, "checkpoints")
        self.checkpointer = Checkpointer(directory, keep=tc.keep_checkpoints, best_metric="mIoU")
        try:  # a refusal or bad input below ends the run's hold on the workdir
            latest = self.checkpointer.latest_step()
            if latest is not None:
                found = self.checkpointer.tree_differences(latest, trained=template_trained,
                                                           train=template_train)
                if found:
                    self.checkpointer.close()
                    _start_over_or_refuse(
                        workdir, [f"checkpoint step {latest} {d}" for d in found], tc.restart)
                    self.checkpointer = Checkpointer(directory, keep=tc.keep_checkpoints,
                                                     best_metric="mIoU")
            self.writer = MetricWriter(workdir, tensorboard=tc.tensorboard)

            # --- Input pipeline ------------------------------------------------------------------
            self.bad_tiles = None
            if run.data.on_bad_tile == "skip":
                from spectralmoe_jax.data.pipeline import BadTileLog

                self.bad_tiles = BadTileLog(os.path.join(workdir, BAD_TILES_FILE))
            self.iterator = make_train_iterator(
                run.data, seed=run.seed, batch_size=tc.batch_size // jax.process_count(),
                process_index=jax.process_index(), process_count=jax.process_count(),
                num_workers=run.data.num_workers,
                bad_tile_log=self.bad_tiles.path if self.bad_tiles else None)

            # --- Resume --------------------------------------------------------------------------
            restored = self.checkpointer.restore(trained=template_trained, train=template_train)
            if restored is not None:
                train, trained = restored["train"], restored["trained"]
                params, stats = template.params, template.stats
                nnx.replace_by_pure_dict(params, trained["params"])
                nnx.replace_by_pure_dict(stats, trained["stats"])
                state = state.replace(params=params, stats=stats, step=train["step"],
                                      opt_state=train["opt_state"], rng=train["rng"])
                if restored["data"] is not None:
                    self.iterator.set_state(restored["data"])
                logging.info("resumed from step %d", int(state.step))
            # The steps after the checkpoint are redone: their records go.
            self.writer.drop_after(restored["step"] if restored is not None else None)
            self.state = jax.device_put(state, self.state_sharding)
            if jax.process_index() == 0:
                workdir_lib.write_config(workdir, {
                    "config": run.to_json() if run.source is not None else None,
                    "model": dataclasses.asdict(model.config)})
        except BaseException:
            self.close()
            raise

        # --- The step ------------------------------------------------------------------------
        step_fn = make_train_step(self.graphdef, self.tx, num_classes=run.data.num_classes,
                                  loss_config=run.loss, ignore_index=run.data.ignore_index)
        self.train_step = jax.jit(step_fn, donate_argnums=(0,),
                                  out_shardings=(self.state_sharding, mesh_lib.replicated(mesh)))
        self.total_steps = tc.num_steps * tc.grad_accum_steps

    # -------------------------------------------------------------------------------------------
    def model(self):
        """The current model (trainable parameters from the state), for evaluation."""
        return nnx.merge(self.graphdef, self.state.params, self.frozen, self.state.stats)

    def step(self):
        """One step; returns its metrics as device arrays (not yet fetched)."""
        batch = mesh_lib.global_batch(next(self.iterator), self.mesh)
        self.state, metrics = self.train_step(self.state, self.frozen, batch)
        return metrics

    def save(self, metrics: dict | None = None):
        state = self.state
        self.checkpointer.save(
            int(state.step), trained=trained_item(state),
            train={"step": state.step, "opt_state": state.opt_state, "rng": state.rng},
            data=self.iterator.get_state(), metrics=metrics)

    def run(self, evaluate_fn=None, stop_after: int | None = None) -> dict:
        """Trains to `train.num_steps` (or `stop_after` steps, as if killed there, after its
        checkpoint); returns the last logged metrics."""
        tc = self.config.train
        start = int(self.state.step)
        if start >= self.total_steps:
            print(f"{self.workdir}: the run is complete (step {start} of {self.total_steps}); "
                  "nothing to train (raise train.num_steps to train on)")
            return self.writer.last("train")
        log_every, checkpoint_every, eval_every = tc.log_every, tc.checkpoint_every, tc.eval_every
        history, last = [], {}
        bar = tqdm(total=self.total_steps, initial=start, desc="train", unit="step",
                   disable=jax.process_index() != 0, dynamic_ncols=True)
        pending = None  # metrics of the previous step, fetched one step late so the device never waits
        end = self.total_steps if stop_after is None else min(stop_after, self.total_steps)
        try:  # the bar ends its line before an error is printed
            for step in range(start, end):
                metrics = self.step()
                if pending is not None:
                    history.append(self._check(*pending))
                pending = (step, metrics)
                bar.update(1)
                done = step + 1
                at_log = done % log_every == 0 or done == self.total_steps
                at_ckpt = done % checkpoint_every == 0 or done == self.total_steps
                at_eval = evaluate_fn is not None and eval_every and (
                    done % eval_every == 0 or done == self.total_steps)
                if at_log or at_ckpt or at_eval:
                    history.append(self._check(*pending))
                    pending = None
                if at_log and history:
                    last = {k: float(np.mean([h[k] for h in history])) for k in history[0]}
                    last["learning_rate"] = float(self.schedule(done // tc.grad_accum_steps))
                    if self.bad_tiles is not None:
                        last["bad_tiles"] = self.bad_tiles.count()
                    bar.set_postfix(loss=f"{last['loss']:.4f}")
                    self.writer.write(done, last)
                    history = []
                eval_metrics = None
                if at_eval:
                    eval_metrics = evaluate_fn(self.model(), done)
                    self.writer.write(done, eval_metrics, kind="eval")
                if at_ckpt or at_eval:
                    self.save({"mIoU": float(eval_metrics["mIoU"])} if eval_metrics else None)
        finally:
            bar.close()
        return last

    def close(self):
        """Ends the run's hold on its workdir (also after an error)."""
        if getattr(self, "writer", None) is not None:
            self.writer.close()
        self.checkpointer.close()
        if self.lock is not None:
            self.lock.release()

    def _check(self, step: int, metrics) -> dict:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not metrics.pop("finite") or not math.isfinite(metrics["loss"]):
            last = self.checkpointer.latest_step()
            raise NonFiniteLossError(
                f"non-finite loss ({metrics['loss']}) at step {step + 1}: training stopped. "
                f"The state was not updated by this step and nothing was saved after it; the last "
                f"good checkpoint is step {last} in {self.checkpointer.directory}. Lower "
                f"train.learning_rate or set train.clip_grad_norm, then resume.")
        return metrics
