"""Bilinear point sampling of mask maps, as Mask2Former's losses use it.

PointRend's `point_sample` (detectron2, mmcv; HF `sample_point`) is
`F.grid_sample(maps, 2 * coords - 1, align_corners=False)` with zero padding: point coordinates
are (x, y) in [0, 1] over the whole map, whatever its resolution, so predictions at H/4 and
targets at H share one set of points.
"""
import jax
import jax.numpy as jnp


def point_sample(maps: jax.Array, coords: jax.Array) -> jax.Array:
    """Samples `maps [..., h, w]` at `coords [P, 2]` ((x, y) in [0, 1]) -> float32 `[..., P]`.

    Bilinear interpolation as `grid_sample(align_corners=False, padding_mode="zeros")`: corners
    outside the map contribute zero. Boolean or integer maps (target masks) are gathered first and
    cast after, so a `[K, H, W]` bool mask is never materialised in float.
    """
    if coords.ndim != 2 or coords.shape[-1] != 2:
        raise ValueError(f"point_sample: coords must be [P, 2], got {coords.shape}")
    h, w = maps.shape[-2:]
    coords = coords.astype(jnp.float32)
    # grid_sample's un-normalisation of grid = 2c - 1 for align_corners=False, written with the
    # same float operations so that sampled positions agree bitwise with PyTorch's.
    grid = 2.0 * coords - 1.0
    x = (grid[:, 0] + 1.0) * (w / 2.0) - 0.5
    y = (grid[:, 1] + 1.0) * (h / 2.0) - 0.5
    x0, y0 = jnp.floor(x), jnp.floor(y)
    wx1, wy1 = x - x0, y - y0
    wx0, wy0 = 1.0 - wx1, 1.0 - wy1
    x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
    flat = maps.reshape(*maps.shape[:-2], h * w)

    def corner(xi, yi, weight):
        inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
        index = jnp.clip(yi, 0, h - 1) * w + jnp.clip(xi, 0, w - 1)
        values = jnp.take(flat, index, axis=-1, mode="clip").astype(jnp.float32)
        return values * jnp.where(inside, weight, 0.0)

    return (corner(x0, y0, wx0 * wy0) + corner(x0 + 1, y0, wx1 * wy0)
            + corner(x0, y0 + 1, wx0 * wy1) + corner(x0 + 1, y0 + 1, wx1 * wy1))
