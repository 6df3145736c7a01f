"""The AdamW update of the trainable parameters (adapter and decoder), memory bound."""

from __future__ import annotations

import jax
import numpy as np
import optax

from bench.program import REPLICATED, Context, Program
from spectralmoe_jax.models.segmentor import split_model
from spectralmoe_jax.training.optimizer import make_optimizer


def programs(ctx: Context):
    _, params, _, _ = split_model(ctx.model)
    tx = make_optimizer(ctx.config.train, params)[0]
    opt_state = jax.eval_shape(tx.init, params) if ctx.abstract else tx.init(params)
    grads = ctx.like(jax.random.key(17), params)

    def update(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    count = int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
    yield Program("optimizer_update", update, (params, opt_state, grads),
                  layout=(REPLICATED,) * 3, info=dict(trainable_parameters=count))
