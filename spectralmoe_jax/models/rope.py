"""Axial 2-D rotary position embeddings, evaluation mode: DINOv3's and EVA02's.

'dinov3', as facebookresearch/dinov3 `layers/rope_position_encoding.py` (normalize_coords=
'separate') and HF `DINOv3ViTRopePositionEmbedding`: patch-centre coordinates normalised to
[-1, 1] per axis, periods base^(4j / Dh) for j < Dh/4, angles 2 pi coord / period for (y, x) laid
out as [y freqs, x freqs] and tiled twice, rotated in halves; no coordinate shift, jitter or
rescale (those are training augmentations).

'eva', as EVA02's `VisionRotaryEmbeddingFast` (the released SpectralMoE `eva_02.py`) and timm's
`RotaryEmbeddingCat` (ref_feat_shape): coordinates are the patch indices scaled to the
pretraining grid, t = i / n * n_ref, frequencies theta^(-j / (Dh/4)) for j < Dh/4, each repeated
twice ([f0, f0, f1, f1, ...]), [y half | x half], rotated in interleaved pairs.

Everything is evaluated in float32, and rotation is applied to patch tokens only.
"""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp


def rope_periods(head_dim: int, base: float = 100.0) -> np.ndarray:
    """[Dh / 4] float32 periods; the `rope_embed.periods` buffer of the original."""
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head dimension divisible by 4, got {head_dim}")
    exponents = 2 * np.arange(head_dim // 4, dtype=np.float32) / np.float32(head_dim // 2)
    return (np.float32(base) ** exponents).astype(np.float32)


def rope_sincos(grid: tuple[int, int], head_dim: int, base: float = 100.0):
    """(sin, cos), each [h * w, Dh] float32, for a row-major h x w patch grid."""
    h, w = grid
    coords_h = np.arange(0.5, h, dtype=np.float32) / np.float32(h)
    coords_w = np.arange(0.5, w, dtype=np.float32) / np.float32(w)
    coords = np.stack(np.meshgrid(coords_h, coords_w, indexing="ij"), axis=-1).reshape(-1, 2)
    coords = np.float32(2.0) * coords - np.float32(1.0)
    angles = np.float32(2 * np.pi) * coords[:, :, None] / rope_periods(head_dim, base)
    angles = np.tile(angles.reshape(h * w, -1), (1, 2))  # [y..., x..., y..., x...]
    return np.sin(angles), np.cos(angles)


def eva_rope_sincos(grid: tuple[int, int], head_dim: int, theta: float = 10000.0,
                    ref_grid: tuple[int, int] | None = None):
    """(sin, cos), each [h * w, Dh] float32, of EVA02's rotary embedding on an h x w grid."""
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head dimension divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    bands = (np.float32(1.0) / np.float32(theta) ** (
        np.arange(quarter, dtype=np.float32) / np.float32(quarter))).astype(np.float32)
    ref_grid = ref_grid or grid

    def axis(n, ref):  # [n, Dh / 2]: t * bands, every frequency twice
        t = np.arange(n, dtype=np.float32) / np.float32(n) * np.float32(ref)
        return np.repeat(t[:, None] * bands[None, :], 2, axis=1)

    h, w = grid
    rows = np.broadcast_to(axis(h, ref_grid[0])[:, None, :], (h, w, 2 * quarter))
    cols = np.broadcast_to(axis(w, ref_grid[1])[None, :, :], (h, w, 2 * quarter))
    angles = np.concatenate([rows, cols], axis=-1).reshape(h * w, head_dim)
    return np.sin(angles), np.cos(angles)


def _rotate_half(x):
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def _rotate_pairs(x):
    """[x0, x1, x2, x3, ...] -> [-x1, x0, -x3, x2, ...] (EVA / timm `rot`)."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    return jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)


def apply_rope(x, sin, cos, num_prefix: int, interleaved: bool = False):
    """Rotates the patch tokens of x [B, N, H, Dh]; the first `num_prefix` tokens pass unchanged.

    `interleaved` rotates pairs (EVA02) instead of halves (DINOv3). The rotation runs in float32
    (the originals cast q and k to the RoPE dtype, fp32).
    """
    prefix, patches = x[:, :num_prefix], x[:, num_prefix:].astype(jnp.float32)
    sin = jnp.asarray(sin)[None, :, None, :]
    cos = jnp.asarray(cos)[None, :, None, :]
    rotate = _rotate_pairs if interleaved else _rotate_half
    patches = patches * cos + rotate(patches) * sin
    return jnp.concatenate([prefix, patches.astype(x.dtype)], axis=1)
