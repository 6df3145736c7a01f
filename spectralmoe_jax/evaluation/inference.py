"""Whole-image and sliding-window inference over any `predict_fn(images) -> scores`.

`predict_fn` maps normalised images [B, h, w, C] float32 to class scores [B, h, w, K] at the
same resolution (logits, or Mask2Former's semantic scores). Sliding windows follow mmseg's
`EncoderDecoder.slide_inference` (REIN: window 512, stride 341): a regular grid with the last
window flush with the border, windows shrunk to the image where it is smaller, overlapping
scores averaged. `blend="hann"` instead weights each window by a 2-D Hann window, so that scores
fade out towards window edges (where a network sees least context) and the result has no seams.

All functions here are traceable: jit them with the geometry static, e.g.
`jax.jit(functools.partial(slide_inference, predict_fn, window=512, stride=341))`.
"""

from __future__ import annotations

import functools
from typing import Callable

import einops
import jax
import jax.numpy as jnp
import numpy as np

PredictFn = Callable[[jax.Array], jax.Array]
BLENDS = ("mean", "hann")


def _pair(value) -> tuple[int, int]:
    return (int(value), int(value)) if np.isscalar(value) else (int(value[0]), int(value[1]))


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Window offsets along one axis, as mmseg: every `stride`, the last flush with the end.

    `window` is first shrunk to `size`; every pixel is covered when `stride <= window`.
    """
    if not 0 < stride:
        raise ValueError(f"stride must be positive, got {stride}")
    window = min(window, size)
    if stride > window and size > window:
        raise ValueError(f"stride {stride} > window {window} would leave pixels uncovered")
    grids = max(size - window + stride - 1, 0) // stride + 1
    return [min(i * stride, size - window) for i in range(grids)]


def window_weights(height: int, width: int, blend: str = "hann") -> np.ndarray:
    """float32 [height, width] blending weights of one window.

    'hann': sin^2(pi (i + 1/2) / n) per axis, a Hann window sampled at pixel centres: smooth,
    largest in the middle and strictly positive, so a pixel seen by a single window (at the
    image border) keeps its scores. 'mean': ones (mmseg's plain average).
    """
    if blend not in BLENDS:
        raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")
    if blend == "mean":
        return np.ones((height, width), np.float32)
    wy = np.sin(np.pi * (np.arange(height) + 0.5) / height) ** 2
    wx = np.sin(np.pi * (np.arange(width) + 0.5) / width) ** 2
    return np.outer(wy, wx).astype(np.float32)


def pad_to_multiple(images: jax.Array, multiple: int, mode: str = "constant") -> jax.Array:
    """Pads [B, H, W, C] at the bottom and right to multiples of `multiple`.

    'constant' pads zeros, i.e. the dataset mean of normalised images (as mmseg's
    data preprocessor); 'reflect' and 'edge' are jnp.pad modes.
    """
    _, h, w, _ = images.shape
    pad_h, pad_w = -h % multiple, -w % multiple
    if pad_h == 0 and pad_w == 0:
        return images
    return jnp.pad(images, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode=mode)


def whole_inference(predict_fn: PredictFn, images: jax.Array, *, patch_multiple: int = 1,
                    flip: bool = False, pad_mode: str = "constant") -> jax.Array:
    """Scores [B, H, W, K] of whole images: padded to `patch_multiple`, cropped back.

    flip=True averages with the horizontally flipped image's scores, flipped back:
    (f(x) + flip(f(flip(x)))) / 2, each f padding its own input; both go in one call of 2B.
    """
    b, h, w, _ = images.shape

    def predict(x):
        padded = pad_to_multiple(x, patch_multiple, pad_mode)
        scores = predict_fn(padded)
        if scores.ndim != 4 or scores.shape[:3] != padded.shape[:3]:
            raise ValueError(f"predict_fn must return scores [B, h, w, K] at its input's "
                             f"resolution: input {padded.shape}, scores {scores.shape}")
        return scores[:, :h, :w]

    if not flip:
        return predict(images)
    scores = predict(jnp.concatenate([images, images[:, :, ::-1]]))
    return 0.5 * (scores[:b] + scores[b:, :, ::-1])


def slide_inference(predict_fn: PredictFn, images: jax.Array, *, window=512, stride=341,
                    blend: str = "mean", batch_size: int = 4, patch_multiple: int = 1,
                    flip: bool = False, pad_mode: str = "constant") -> jax.Array:
    """Scores [B, H, W, K] from overlapping windows, blended (mmseg `slide_inference`).

    All windows of all images go through `predict_fn` in batches of `batch_size` windows (one
    traced call under `lax.map`); each window is handled as by `whole_inference`.
    """
    b, h, w, c = images.shape
    (win_h, win_w), (stride_h, stride_w) = _pair(window), _pair(stride)
    win_h, win_w = min(win_h, h), min(win_w, w)
    ys = window_starts(h, win_h, stride_h)
    xs = window_starts(w, win_w, stride_w)
    offsets = [(y, x) for y in ys for x in xs]

    crops = jnp.stack([images[:, y:y + win_h, x:x + win_w] for y, x in offsets])
    crops = einops.rearrange(crops, "n b h w c -> (n b) h w c")
    count = crops.shape[0]
    padded_count = -(-count // batch_size) * batch_size
    crops = jnp.pad(crops, ((0, padded_count - count), (0, 0), (0, 0), (0, 0)))
    crops = einops.rearrange(crops, "(m s) h w c -> m s h w c", s=batch_size)

    def predict(chunk):
        return whole_inference(predict_fn, chunk, patch_multiple=patch_multiple, flip=flip,
                               pad_mode=pad_mode)

    scores = jax.lax.map(predict, crops)
    scores = einops.rearrange(scores, "m s h w k -> (m s) h w k")[:count]
    scores = einops.rearrange(scores, "(n b) h w k -> n b h w k", b=b)

    weights = window_weights(win_h, win_w, blend)
    total = np.zeros((h, w), np.float32)  # static: the sum of weights over windows
    out = jnp.zeros((b, h, w, scores.shape[-1]), scores.dtype)
    for i, (y, x) in enumerate(offsets):
        out = out.at[:, y:y + win_h, x:x + win_w].add(scores[i] * weights[:, :, None])
        total[y:y + win_h, x:x + win_w] += weights
    return out / total[:, :, None]


def make_infer_fn(predict_fn: PredictFn, *, mode: str = "whole", window=512, stride=341,
                  blend: str = "mean", batch_size: int = 4, patch_multiple: int = 1,
                  flip: bool = False) -> PredictFn:
    """The jitted `images -> scores` of `config.eval`: mode 'whole' or 'slide'."""
    if mode == "whole":
        fn = functools.partial(whole_inference, predict_fn, patch_multiple=patch_multiple,
                               flip=flip)
    elif mode == "slide":
        fn = functools.partial(slide_inference, predict_fn, window=window, stride=stride,
                               blend=blend, batch_size=batch_size,
                               patch_multiple=patch_multiple, flip=flip)
    else:
        raise ValueError(f"inference mode must be 'whole' or 'slide', got {mode!r}")
    return jax.jit(fn)
