"""The train state and the pure, jitted training step.

`train_step(state, frozen, batch) -> (state, metrics)` is one XLA program: the forward of both
backbones, the adapter, the decoder, the Hungarian matching and the losses, the backward through
the trainable parameters only, and the AdamW update. Frozen weights are an argument, not part of
the state: they are never differentiated, never updated and carry no optimiser state. Variables
the forward updates (BatchNorm running statistics of a neck) travel in the state as `stats`.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from spectralmoe_jax.training.mask2former_loss import mask2former_loss, semantic_to_targets


@flax.struct.dataclass
class TrainState:
    step: jax.Array       # int32 scalar: optimiser micro-steps taken
    params: Any           # trainable parameters (nnx.State)
    opt_state: Any        # optax state of `params`
    rng: jax.Array        # base key; step keys are fold_in(rng, step), so a resume replays them
    stats: Any            # non-parameter variables the forward updates (nnx.State; often empty)


def tree_select(predicate: jax.Array, on_true, on_false):
    return jax.tree.map(lambda a, b: jnp.where(predicate, a, b), on_true, on_false)


def make_loss_fn(graphdef, *, num_classes: int, loss_config, ignore_index: int = 255):
    """(params, frozen, stats, batch, rng) -> (loss, (metrics, stats)): the objective of the
    step, and the non-parameter variables as the forward left them."""

    def loss_fn(params, frozen, stats, batch, rng):
        noise_rng, point_rng = jax.random.split(rng)
        # Fresh variables (copy): the forward updates the statistics inside this trace.
        model = nnx.merge(graphdef, params, frozen, stats, copy=True)
        outputs = model(batch["image"], train=True, rng=noise_rng)
        targets = semantic_to_targets(batch["label"], num_classes, ignore_index=ignore_index)
        decoder_loss, metrics = mask2former_loss(outputs, targets, point_rng, loss_config)
        # The adapter's balance term is already weighted per layer and averaged over layers.
        loss = decoder_loss + outputs["balance_loss"]
        # Per-layer terms are logged for the last decoder layer, the one used at inference.
        metrics = {k: v[-1] if v.ndim else v for k, v in metrics.items()}
        metrics = dict(metrics, loss=loss, decoder_loss=decoder_loss,
                       balance_loss=outputs["balance_loss"])
        return loss, (metrics, jax.lax.stop_gradient(nnx.state(model, nnx.Not(nnx.Param))))

    return loss_fn


def make_train_step(graphdef, tx: optax.GradientTransformation, *, num_classes: int,
                    loss_config, ignore_index: int = 255):
    """Builds the step for one model structure (`graphdef`) and optimiser."""
    loss_fn = make_loss_fn(graphdef, num_classes=num_classes, loss_config=loss_config,
                           ignore_index=ignore_index)

    def train_step(state: TrainState, frozen, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        (loss, (metrics, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, frozen, state.stats, batch, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # A non-finite loss must not poison the state: keep the old one; the loop stops on it.
        finite = jnp.isfinite(loss)
        metrics = dict(metrics, grad_norm=optax.global_norm(grads), finite=finite)
        new_state = state.replace(
            step=state.step + 1,
            params=tree_select(finite, params, state.params),
            opt_state=tree_select(finite, opt_state, state.opt_state),
            stats=tree_select(finite, stats, state.stats))
        return new_state, metrics

    return train_step


def init_train_state(params, tx: optax.GradientTransformation, seed: int,
                     stats=None) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(jax.random.key(seed)),
                      stats=nnx.State({}) if stats is None else stats)
