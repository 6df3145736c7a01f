"""The frozen VFM forward, and forward + backward to a trainable term added to the patch tokens
after every block, as a per-block adapter takes it (SPEC section 4's measurement)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from bench.flops import vit_flops
from bench.program import FROZEN, REPLICATED, Context, Program
from spectralmoe_jax.models.attention import resolve_implementation


def vit_programs(ctx: Context, name: str, module, images, hook_params=None):
    """`name` for the forward of a frozen ViT, or (hook_params given) forward + backward."""
    graphdef, state = nnx.split(module)
    layers = tuple(i for i in ctx.model.config.feature_layers if i < module.config.depth)

    def forward(state, images):
        return nnx.merge(graphdef, state)(images).layers[jnp.asarray(layers)]

    def loss(hook_params, state, images):
        def hook(index, tokens):
            return tokens + hook_params[index], None

        out = nnx.merge(graphdef, state)(images, hook=hook)
        return sum(jnp.mean(jnp.square(out.layers[i])) for i in layers)

    backward = hook_params is not None
    analytic = vit_flops(module.config, images.shape[0], images.shape[1:3], backward=backward)
    info = dict(tokens=analytic["tokens"],
                attention=resolve_implementation(module.config.attention, module.config.dtype))
    if backward:
        return Program(name, jax.grad(loss), (hook_params, state, images),
                       layout=(REPLICATED, FROZEN, 0), images=images.shape[0],
                       flops_analytic=analytic["total"], info=info)
    return Program(name, forward, (state, images), layout=(FROZEN, 0), images=images.shape[0],
                   flops_analytic=analytic["total"], info=info)


def programs(ctx: Context):
    vfm = ctx.model.vfm
    images = ctx.array(jax.random.key(3), (ctx.batch, ctx.size, ctx.size, vfm.config.in_channels))
    yield vit_programs(ctx, "vfm_forward", vfm, images)
    hook_params = ctx.array(jax.random.key(4), (vfm.config.depth, 1, 1, vfm.config.width))
    yield vit_programs(ctx, "vfm_forward_backward", vfm, images, hook_params)
