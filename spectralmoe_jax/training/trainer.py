"""The training loop, top to bottom: mesh, input, model, optimiser, checkpoint, loop.

Read it like big_vision's train.py: each banner is one stage, in execution order.
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np
from absl import logging
from flax import nnx
from tqdm import tqdm

from spectralmoe_jax.models.segmentor import build_segmentor, dataclass_from_config, split_model
from spectralmoe_jax.training import mesh as mesh_lib
from spectralmoe_jax.training.checkpoint import Checkpointer, unpack_data_state
from spectralmoe_jax.training.mask2former_loss import LossConfig
from spectralmoe_jax.training.metric_writer import MetricWriter
from spectralmoe_jax.training.optimizer import make_optimizer
from spectralmoe_jax.training.train_state import init_train_state, make_train_step


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss; the last good checkpoint is kept."""


def loss_config_from(config) -> LossConfig:
    return dataclass_from_config(LossConfig, dict(config.get("loss", {})), "loss")


class Training:
    """Everything a run holds: built once, then `run()` loops. Tests drive it step by step."""

    def __init__(self, config, workdir: str):
        from spectralmoe_jax.data.pipeline import make_train_iterator
        from spectralmoe_jax.data.validate import validate_dataset

        self.config = config
        self.workdir = workdir
        tc = config.train

        # --- Bad input is found before anything is written ---------------------------------
        if tc.get("validate_data", True):
            # A quick check (headers, a sample of tiles); `--mode validate` reads every pixel.
            validate_dataset(config.data, read_pixels=False, max_tiles=256)
        self.checkpointer = Checkpointer(
            os.path.join(workdir, "checkpoints"), keep=tc.get("keep_checkpoints", 3),
            best_metric="mIoU")
        self.writer = MetricWriter(workdir, tensorboard=tc.get("tensorboard", True))

        # --- Mesh --------------------------------------------------------------------------
        self.mesh = mesh_lib.make_mesh(config.get("mesh", {}))
        if tc.batch_size % jax.process_count():
            raise ValueError(f"train.batch_size {tc.batch_size} is not divisible by the "
                             f"{jax.process_count()} processes")

        # --- Model and optimiser -----------------------------------------------------------
        model = build_segmentor(config.model, seed=config.seed)
        self.graphdef, params, frozen, rest = split_model(model)
        self.tx, self.schedule = make_optimizer(tc, params)
        state = init_train_state(params, self.tx, config.seed)
        self.frozen = mesh_lib.shard_frozen(frozen, self.mesh, config.get("mesh", {}).get("fsdp", False))
        self.rest = jax.device_put(rest, mesh_lib.replicated(self.mesh))
        self.state_sharding = jax.tree.map(lambda _: mesh_lib.replicated(self.mesh), state)

        # --- Input pipeline ------------------------------------------------------------------
        self.iterator = make_train_iterator(
            config.data, seed=config.seed, batch_size=tc.batch_size // jax.process_count(),
            process_index=jax.process_index(), process_count=jax.process_count(),
            num_workers=config.data.get("num_workers", 0))

        # --- Resume --------------------------------------------------------------------------
        restored = self.checkpointer.restore(jax.tree.map(np.asarray, state))
        if restored is not None:
            state, data_state = restored
            data_state = unpack_data_state(data_state)
            if data_state is not None:
                self.iterator.set_state(data_state)
            logging.info("resumed from step %d", int(state.step))
        self.state = jax.device_put(state, self.state_sharding)

        # --- The step ------------------------------------------------------------------------
        step_fn = make_train_step(
            self.graphdef, self.tx, num_classes=config.data.num_classes,
            loss_config=loss_config_from(config), ignore_index=config.data.get("ignore_index", 255))
        self.train_step = jax.jit(step_fn, donate_argnums=(0,),
                                  out_shardings=(self.state_sharding, mesh_lib.replicated(self.mesh)))
        self.total_steps = tc.num_steps * tc.get("grad_accum_steps", 1)

    # -------------------------------------------------------------------------------------------
    def model(self):
        """The current model (trainable parameters from the state), for evaluation."""
        return nnx.merge(self.graphdef, self.state.params, self.frozen, self.rest)

    def step(self):
        """One step; returns its metrics as device arrays (not yet fetched)."""
        batch = mesh_lib.global_batch(next(self.iterator), self.mesh)
        self.state, metrics = self.train_step(self.state, self.frozen, self.rest, batch)
        return metrics

    def save(self, metrics: dict | None = None):
        self.checkpointer.save(int(self.state.step), self.state, self.iterator.get_state(),
                               metrics=metrics)

    def run(self, evaluate_fn=None, stop_after: int | None = None) -> dict:
        """Trains to `train.num_steps` (or `stop_after` steps, as if killed there, after its
        checkpoint); returns the last logged metrics."""
        tc = self.config.train
        start = int(self.state.step)
        log_every = tc.get("log_every", 50)
        checkpoint_every = tc.get("checkpoint_every", 1000)
        eval_every = tc.get("eval_every", 0)
        history, last = [], {}
        bar = tqdm(total=self.total_steps, initial=start, desc="train", unit="step",
                   disable=jax.process_index() != 0, dynamic_ncols=True)
        pending = None  # metrics of the previous step, fetched one step late so the device never waits
        end = self.total_steps if stop_after is None else min(stop_after, self.total_steps)
        for step in range(start, end):
            metrics = self.step()
            if pending is not None:
                history.append(self._check(*pending))
            pending = (step, metrics)
            bar.update(1)
            done = step + 1
            at_log = done % log_every == 0 or done == self.total_steps
            at_ckpt = done % checkpoint_every == 0 or done == self.total_steps
            at_eval = evaluate_fn is not None and eval_every and (done % eval_every == 0 or done == self.total_steps)
            if at_log or at_ckpt or at_eval:
                history.append(self._check(*pending))
                pending = None
            if at_log and history:
                last = {k: float(np.mean([h[k] for h in history])) for k in history[0]}
                last["learning_rate"] = float(self.schedule(done // tc.get("grad_accum_steps", 1)))
                bar.set_postfix(loss=f"{last['loss']:.4f}")
                self.writer.write(done, last)
                history = []
            eval_metrics = None
            if at_eval:
                eval_metrics = evaluate_fn(self.model(), done)
                self.writer.write(done, eval_metrics, kind="eval")
            if at_ckpt or at_eval:
                self.save({"mIoU": float(eval_metrics["mIoU"])} if eval_metrics else None)
        bar.close()
        self.writer.close()
        return last

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
