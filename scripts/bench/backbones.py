"""Each ViT-L preset's forward alone (SPEC section 4's reference, one H100, bf16, batch 8,
512x512: PyTorch 14.1 ms, JAX with cuDNN attention on padded tokens 14.2 ms, XLA 30.4 ms).

Weights are random (timing does not depend on them). DOFA gets 32 bands (WHU-OHS wavelengths).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench.flops import vit_flops
from bench.program import FROZEN, Context, Program
from spectralmoe_jax.models.vit import VisionTransformer, vit_config

PRESETS = ("dinov3_vitl16", "dinov2_vitl14", "dofa_vitl16")
DECODER_LAYERS = (7, 11, 15, 23)  # the blocks the Mask2Former pyramid takes


def programs(ctx: Context):
    attention = ctx.model.vfm.config.attention
    for name in ctx.options.backbones or PRESETS:
        config = vit_config(name, dtype=str(ctx.dtype), attention=attention)
        channels, wavelengths = config.in_channels, None
        if config.family == "dofa":
            channels = 32
            wavelengths = jnp.asarray(np.linspace(0.466, 0.940, channels, dtype=np.float32))
        graphdef, state = nnx.split(ctx.build(lambda: VisionTransformer(config,
                                                                        rngs=nnx.Rngs(0))))
        images = ctx.array(jax.random.key(1), (ctx.batch, ctx.size, ctx.size, channels))

        def forward(state, images, graphdef=graphdef, wavelengths=wavelengths):
            out = nnx.merge(graphdef, state)(images, wavelengths=wavelengths)
            layers = [i for i in DECODER_LAYERS if i < out.layers.shape[0]]
            return out.layers[jnp.asarray(layers)], out.normed

        analytic = vit_flops(config, ctx.batch, (ctx.size, ctx.size), backward=False)
        yield Program(f"backbone_{name}_forward", forward, (state, images), layout=(FROZEN, 0),
                      images=ctx.batch, flops_analytic=analytic["total"],
                      info=dict(tokens=analytic["tokens"]))
