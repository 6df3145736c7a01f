"""The whole jitted train step (training/train_state.py) as the trainer runs it: state donated
and replicated, frozen weights replicated or FSDP-sharded, the batch split over 'data'."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bench.flops import vit_flops
from bench.program import FROZEN, REPLICATED, Context, Program
from spectralmoe_jax.models.segmentor import split_model
from spectralmoe_jax.training.optimizer import make_optimizer
from spectralmoe_jax.training.train_state import init_train_state, make_train_step


def train_step(ctx: Context, batch_size: int, name: str = "train_step", *,
               timed: bool = True) -> Program:
    graphdef, params, frozen, stats = split_model(ctx.model)
    tx = make_optimizer(ctx.config.train, params)[0]
    init = lambda p, s: init_train_state(p, tx, ctx.config.seed, s)  # noqa: E731
    # A copy: the step donates its state, and the model's own arrays serve the other parts.
    state = (jax.eval_shape(init, params, stats) if ctx.abstract
             else init(*jax.tree.map(jnp.copy, (params, stats))))
    step = make_train_step(graphdef, tx, num_classes=ctx.config.data.num_classes,
                           loss_config=ctx.config.loss, ignore_index=ctx.config.data.ignore_index)
    model = ctx.model
    batch = {"image": ctx.array(jax.random.key(18), (batch_size, ctx.size, ctx.size,
                                                      model.vfm.config.in_channels)),
             "label": ctx.labels(jax.random.key(19), batch_size, ctx.size)}
    hw = (ctx.size, ctx.size)
    info = dict(batch=batch_size, flops_analytic_vfm_forward_backward=vit_flops(
        model.vfm.config, batch_size, hw, backward=True)["total"])
    if model.depth is not None:
        info["flops_analytic_depth_forward"] = vit_flops(model.depth.config, batch_size, hw,
                                                         backward=False)["total"]
    return Program(name, step, (state, frozen, batch),
                   layout=(REPLICATED, FROZEN, 0), donate=(0,), carry=True,
                   replicated_outputs=True, images=batch_size, timed=timed, info=info)


def programs(ctx: Context):
    yield train_step(ctx, ctx.batch)


def fit_programs(ctx: Context):
    """Compile only: the step at --fit-batch (16), for its memory."""
    batch = ctx.options.fit_batch
    yield train_step(ctx, batch, f"train_step_fit_batch{batch}", timed=False)
