"""The SpectralMoE adapter: one layer next to one ViT block, forward and forward + backward
(issue 4: the adapter at most 15% of the block's time), and the VFM with the adapter after every
block, forward + backward to the adapter's parameters.

Both single layers are measured as they run in training: the frozen block's backward computes
only the input gradient; the adapter's backward its parameter gradients and its input gradient
(earlier adapters' updates flow through f_v).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from bench.program import FROZEN, REPLICATED, Context, Program
from spectralmoe_jax.models.spectral_moe import AdapterConfig, SpectralMoE
from spectralmoe_jax.models.vit import Block, vit_config


def layer_programs(ctx: Context, tokens: int, width: int, fusion: str):
    """One ViT-L-shaped block and one adapter layer at [batch, tokens, width]."""
    dtype = str(ctx.dtype)
    keys = jax.random.split(jax.random.key(0), 4)
    x = ctx.array(keys[0], (ctx.batch, tokens, width))  # the float32 residual stream
    f_d = ctx.array(keys[1], (ctx.batch, tokens, width), dtype)
    cotangent = ctx.array(keys[2], (ctx.batch, tokens, width))
    rng = jax.random.key(3)

    block_cfg = vit_config("dinov3_vitl16", width=width, num_heads=max(width // 64, 1),
                           mlp_dim=4 * width, depth=1, dtype=dtype)
    block_def, block_state = nnx.split(ctx.build(lambda: Block(block_cfg, rngs=nnx.Rngs(0))))
    adapter_def, adapter_state = nnx.split(ctx.build(
        lambda: SpectralMoE(AdapterConfig(width=width, fusion=fusion, dtype=dtype),
                            rngs=nnx.Rngs(1))))
    # Released init has zero B and gates; random values make routing and experts non-trivial.
    if not ctx.abstract:
        adapter_state = jax.tree.map(lambda v: 0.02 * v, ctx.like(jax.random.key(4),
                                                                   adapter_state))

    # Everything enters as an argument: closed-over arrays would be constant-folded by XLA.
    side = math.isqrt(tokens)  # the blocks run on a square patch grid, no prefix tokens

    def block(state, x):
        return nnx.merge(block_def, state)(x, None, 0, (side, tokens // side))

    def block_fwd_bwd(state, x, cotangent):
        y, vjp = jax.vjp(lambda x: block(state, x), x)  # frozen: input gradient only
        return y, vjp(cotangent)

    def adapter(state, x, f_d, rng):
        out, aux = nnx.merge(adapter_def, state)(jnp.int32(3), x, f_d, train=True, rng=rng)
        return out, aux["balance_loss"]

    def adapter_fwd_bwd(state, x, f_d, rng, cotangent):
        primal, vjp = jax.vjp(lambda state, x: adapter(state, x, f_d, rng), state, x)
        return primal, vjp((cotangent, jnp.ones((), jnp.float32)))

    info = dict(tokens=tokens, width=width, fusion=fusion)
    yield Program("block_forward", block, (block_state, x), layout=(FROZEN, 0), info=info)
    yield Program("block_forward_backward", block_fwd_bwd, (block_state, x, cotangent),
                  layout=(FROZEN, 0, 0), info=info)
    yield Program("adapter_layer_forward", adapter, (adapter_state, x, f_d, rng),
                  layout=(REPLICATED, 0, 0, REPLICATED), info=info)
    yield Program("adapter_layer_forward_backward", adapter_fwd_bwd,
                  (adapter_state, x, f_d, rng, cotangent),
                  layout=(REPLICATED, 0, 0, REPLICATED, 0), info=info)


def programs(ctx: Context):
    model = ctx.model
    if model.adapter is None:
        print("  adapter: no adapter in this config")
        return
    vfm, adapter = model.vfm, model.adapter
    grid = ctx.size // vfm.config.patch_size
    tokens = grid * grid
    yield from layer_programs(ctx, tokens, vfm.config.width, adapter.config.fusion)

    graphdef, params, rest = nnx.split(model, nnx.All(nnx.Param, nnx.PathContains("adapter")),
                                       ...)
    images = ctx.array(jax.random.key(6), (ctx.batch, ctx.size, ctx.size, vfm.config.in_channels))
    # The depth tokens as the segmentor passes them: float32, every layer.
    depth = ctx.array(jax.random.key(7), (vfm.config.depth, ctx.batch, tokens, vfm.config.width))
    layers = tuple(ctx.model.config.feature_layers)

    def loss(params, rest, images, depth, rng):
        m = nnx.merge(graphdef, params, rest)

        def hook(index, patch_tokens):
            return m.adapter(index, patch_tokens, depth[index], train=True,
                             rng=jax.random.fold_in(rng, index))

        out = m.vfm(images, hook=hook)
        features = sum(jnp.mean(jnp.square(out.layers[i])) for i in layers)
        return features + jnp.mean(out.hook_aux["balance_loss"])

    yield Program("vfm_adapter_forward_backward", jax.grad(loss),
                  (params, rest, images, depth, jax.random.key(8)),
                  layout=(REPLICATED, FROZEN, 0, 1, REPLICATED), images=ctx.batch)
