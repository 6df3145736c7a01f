"""The evaluation runner's compiled inference (config.eval: whole image) on a batch."""

from __future__ import annotations

import jax
from flax import nnx

from bench.program import FROZEN, Context, Program
from spectralmoe_jax.evaluation.runner import make_model_infer, patch_multiple


def programs(ctx: Context):
    graphdef, state = nnx.split(ctx.model)
    batch = ctx.options.eval_batch or ctx.batch
    images = ctx.array(jax.random.key(20), (batch, ctx.size, ctx.size,
                                            ctx.model.vfm.config.in_channels))
    infer = make_model_infer(graphdef, ctx.config.eval, patch_multiple(ctx.model))
    yield Program("eval_forward", infer, (state, images), layout=(FROZEN, 0), images=batch,
                  info=dict(batch=batch))
