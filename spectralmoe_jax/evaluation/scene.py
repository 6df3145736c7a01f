"""Whole-scene prediction: a GeoTIFF of any size -> a Cloud-Optimised GeoTIFF of labels.

The scene is read in rasterio windows on the sliding-window grid of `inference.window_starts`;
each window's class scores are weighted by `window_weights` (Hann by default) and summed on the
device, and a pixel's label is the argmax of its blended scores, exactly as `slide_inference`
on the whole scene would give it: predicting in windows equals predicting whole.

Memory does not grow with the scene. The scene is cut into column blocks of `block_width`
pixels, each swept top to bottom one row of windows at a time. The score buffer holds one window
height of the block (plus the windows reaching over its sides); rows that no later window
touches are turned into labels on the device and written out as the sweep passes them. Windows
straddling two column blocks are predicted once for each (about window / block_width more work),
which keeps the seam exact. Labels go to a tiled temporary GeoTIFF, then to a compressed COG.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import shutil
import tempfile
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import rasterio
import rasterio.shutil
from rasterio.enums import MaskFlags, Resampling
from rasterio.windows import Window
from tqdm import tqdm

from spectralmoe_jax.evaluation.inference import (
    PredictFn,
    whole_inference,
    window_starts,
    window_weights,
)

PROBABILITIES = ("softmax", "normalize", "identity")


@dataclasses.dataclass(frozen=True)
class SceneResult:
    labels_path: str
    probabilities_path: str | None
    height: int
    width: int
    num_windows: int  # windows predicted, counting those repeated at column-block seams


def predict_scene(predict_fn: PredictFn, src_path: str, dst_path: str, *, num_classes: int,
                  mean: Sequence[float], std: Sequence[float],
                  bands: Sequence[int | str] | None = None,
                  value_scale: float = 1.0, nodata: float | None = None,
                  window: int = 512, overlap: int = 128, blend: str = "hann",
                  patch_multiple: int = 16, tta: bool = False, batch_size: int = 4,
                  block_width: int = 8192, write_probabilities: bool = False,
                  probabilities: str = "softmax", palette=None,
                  class_names: Sequence[str] | None = None, label_nodata: int = 255,
                  compress: str = "deflate", progress: bool = True, params=None,
                  gdal_cache_mb: int = 64) -> SceneResult:
    """Predicts the GeoTIFF `src_path` and writes a uint8 label COG to `dst_path`.

    Args:
      predict_fn: normalised images [B, h, w, C] -> class scores [B, h, w, K] (jitted or not);
        with `params`, called as predict_fn(params, images): the weights are then an argument
        of the compiled program rather than constants baked into it (large models).
      params: optional pytree of model weights passed to predict_fn.
      mean, std: per selected band, in scaled units: input = (x / value_scale - mean) / std.
      bands: 0-based band indexes or band descriptions (names) to select, in model order;
        None takes all bands.
      value_scale: raw values are divided by it (config.data.value_scale, e.g. 10000 for
        reflectance stored as integers).
      nodata: input nodata value; None uses the file's masks (nodata tag, mask band, alpha).
        A band's nodata values enter the network as 0 (the mean); a pixel that is nodata in
        every selected band gets `label_nodata`, as in the data pipeline (`data/readers.py`).
      window, overlap: window size and overlap in pixels (stride = window - overlap).
      blend: 'hann' (smooth, seamless) or 'mean' (mmseg's average) blending of scores.
      patch_multiple: each window is padded with zeros to a multiple of it and cropped back.
      tta: average with the horizontally flipped prediction.
      batch_size: windows per `predict_fn` call (the last batch is padded: one compilation).
      block_width: columns per block; the device buffer is about
        window * (block_width + 2 window) * (K + 1) * 4 bytes.
      write_probabilities: also write `<dst stem>_probabilities.tif`, K uint8 bands holding
        round(255 p), p from the blended scores by `probabilities` ('softmax' of logits,
        'normalize' non-negative scores to sum 1, or 'identity'); 0 at nodata pixels.
      palette: optional [>= K, 3] uint8 colours, stored as the label band's colour table.
      class_names: optional, stored as the probability bands' descriptions.
      label_nodata: label of nodata pixels and the output's nodata value; not a class.
      compress: COG compression ('deflate', 'zstd', 'lzw', ...).
      progress: show a tqdm progress bar over windows.
      gdal_cache_mb: GDAL's block cache while predicting (bounds its memory).
    """
    if not os.path.isfile(src_path):
        raise FileNotFoundError(f"scene not found: {src_path}")
    if not 0 < num_classes <= label_nodata <= 255:
        raise ValueError(f"need 0 < num_classes ({num_classes}) <= label_nodata "
                         f"({label_nodata}) <= 255 for uint8 labels")
    if not 0 <= overlap < window:
        raise ValueError(f"overlap {overlap} must be in [0, window={window})")
    if block_width < window:
        raise ValueError(f"block_width {block_width} must be at least the window {window}")
    if probabilities not in PROBABILITIES:
        raise ValueError(f"probabilities must be one of {PROBABILITIES}, got {probabilities!r}")
    dst_dir = os.path.dirname(os.path.abspath(dst_path))
    os.makedirs(dst_dir, exist_ok=True)
    probs_path = (os.path.splitext(dst_path)[0] + "_probabilities.tif"
                  if write_probabilities else None)

    with rasterio.Env(GDAL_CACHEMAX=gdal_cache_mb), rasterio.open(src_path) as src:
        indexes = _band_indexes(src, bands)
        mean = _per_band(mean, "mean", len(indexes), src_path)
        std = _per_band(std, "std", len(indexes), src_path)
        height, width = src.height, src.width
        win_h, win_w = min(window, height), min(window, width)
        ys = window_starts(height, win_h, window - overlap)
        xs = window_starts(width, win_w, window - overlap)
        blocks = [(x0, min(x0 + block_width, width)) for x0 in range(0, width, block_width)]
        block_columns = [[x for x in xs if x < x1 and x + win_w > x0] for x0, x1 in blocks]
        num_windows = len(ys) * sum(len(c) for c in block_columns)
        # A batch holds windows of one row of a block: no more than a block has columns (a
        # one-window tile then runs the model once, not once per padded batch slot).
        batch_size = min(batch_size, max(len(c) for c in block_columns))
        predict, accumulate, scroll = _device_fns(
            predict_fn, (win_h, win_w), blend, num_classes=num_classes,
            patch_multiple=patch_multiple, tta=tta,
            probabilities=probabilities if write_probabilities else None)
        masked = nodata is not None or any(
            MaskFlags.all_valid not in src.mask_flag_enums[i - 1] for i in indexes)

        def band_masks(region: Window, raw: np.ndarray | None = None) -> np.ndarray | None:
            """[C, h, w] bool, True where a band holds data; None when the file has no nodata."""
            if not masked:
                return None
            if nodata is None:
                return src.read_masks(indexes, window=region) > 0
            raw = src.read(indexes, window=region) if raw is None else raw
            return ~np.isnan(raw) if np.isnan(nodata) else raw != nodata

        def read(region: Window) -> np.ndarray:
            """The normalised float32 [h, w, C] input of a region; nodata values set to 0."""
            raw = src.read(indexes, window=region, out_dtype=np.float32)
            image = (np.moveaxis(raw, 0, -1) / np.float32(value_scale) - mean) / std
            valid = band_masks(region, raw)
            if valid is not None:
                image[~np.moveaxis(valid, 0, -1)] = 0.0
            return image

        tmp_dir = tempfile.mkdtemp(prefix=".predict_", dir=dst_dir)
        try:
            profile = dict(driver="GTiff", width=width, height=height, crs=src.crs,
                           transform=src.transform, tiled=True, blockxsize=256,
                           blockysize=256, bigtiff="IF_SAFER", dtype="uint8")
            tmp_labels = os.path.join(tmp_dir, "labels.tif")
            tmp_probs = os.path.join(tmp_dir, "probabilities.tif")
            with rasterio.open(tmp_labels, "w", count=1, nodata=label_nodata,
                               **profile) as labels_out, \
                    (rasterio.open(tmp_probs, "w", count=num_classes, **profile)
                     if write_probabilities else contextlib.nullcontext()) as probs_out:

                def emit(acc, total, row, rows, left, x0, x1):
                    """Writes `rows` final rows from scene row `row`, columns [x0, x1)."""
                    if rows == 0:
                        return acc, total
                    acc, total, labels, probs = scroll(acc, total, rows=rows)
                    region = Window(x0, row, x1 - x0, rows)
                    labels = np.array(jax.device_get(labels)[:, x0 - left:x1 - left])
                    valid = band_masks(region)
                    valid = np.ones(labels.shape, bool) if valid is None else valid.any(axis=0)
                    labels[~valid] = label_nodata
                    labels_out.write(labels[None], window=region)
                    if write_probabilities:
                        probs = jax.device_get(probs)[:, x0 - left:x1 - left]
                        probs = np.where(valid[:, :, None], probs, 0)
                        probs_out.write(np.moveaxis(probs, -1, 0), window=region)
                    return acc, total

                bar = tqdm(total=num_windows, unit="window", disable=not progress,
                           desc=os.path.basename(src_path))
                # One buffer shape for all blocks, so that the device functions compile once.
                buffer_width = max(c[-1] + win_w - c[0] for c in block_columns)
                for (x0, x1), columns in zip(blocks, block_columns):
                    left = columns[0]
                    acc = jax.device_put(np.zeros((win_h, buffer_width, num_classes), np.float32))
                    total = jax.device_put(np.zeros((win_h, buffer_width), np.float32))
                    top = 0  # the scene row of the buffer's first row
                    for y in ys:
                        # Rows above y are final: no window of this or a later row reaches them.
                        acc, total = emit(acc, total, top, y - top, left, x0, x1)
                        top = y
                        for start in range(0, len(columns), batch_size):
                            cols = columns[start:start + batch_size]
                            image = read(Window(cols[0], y, cols[-1] + win_w - cols[0], win_h))
                            batch = np.zeros((batch_size, win_h, win_w, len(indexes)), np.float32)
                            offsets = np.zeros(batch_size, np.int32)
                            used = np.zeros(batch_size, np.float32)  # 0: batch padding
                            for i, x in enumerate(cols):
                                batch[i] = image[:, x - cols[0]:x - cols[0] + win_w]
                                offsets[i], used[i] = x - left, 1.0
                            acc, total = accumulate(acc, total, predict(params, batch), offsets, used)
                            bar.update(len(cols))
                    emit(acc, total, top, height - top, left, x0, x1)
                bar.close()
                if palette is not None:
                    labels_out.write_colormap(1, _colormap(palette, num_classes, label_nodata))
                labels_out.set_band_description(1, "label")
                if write_probabilities:
                    probs_out.scales = [1 / 255] * num_classes
                    for k, name in enumerate(class_names or []):
                        probs_out.set_band_description(k + 1, str(name))
            _write_cog(tmp_labels, dst_path, compress, "nearest")
            if write_probabilities:
                _write_cog(tmp_probs, probs_path, compress, "average")
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return SceneResult(os.path.abspath(dst_path), probs_path and os.path.abspath(probs_path),
                       height, width, num_windows)


@functools.lru_cache(maxsize=4)
def _device_fns(predict_fn, window: tuple[int, int], blend: str, *, num_classes: int,
                patch_multiple: int, tta: bool, probabilities: str | None):
    """Jitted (predict, accumulate, scroll) over a score buffer kept on the device.

    The model is compiled once per window shape (`predict` on a fixed batch shape), and kept
    for the next scene; `accumulate` and `scroll` are cheap and compiled per buffer shape.
    """
    weights = window_weights(*window, blend)

    @jax.jit
    def predict(params, batch):
        """Normalised windows [B, h, w, C] -> weighted scores [B, h, w, K] float32."""
        bound = predict_fn if params is None else functools.partial(predict_fn, params)
        scores = whole_inference(bound, batch, patch_multiple=patch_multiple, flip=tta)
        if scores.shape[-1] != num_classes:
            raise ValueError(f"predict_fn returned {scores.shape[-1]} class scores, "
                             f"num_classes is {num_classes}")
        return scores.astype(jnp.float32) * weights[:, :, None]

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def accumulate(acc, total, scores, offsets, used):
        """Adds window i's scores at buffer column offsets[i], times used[i] (0: padding)."""

        def add(i, carry):
            acc, total = carry
            corner = (0, offsets[i], 0)
            acc = jax.lax.dynamic_update_slice(
                acc, jax.lax.dynamic_slice(acc, corner, scores.shape[1:]) + used[i] * scores[i],
                corner)
            total = jax.lax.dynamic_update_slice(
                total, jax.lax.dynamic_slice(total, corner[:2], weights.shape) + used[i] * weights,
                corner[:2])
            return acc, total

        return jax.lax.fori_loop(0, scores.shape[0], add, (acc, total))

    @functools.partial(jax.jit, static_argnames="rows", donate_argnums=(0, 1))
    def scroll(acc, total, *, rows):
        """Labels (uint8 [rows, w]) and uint8 probabilities of the buffer's first rows; the
        buffer moved up by `rows` in place. argmax of the weighted sum is argmax of the blend."""
        labels = _argmax_last(acc[:rows])
        probs = None
        if probabilities is not None:
            blended = acc[:rows] / total[:rows, :, None]
            probs = jnp.round(255 * _to_probabilities(blended, probabilities)).astype(jnp.uint8)
        kept = acc.shape[0] - rows
        acc = jax.lax.dynamic_update_slice(acc, acc[rows:], (0, 0, 0))
        acc = jax.lax.dynamic_update_slice(acc, jnp.zeros_like(acc[:rows]), (kept, 0, 0))
        total = jax.lax.dynamic_update_slice(total, total[rows:], (0, 0))
        total = jax.lax.dynamic_update_slice(total, jnp.zeros_like(total[:rows]), (kept, 0))
        return acc, total, labels, probs

    return predict, accumulate, scroll


def _band_indexes(src, bands) -> list[int]:
    """rasterio's 1-based band indexes for 0-based indexes or band descriptions."""
    if bands is None:
        return list(range(1, src.count + 1))
    indexes = []
    for band in bands:
        if isinstance(band, str):
            if band not in src.descriptions:
                raise ValueError(f"band {band!r} not among the band descriptions "
                                 f"{src.descriptions} of {src.name}")
            indexes.append(src.descriptions.index(band) + 1)
        elif 0 <= int(band) < src.count:
            indexes.append(int(band) + 1)
        else:
            raise ValueError(f"band index {band} out of range for {src.count} bands of {src.name}")
    return indexes


def _per_band(values, name: str, count: int, path: str) -> np.ndarray:
    values = np.asarray(values, np.float32).reshape(-1)
    if values.size != count:
        raise ValueError(f"{name} has {values.size} values for the {count} selected bands "
                         f"of {path}")
    if name == "std" and np.any(values <= 0):
        raise ValueError(f"std must be positive, got {values.tolist()}")
    return values


def _argmax_last(scores: jax.Array) -> jax.Array:
    """uint8 argmax over the last axis (first maximum on ties), as an unrolled comparison:
    several times faster than XLA's variadic-reduce argmax on CPU."""
    best, labels = scores[..., 0], jnp.zeros(scores.shape[:-1], jnp.uint8)
    for k in range(1, scores.shape[-1]):
        labels = jnp.where(scores[..., k] > best, jnp.uint8(k), labels)
        best = jnp.maximum(best, scores[..., k])
    return labels


def _to_probabilities(scores: jax.Array, kind: str) -> jax.Array:
    if kind == "softmax":
        return jax.nn.softmax(scores, axis=-1)
    if kind == "normalize":
        scores = jnp.maximum(scores, 0)
        return scores / jnp.maximum(scores.sum(axis=-1, keepdims=True), 1e-12)
    return jnp.clip(scores, 0, 1)


def _colormap(palette, num_classes: int, label_nodata: int) -> dict:
    palette = np.asarray(palette)
    if palette.ndim != 2 or palette.shape[0] < num_classes or palette.shape[1] != 3:
        raise ValueError(f"palette must be [>= {num_classes}, 3], got {palette.shape}")
    colormap = {k: (*map(int, palette[k]), 255) for k in range(num_classes)}
    colormap[label_nodata] = (0, 0, 0, 0)
    return colormap


def _write_cog(tmp_path: str, dst_path: str, compress: str, resampling: str) -> None:
    """Copies a tiled GeoTIFF to a COG (GDAL's COG driver, else a GTiff with overviews)."""
    if os.path.exists(dst_path):
        os.remove(dst_path)
    with rasterio.Env() as env:
        has_cog = "COG" in env.drivers()
    if has_cog:
        rasterio.shutil.copy(tmp_path, dst_path, driver="COG", compress=compress,
                             blocksize=512, overview_resampling=resampling, bigtiff="IF_SAFER")
        return
    with rasterio.open(tmp_path, "r+") as tmp:
        factors = [2 ** i for i in range(1, 32) if max(tmp.shape) // 2 ** i >= 256]
        tmp.build_overviews(factors, Resampling[resampling])
    rasterio.shutil.copy(tmp_path, dst_path, driver="GTiff", tiled=True, blockxsize=512,
                         blockysize=512, compress=compress, copy_src_overviews=True,
                         bigtiff="IF_SAFER")
