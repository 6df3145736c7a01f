"""AdamW with the released parameter-wise weight decay and the poly schedule (SPEC section 2).

The released MMSegmentation configs set `weight_decay=0.05` and turn decay off (`decay_mult=0`)
for every parameter whose name contains one of a few keys: norms, the query and level
embeddings, the adapter's tokens, gates and scale. We express the same rule as a mask over
parameter paths; the keys live in the config (`train.no_decay_keys`).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import optax


def poly_schedule(base_lr: float, num_steps: int, power: float = 0.9, end_lr: float = 0.0,
                  warmup_steps: int = 0) -> optax.Schedule:
    """mmengine PolyLR: lr = (base - end) * (1 - t / T) ** power + end, with optional linear warm-up."""
    decay = optax.polynomial_schedule(
        init_value=base_lr, end_value=end_lr, power=power,
        transition_steps=max(num_steps - warmup_steps, 1))
    if warmup_steps <= 0:
        return decay
    warmup = optax.linear_schedule(0.0, base_lr, warmup_steps)
    return optax.join_schedules([warmup, decay], [warmup_steps])


def path_name(path) -> str:
    """A pytree path as 'a/b/c', the form the decay keys are matched against."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def decay_mask(params, no_decay_keys: Sequence[str]):
    """True where weight decay applies: every parameter whose path holds none of the keys."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(key in path_name(path) for key in no_decay_keys), params)


def make_optimizer(train_config, params) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The released optimiser for `params` (the trainable state): AdamW, poly decay, clipping."""
    schedule = poly_schedule(
        train_config.learning_rate, train_config.num_steps, train_config.poly_power,
        train_config.end_learning_rate, train_config.warmup_steps)
    chain = []
    if train_config.clip_grad_norm:
        chain.append(optax.clip_by_global_norm(train_config.clip_grad_norm))
    chain.append(optax.adamw(
        schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=train_config.weight_decay,
        mask=decay_mask(params, train_config.no_decay_keys)))
    tx = optax.chain(*chain)
    accumulate = train_config.grad_accum_steps
    if accumulate > 1:
        # The released effective batch is 2 GPUs x 4; MultiSteps reproduces it on one small card
        # by averaging `accumulate` micro-batch gradients before each AdamW update.
        tx = optax.MultiSteps(tx, every_k_schedule=accumulate)
    return tx, schedule
