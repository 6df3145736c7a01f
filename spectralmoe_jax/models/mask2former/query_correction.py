"""DepthForge's Dynamic Query Correction Module (anonymouse-xzrptkvyqc/DepthForge,
`depthforge/models/heads/depthforge_mask2former.py`, `DynamicQueryCorrectionModule`), the
released head's addition to the stride-4 feature map (`decoder.query_correction`).

  y_i  = bilinear(x_i, size of x_0)                     each pyramid level, align_corners=False
  y_i  = y_i sigmoid(conv1x1(relu(conv1x1(y_i))))       d -> d / 16 -> d: a per-pixel channel gate
  y_i  = y_i sigmoid(conv3x3(y_i))                      d -> 1, padding 1: a spatial gate
  x_0 += conv1x1(concat_channels(y_0 .. y_3))           4d -> d

One gate module serves all levels. PyTorch's default Conv2d init (weights and biases
U(+-1/sqrt(fan_in))); mmseg's head init leaves it alone. 4,336,705 parameters at d = 1024.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from spectralmoe_jax.models.mask2former import initializers

REDUCTION = 16


def _conv(d_in: int, d_out: int, kernel: int, dtype, rngs: nnx.Rngs) -> nnx.Conv:
    fan_in = d_in * kernel * kernel
    return nnx.Conv(d_in, d_out, (kernel, kernel), padding="SAME", dtype=dtype,
                    kernel_init=initializers.torch_linear, bias_init=initializers.torch_bias(fan_in),
                    rngs=rngs)


class QueryCorrection(nnx.Module):
    """features: NHWC maps at strides 4, 8, 16, 32 of `width` channels -> the correction of the
    stride-4 map."""

    def __init__(self, width: int, levels: int, *, dtype, rngs: nnx.Rngs):
        self.channel_reduce = _conv(width, width // REDUCTION, 1, dtype, rngs)
        self.channel_expand = _conv(width // REDUCTION, width, 1, dtype, rngs)
        self.spatial = _conv(width, 1, 3, dtype, rngs)
        self.fuse = _conv(levels * width, width, 1, dtype, rngs)
        self.dtype = dtype

    def gate(self, y: jax.Array) -> jax.Array:
        channel = jax.nn.sigmoid(self.channel_expand(jax.nn.relu(self.channel_reduce(y))))
        y = y * channel
        return y * jax.nn.sigmoid(self.spatial(y))

    def __call__(self, features: Sequence[jax.Array]) -> jax.Array:
        b, h, w, _ = features[0].shape
        # Up-sampling by whole factors: jax's 'linear' is torch's bilinear (half-pixel centres).
        resized = [f if f.shape[1:3] == (h, w) else
                   jax.image.resize(f, (b, h, w, f.shape[-1]), "linear", antialias=False)
                   for f in features]
        gated = [self.gate(y.astype(self.dtype)) for y in resized]
        return self.fuse(jnp.concatenate(gated, axis=-1))

