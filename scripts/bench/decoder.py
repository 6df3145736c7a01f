"""The Mask2Former head's two halves on the pyramid the segmentor hands them: the pixel decoder
(deformable-attention encoder) and the masked-attention transformer decoder, forward and forward
+ backward (to the parameters and the inputs: the adapter trains through the features)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from bench.program import REPLICATED, Context, Program

STRIDES = (4, 8, 16, 32)


def _sum_squares(tree):
    return sum(jnp.mean(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree))


def programs(ctx: Context):
    head = ctx.model.head
    width = ctx.model.vfm.config.width
    keys = jax.random.split(jax.random.key(9), len(STRIDES))
    # float32 maps at strides 4..32, as the segmentor's feature pyramid
    features = [ctx.array(k, (ctx.batch, ctx.size // s, ctx.size // s, width))
                for k, s in zip(keys, STRIDES)]

    pd_def, pd_params, pd_rest = nnx.split(head.pixel_decoder, nnx.Param, ...)

    def pixel(params, features):
        return nnx.merge(pd_def, params, pd_rest)(features)

    yield Program("pixel_decoder_forward", pixel, (pd_params, features),
                  layout=(REPLICATED, 0), images=ctx.batch)
    yield Program("pixel_decoder_forward_backward",
                  jax.grad(lambda p, f: _sum_squares(pixel(p, f)), argnums=(0, 1)),
                  (pd_params, features), layout=(REPLICATED, 0), images=ctx.batch)

    mask_features, multi_scale = jax.eval_shape(pixel, pd_params, features)
    mask_features = ctx.like(jax.random.key(10), mask_features)
    multi_scale = ctx.like(jax.random.key(11), multi_scale)
    c = head.config
    query = ctx.array(jax.random.key(12), (c.num_queries, c.hidden_dim))
    td_def, td_params, td_rest = nnx.split(head.transformer_decoder, nnx.Param, ...)

    def decoder(params, multi_scale, mask_features, query):
        return nnx.merge(td_def, params, td_rest)(multi_scale, mask_features, query)

    args = (td_params, multi_scale, mask_features, query)
    layout = (REPLICATED, 0, 0, REPLICATED)
    yield Program("transformer_decoder_forward", decoder, args, layout=layout, images=ctx.batch)
    yield Program("transformer_decoder_forward_backward",
                  jax.grad(lambda *a: _sum_squares(decoder(*a)), argnums=(0, 1, 2, 3)), args,
                  layout=layout, images=ctx.batch)
