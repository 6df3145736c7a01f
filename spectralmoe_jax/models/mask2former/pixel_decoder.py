"""Multi-scale deformable-attention pixel decoder (mmdet `MSDeformAttnPixelDecoder`,
HF `Mask2FormerPixelDecoder`).

The coarsest `num_feature_levels` inputs (strides 32, 16, 8) are projected, flattened and refined
together by deformable-attention encoder layers; the finer inputs (stride 4) are merged FPN-style,
and the finest map gives the mask features. Level order: index 0 is the coarsest level in the
encoder, its projections and level embeddings, and in the returned multi-scale features.
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from spectralmoe_jax.models.mask2former.initializers import caffe2_xavier, embedding, xavier_uniform
from spectralmoe_jax.models.mask2former.config import Mask2FormerConfig
from spectralmoe_jax.models.mask2former.layers import FFN, ConvNorm, layer_norm, resize_bilinear
from spectralmoe_jax.models.mask2former.ms_deform_attn import MultiScaleDeformableAttention
from spectralmoe_jax.models.mask2former.position_encoding import sine_position_encoding
from spectralmoe_jax.models.stacking import stacked


def reference_points(spatial_shapes: Sequence[tuple[int, int]]) -> jnp.ndarray:
    """Pixel centres of every level, (x, y) normalised to (0, 1): [sum h w, 2]."""
    points = []
    for height, width in spatial_shapes:
        y, x = jnp.meshgrid(
            (jnp.arange(height, dtype=jnp.float32) + 0.5) / height,
            (jnp.arange(width, dtype=jnp.float32) + 0.5) / width,
            indexing="ij",
        )
        points.append(jnp.stack([x.reshape(-1), y.reshape(-1)], axis=-1))
    return jnp.concatenate(points, axis=0)


class DeformableEncoderLayer(nnx.Module):
    """Post-norm layer: x = LN(x + MSDeformAttn(x + pos, x)); x = LN(x + FFN(x))."""

    def __init__(self, config: Mask2FormerConfig, *, rngs: nnx.Rngs):
        c, dt = config, config.dtype
        self.attn = MultiScaleDeformableAttention(
            c.hidden_dim,
            c.encoder_heads,
            c.num_feature_levels,
            c.encoder_points,
            dtype=dt,
            rngs=rngs,
        )
        self.attn_norm = layer_norm(c.hidden_dim, dtype=dt, rngs=rngs)
        self.ffn = FFN(c.hidden_dim, c.encoder_ffn_dim, dtype=dt, rngs=rngs)
        self.ffn_norm = layer_norm(c.hidden_dim, dtype=dt, rngs=rngs)

    def __call__(self, x, pos, points, spatial_shapes):
        x = self.attn_norm(x + self.attn(x + pos, x, points, spatial_shapes))
        return self.ffn_norm(x + self.ffn(x))


class PixelDecoder(nnx.Module):
    """features (NHWC, fine to coarse) -> (mask_features [B, H/4, W/4, D], multi-scale features
    [coarse to fine] each [B, h, w, D])."""

    def __init__(self, config: Mask2FormerConfig, *, rngs: nnx.Rngs):
        c, d, dt = config, config.hidden_dim, config.dtype
        self.config = config
        num_fpn = len(c.in_channels) - c.num_feature_levels
        conv_norm = functools.partial(ConvNorm, num_groups=c.num_groups, dtype=dt, rngs=rngs)
        self.input_projs = nnx.List(
            [
                conv_norm(ch, d, 1, use_bias=True, relu=False, kernel_init=xavier_uniform)
                for ch in c.in_channels[::-1][: c.num_feature_levels]
            ]
        )
        self.level_embed = nnx.Param(embedding(rngs.params(), (c.num_feature_levels, d)))
        # Every parameter has a leading [encoder_layers] axis: the layers run as one scan.
        self.encoder_layers = stacked(lambda rngs: DeformableEncoderLayer(c, rngs=rngs),
                                      c.encoder_layers, rngs)
        # Indexed like the inputs: lateral_convs[0] and output_convs[0] take the stride-4 map.
        self.lateral_convs = nnx.List(
            [
                conv_norm(ch, d, 1, use_bias=False, relu=False, kernel_init=caffe2_xavier)
                for ch in c.in_channels[:num_fpn]
            ]
        )
        self.output_convs = nnx.List(
            [
                conv_norm(d, d, 3, use_bias=False, relu=True, kernel_init=caffe2_xavier)
                for _ in range(num_fpn)
            ]
        )
        self.mask_proj = nnx.Conv(
            d,
            d,
            (1, 1),
            kernel_init=caffe2_xavier,
            bias_init=nnx.initializers.zeros,
            dtype=dt,
            rngs=rngs,
        )

    def _check(self, features):
        expected = self.config.in_channels
        got = tuple(f.shape[-1] for f in features)
        if len(features) != len(expected) or got != tuple(expected):
            raise ValueError(
                f"pixel decoder expects {len(expected)} NHWC maps with channels {tuple(expected)}, "
                f"got shapes {[tuple(f.shape) for f in features]}"
            )

    def __call__(self, features: Sequence[jax.Array]):
        self._check(features)
        c, d = self.config, self.config.hidden_dim
        batch = features[0].shape[0]
        coarse = list(features[::-1][: c.num_feature_levels])
        shapes = tuple((f.shape[1], f.shape[2]) for f in coarse)

        tokens, pos = [], []
        for level, (feature, proj) in enumerate(zip(coarse, self.input_projs)):
            h, w = shapes[level]
            tokens.append(proj(feature).reshape(batch, h * w, d))
            level_pos = sine_position_encoding(h, w, d // 2) + self.level_embed[level]
            pos.append(level_pos.reshape(h * w, d))
        x = jnp.concatenate(tokens, axis=1)
        pos = jnp.concatenate(pos, axis=0).astype(x.dtype)[None]
        points = reference_points(shapes)
        graphdef, layer_state = nnx.split(self.encoder_layers)

        def body(x, state):
            return nnx.merge(graphdef, state)(x, pos, points, shapes), None

        x, _ = jax.lax.scan(body, x, layer_state)

        outs, start = [], 0
        for h, w in shapes:
            outs.append(x[:, start : start + h * w].reshape(batch, h, w, d))
            start += h * w
        y = outs[-1]
        for i in reversed(range(len(self.lateral_convs))):  # FPN: coarse to fine
            lateral = self.lateral_convs[i](features[i])
            y = self.output_convs[i](
                lateral + resize_bilinear(y, lateral.shape).astype(lateral.dtype)
            )
        return self.mask_proj(y), outs
