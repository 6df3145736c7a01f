"""The depth encoder as the segmentor runs it: band selection, all blocks, the token grid resized
to the VFM's where the patch sizes differ, no gradient."""

from __future__ import annotations

import jax
from flax import nnx

from bench.flops import vit_flops
from bench.program import FROZEN, Context, Program


def programs(ctx: Context):
    model = ctx.model
    if model.depth is None:
        print("  depth: no depth encoder in this config")
        return
    images = ctx.array(jax.random.key(5), (ctx.batch, ctx.size, ctx.size,
                                           model.vfm.config.in_channels))
    graphdef, state = nnx.split(model)
    grid = (ctx.size // model.vfm.config.patch_size,) * 2

    def forward(state, images):
        return nnx.merge(graphdef, state).depth_features(images, grid)

    analytic = vit_flops(model.depth.config, ctx.batch, (ctx.size, ctx.size), backward=False)
    yield Program("depth_forward", forward, (state, images), layout=(FROZEN, 0),
                  images=ctx.batch, flops_analytic=analytic["total"],
                  info=dict(tokens=analytic["tokens"], patch_size=model.depth.config.patch_size))
