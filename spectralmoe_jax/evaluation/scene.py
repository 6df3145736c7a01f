"""Whole-scene prediction: a raster of any size -> a Cloud-Optimised GeoTIFF of labels.

Three parts: the plan of windows (`scene_plan.py`, pure geometry), a reader of normalised
windows and a writer of final rows (`scene_io.py`), and here the device side that carries the
plan out. Each window's class scores are weighted by `window_weights` (Hann by default) and
summed into a score buffer on the device; a pixel's label is the argmax of its blended scores,
exactly as `slide_inference` on the whole scene would give it: predicting in windows equals
predicting whole. Memory does not grow with the scene (see `scene_plan.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import rasterio
from rasterio.windows import Window
from tqdm import tqdm

from spectralmoe_jax.evaluation.gis import ids_encoding
from spectralmoe_jax.evaluation.inference import PredictFn, whole_inference, window_weights
from spectralmoe_jax.evaluation.scene_io import (SceneInput, SceneOutput, SceneReader,
                                                 SceneWriter)
from spectralmoe_jax.evaluation.scene_plan import Emit, Tiling, WindowPlan, plan_windows

__all__ = ["SceneInput", "SceneOutput", "SceneResult", "Tiling", "predict_scene"]


@dataclasses.dataclass(frozen=True)
class SceneResult:
    labels_path: str
    probabilities_path: str | None
    height: int
    width: int
    num_windows: int  # windows predicted, counting those repeated at column-block seams
    georeferenced: bool


def predict_scene(predict_fn: PredictFn, src_path: str, dst_path: str, *, num_classes: int,
                  scene_input: SceneInput, tiling: Tiling = Tiling(),
                  output: SceneOutput = SceneOutput(), params=None, progress: bool = True,
                  gdal_cache_mb: int = 64) -> SceneResult:
    """Predicts the raster `src_path` and writes its labels to `dst_path` (a COG; a PNG when
    `dst_path` ends in .png), with the input's CRS and transform.

    Args:
      predict_fn: normalised images [B, h, w, C] -> class scores [B, h, w, K] (jitted or not);
        with `params`, called as predict_fn(params, images): the weights are then an argument
        of the compiled program rather than constants baked into it (large models).
      num_classes: K, the number of class scores.
      scene_input: bands, scaling, normalisation and nodata of the input.
      tiling: windows, overlap, blending, batch and block sizes.
      output: label values (dataset codes or ids), probability bands, compression.
      params: optional pytree of model weights passed to predict_fn.
      progress: show a tqdm progress bar over windows.
      gdal_cache_mb: GDAL's block cache while predicting (bounds its memory).
    """
    if not 0 < num_classes <= 255:
        raise ValueError(f"num_classes {num_classes} must be in 1..255 (uint8 argmax)")
    labels = output.labels or ids_encoding(num_classes)
    if labels.num_classes != num_classes:
        raise ValueError(f"the label encoding has {labels.num_classes} classes, "
                         f"num_classes is {num_classes}")
    with rasterio.Env(GDAL_CACHEMAX=gdal_cache_mb), SceneReader(src_path, scene_input) as reader:
        plan = plan_windows(reader.height, reader.width, tiling)
        predict, accumulate, scroll = _device_fns(
            predict_fn, plan.window, tiling.blend, num_classes=num_classes,
            patch_multiple=tiling.patch_multiple, tta=tiling.tta,
            probabilities=output.probabilities, probability_kind=output.probability_kind)
        bar = tqdm(total=plan.num_windows, unit="window", disable=not progress,
                   desc=os.path.basename(src_path))
        with SceneWriter(dst_path, reader, labels, output) as writer:
            _run_plan(plan, reader, writer, (predict, accumulate, scroll), params, tiling,
                      num_classes, bar)
            labels_path, probs_path = writer.finish()
        bar.close()
        return SceneResult(labels_path, probs_path, reader.height, reader.width,
                           plan.num_windows, reader.georeferenced)


def _run_plan(plan: WindowPlan, reader: SceneReader, writer: SceneWriter, device_fns, params,
              tiling: Tiling, num_classes: int, bar) -> None:
    """Carries out the plan: block by block, model calls into the buffer, emits out of it."""
    predict, accumulate, scroll = device_fns
    win_h, _ = plan.window
    for block in plan.blocks:
        acc = jax.device_put(np.zeros((win_h, plan.buffer_width, num_classes), np.float32))
        total = jax.device_put(np.zeros((win_h, plan.buffer_width), np.float32))
        crop = slice(block.x0 - block.left, block.x1 - block.left)
        for step in block.steps:
            if isinstance(step, Emit):
                acc, total, ids, probs = scroll(acc, total, rows=step.rows)
                region = Window(block.x0, step.row, block.x1 - block.x0, step.rows)
                ids, probs = jax.device_get((ids, probs))
                writer.write(region, ids[:, crop], None if probs is None else probs[:, crop],
                             reader.valid(region))
                continue
            batch = reader.read_windows(step.row, step.columns, plan.window, plan.batch_size)
            offsets = np.zeros(plan.batch_size, np.int32)
            used = np.zeros(plan.batch_size, np.float32)  # 0: batch padding
            offsets[:len(step.columns)] = np.asarray(step.columns) - block.left
            used[:len(step.columns)] = 1.0
            acc, total = accumulate(acc, total, predict(params, batch), offsets, used)
            bar.update(len(step.columns))


@functools.lru_cache(maxsize=4)
def _device_fns(predict_fn, window: tuple[int, int], blend: str, *, num_classes: int,
                patch_multiple: int, tta: bool, probabilities: str | None,
                probability_kind: str):
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
        """Labels (uint8 [rows, w]) and probabilities (uint8 255 p, or float16 p) of the
        buffer's first rows; the buffer moved up by `rows` in place. argmax of the weighted sum
        is argmax of the blend."""
        labels = _argmax_last(acc[:rows])
        probs = None
        if probabilities is not None:
            p = _to_probabilities(acc[:rows] / total[:rows, :, None], probability_kind)
            probs = (jnp.round(255 * p).astype(jnp.uint8) if probabilities == "uint8"
                     else p.astype(jnp.float16))
        kept = acc.shape[0] - rows
        acc = jax.lax.dynamic_update_slice(acc, acc[rows:], (0, 0, 0))
        acc = jax.lax.dynamic_update_slice(acc, jnp.zeros_like(acc[:rows]), (kept, 0, 0))
        total = jax.lax.dynamic_update_slice(total, total[rows:], (0, 0))
        total = jax.lax.dynamic_update_slice(total, jnp.zeros_like(total[:rows]), (kept, 0))
        return acc, total, labels, probs

    return predict, accumulate, scroll


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


