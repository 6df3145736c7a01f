"""Normalised sine position encoding of a feature map (DETR; mmdet `SinePositionalEncoding`,
HF `Mask2FormerSinePositionEmbedding` with `normalize=True`)."""

import math

import jax.numpy as jnp


def sine_position_encoding(
    height: int,
    width: int,
    num_feats: int,
    *,
    temperature: float = 10000.0,
    scale: float = 2 * math.pi,
    eps: float = 1e-6,
) -> jnp.ndarray:
    """Returns [height, width, 2 * num_feats]: y features then x features.

    Row/column indices 1..n are normalised to (0, scale] by the last index (+eps) and divided by
    temperature^(2 floor(i / 2) / num_feats); even channels take the sine, odd ones the cosine.
    The map has no padding, so the encoding depends on the shape only (a compile-time constant).
    """
    y = jnp.arange(1, height + 1, dtype=jnp.float32)
    x = jnp.arange(1, width + 1, dtype=jnp.float32)
    y = y / (y[-1] + eps) * scale
    x = x / (x[-1] + eps) * scale
    exponent = 2 * (jnp.arange(num_feats) // 2).astype(jnp.float32) / num_feats
    dim_t = jnp.float32(temperature) ** exponent

    def encode(positions):  # [n] -> [n, num_feats], channels interleaved sin, cos, sin, ...
        angles = positions[:, None] / dim_t
        return jnp.stack([jnp.sin(angles[:, 0::2]), jnp.cos(angles[:, 1::2])], axis=-1).reshape(
            len(positions), num_feats
        )

    pos_y = jnp.broadcast_to(encode(y)[:, None, :], (height, width, num_feats))
    pos_x = jnp.broadcast_to(encode(x)[None, :, :], (height, width, num_feats))
    return jnp.concatenate([pos_y, pos_x], axis=-1)
