"""Multi-scale deformable attention (Deformable DETR, Eq. 2) written for XLA.

The sampling is a gather of the four bilinear neighbours of every sampling point, with the
semantics of `F.grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False)` used by
HF's `multi_scale_deformable_attention` (and by mmcv's CUDA kernel): a location (x, y) in [0, 1]
sits at pixel coordinate (x W - 0.5, y H - 0.5) and neighbours outside the map contribute zero.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spectralmoe_jax.models.mask2former import initializers

Shapes = tuple[tuple[int, int], ...]  # (h, w) per level; a tuple: static and hashable


def _bilinear_taps(locations, attention_weights, spatial_shapes: Shapes):
    """Flat value indices and weights of the 4 neighbours of every point, for all levels.

    locations [..., L, P, 2] (x, y), attention_weights [..., L, P] ->
    indices int32 [..., L * P * 4] into the levels' concatenated tokens, weights [..., L * P * 4].
    """
    indices, weights = [], []
    start = 0
    for level, (height, width) in enumerate(spatial_shapes):
        x = locations[..., level, :, 0] * width - 0.5
        y = locations[..., level, :, 1] * height - 0.5
        x0, y0 = jnp.floor(x), jnp.floor(y)
        fx, fy = x - x0, y - y0
        for dy, wy in ((0, 1 - fy), (1, fy)):
            for dx, wx in ((0, 1 - fx), (1, fx)):
                xi, yi = x0 + dx, y0 + dy
                inside = (xi >= 0) & (xi <= width - 1) & (yi >= 0) & (yi <= height - 1)
                xi = jnp.clip(xi, 0, width - 1).astype(jnp.int32)
                yi = jnp.clip(yi, 0, height - 1).astype(jnp.int32)
                indices.append(start + yi * width + xi)
                weights.append(jnp.where(inside, wy * wx, 0.0) * attention_weights[..., level, :])
        start += height * width
    return jnp.concatenate(indices, axis=-1), jnp.concatenate(weights, axis=-1)


# Rematerialised: the backward pass recomputes the taps and the gather instead of keeping the
# [B, M, Nq, K, Dh] samples (K = 4 taps x levels x points = 48) of every encoder layer alive.
@functools.partial(jax.checkpoint, static_argnums=(1,))
def deformable_sample(value, spatial_shapes: Shapes, sampling_locations, attention_weights):
    """Attention-weighted bilinear samples of multi-level values.

    The computation of HF `multi_scale_deformable_attention` (and mmcv's kernel).

    value: [B, S, M, Dh], the levels' tokens concatenated (row-major per level), M heads.
    sampling_locations: [B, Nq, M, L, P, 2], (x, y) normalised to [0, 1] per level; any value is
      allowed (outside the map the zero padding applies).
    attention_weights: [B, Nq, M, L, P].
    Returns [B, Nq, M * Dh].
    """
    batch, num_tokens, heads, head_dim = value.shape
    if sum(h * w for h, w in spatial_shapes) != num_tokens:
        raise ValueError(
            f"spatial_shapes {tuple(spatial_shapes)} do not add up to {num_tokens} tokens"
        )
    num_queries = sampling_locations.shape[1]
    indices, weights = _bilinear_taps(
        sampling_locations.astype(jnp.float32),
        attention_weights.astype(jnp.float32),
        spatial_shapes,
    )
    # Heads first, so each (batch, head) gathers rows of its own [S, Dh] table.
    indices = jnp.moveaxis(indices, 2, 1)  # [B, M, Nq, K]
    weights = jnp.moveaxis(weights, 2, 1)  # [B, M, Nq, K]
    # Gather from a float32 table: the backward of the gather is a scatter-add into the table,
    # and in bfloat16 those (atomic, on GPU) adds are slow and round at every tap. The weighted
    # sum stays float32 and only its result returns to the compute dtype (float32: no change).
    table = jnp.moveaxis(value, 2, 1).astype(jnp.float32)  # [B, M, S, Dh]
    gathered = jax.vmap(jax.vmap(lambda rows, idx: rows[idx]))(table, indices)  # [B, M, Nq, K, Dh]
    # Multiply-and-sum (not a dot) so XLA fuses the gather into the reduction.
    out = jnp.sum(gathered * weights[..., None], axis=3).astype(value.dtype)  # [B, M, Nq, Dh]
    return jnp.moveaxis(out, 1, 2).reshape(batch, num_queries, heads * head_dim)


def _sampling_offsets_bias(num_heads: int, num_levels: int, num_points: int):
    """Deformable DETR's initial offsets: head h looks along angle 2 pi h / M, point p at p + 1."""

    def init(key, shape, dtype=jnp.float32):
        del key
        thetas = np.arange(num_heads) * (2.0 * np.pi / num_heads)
        grid = np.stack([np.cos(thetas), np.sin(thetas)], -1)
        grid = grid / np.abs(grid).max(-1, keepdims=True)
        grid = grid[:, None, None, :] * np.arange(1, num_points + 1)[None, None, :, None]
        grid = np.broadcast_to(grid, (num_heads, num_levels, num_points, 2))
        return jnp.asarray(grid.reshape(shape), dtype)

    return init


class MultiScaleDeformableAttention(nnx.Module):
    """mmcv `MultiScaleDeformableAttention` / HF `...MultiscaleDeformableAttention`, no residual."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_levels: int,
        num_points: int,
        *,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.num_levels, self.num_points = num_heads, num_levels, num_points
        num_samples = num_heads * num_levels * num_points
        zeros = nnx.initializers.zeros
        self.sampling_offsets = nnx.Linear(
            dim,
            num_samples * 2,
            kernel_init=zeros,
            bias_init=_sampling_offsets_bias(num_heads, num_levels, num_points),
            dtype=dtype,
            rngs=rngs,
        )
        self.attention_weights = nnx.Linear(
            dim, num_samples, kernel_init=zeros, bias_init=zeros, dtype=dtype, rngs=rngs
        )
        projection = functools.partial(nnx.Linear, dim, dim, kernel_init=initializers.xavier_uniform,
                                       bias_init=zeros, dtype=dtype, rngs=rngs)
        self.value_proj = projection()
        self.output_proj = projection()

    def __call__(self, query, value, reference_points, spatial_shapes: Shapes):
        """query [B, Nq, D] (position already added), value [B, S, D],
        reference_points [Nq, 2] (x, y) in [0, 1], the same on every level -> [B, Nq, D]."""
        batch, num_queries, _ = query.shape
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        if len(spatial_shapes) != levels:
            raise ValueError(
                f"expected {levels} levels, got spatial_shapes {tuple(spatial_shapes)}"
            )
        value = self.value_proj(value)
        value = value.reshape(*value.shape[:2], heads, -1)
        # Locations and weights in float32: offsets are in pixels of maps up to 128 wide.
        offsets = self.sampling_offsets(query).astype(jnp.float32)
        offsets = offsets.reshape(batch, num_queries, heads, levels, points, 2)
        weights = self.attention_weights(query).astype(jnp.float32)
        weights = jax.nn.softmax(
            weights.reshape(batch, num_queries, heads, levels * points), axis=-1
        )
        weights = weights.reshape(batch, num_queries, heads, levels, points)
        normalizer = jnp.asarray([(w, h) for h, w in spatial_shapes], jnp.float32)  # [L, 2] (x, y)
        locations = (
            reference_points.astype(jnp.float32)[None, :, None, None, None, :]
            + offsets / normalizer[:, None, :]
        )
        return self.output_proj(deformable_sample(value, spatial_shapes, locations, weights))
