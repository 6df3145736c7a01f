"""Training augmentation and normalisation in NumPy, deterministic given a `np.random.Generator`.

The released pipeline (SpectralMoE configs, mmseg 1.x transforms), in order:
  RandomChoiceResize(ResizeShortestEdge, max_size=1024) -> RandomCrop(cat_max_ratio=0.75)
  -> RandomFlip(0.5) -> (MSI)PhotoMetricDistortion -> normalise -> pad to the crop (label 255).

Images are resized bilinearly with OpenCV's `INTER_LINEAR` taps (half-pixel centres, no
antialiasing; identical to `torch.nn.functional.interpolate(mode='bilinear',
align_corners=False)`), labels by half-pixel nearest neighbour (torch 'nearest-exact'), so a
label pixel and the image pixel it describes share the same centre. (mmcv's 'nearest' is
OpenCV's `INTER_NEAREST`, which takes floor(dst * scale) and shifts labels up to half a source
pixel towards the top-left of the image.)

`TrainTransform` computes only the cropped window of the resized image, with the flip folded
into the column taps: the result equals resize -> crop -> flip on the whole tile.
Photometric distortion works on float values without mmseg's uint8 rounding after each step.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from spectralmoe_jax.data.spec import AugmentSpec, DatasetSpec, PhotometricSpec

# --- geometry -----------------------------------------------------------------------------


def short_edge_size(height: int, width: int, short_edge: int,
                    max_size: int | None) -> tuple[int, int]:
    """mmseg `ResizeShortestEdge` followed by mmcv `imrescale` (aspect ratio kept)."""
    size = float(short_edge)
    scale = size / min(height, width)
    new_h, new_w = (size, scale * width) if height < width else (scale * height, size)
    if max_size and max(new_h, new_w) > max_size:
        shrink = max_size / max(new_h, new_w)
        new_h, new_w = new_h * shrink, new_w * shrink
    target_h, target_w = int(new_h + 0.5), int(new_w + 0.5)
    factor = min(max(target_h, target_w) / max(height, width),
                 min(target_h, target_w) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def linear_taps(out_size: int, in_size: int, start: int = 0, stop: int | None = None):
    """Source indices (i0, i1) and weight of i1 for output pixels start..stop (half-pixel)."""
    dst = np.arange(start, out_size if stop is None else stop, dtype=np.float64)
    src = np.maximum((dst + 0.5) * (in_size / out_size) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    return i0, i1, (src - i0).astype(np.float32)


def nearest_taps(out_size: int, in_size: int) -> np.ndarray:
    """Half-pixel nearest neighbour: floor((dst + 0.5) * in / out)."""
    dst = np.arange(out_size, dtype=np.float64)
    return np.minimum(np.floor((dst + 0.5) * (in_size / out_size)).astype(np.int64),
                      in_size - 1)


def resize_window(planes: np.ndarray, out_size: tuple[int, int], rows: tuple[int, int],
                  cols: tuple[int, int], flip: bool = False) -> np.ndarray:
    """Window [rows) x [cols) of `planes` [C, H, W] resized bilinearly to `out_size`, mirrored
    left-right when `flip`, as float32 [C, h, w].

    Band-major layout keeps every NumPy loop over contiguous rows: on [H, W, C] with C = 4 the
    same gathers and blends run about ten times slower.
    """
    (out_h, out_w), (in_h, in_w) = out_size, planes.shape[1:]
    if (out_h, out_w) == (in_h, in_w):
        window = planes[:, rows[0]:rows[1], cols[0]:cols[1]]
        return np.array(window[:, :, ::-1] if flip else window, np.float32)   # a copy
    y0, y1, fy = linear_taps(out_h, in_h, *rows)
    x0, x1, fx = linear_taps(out_w, in_w, *cols)
    if flip:
        x0, x1, fx = x0[::-1], x1[::-1], fx[::-1]
    # Rows first, then the columns of the window only (gathered on a 2-D view: faster);
    # each blend a + (b - a) w is done in place in b's buffer.
    top = np.take(planes, y0, axis=1).astype(np.float32, copy=False)
    vertical = np.take(planes, y1, axis=1).astype(np.float32, copy=False)
    vertical -= top
    vertical *= fy[None, :, None]
    vertical += top
    rows_2d = vertical.reshape(-1, in_w)
    left = np.take(rows_2d, x0, axis=1)
    out = np.take(rows_2d, x1, axis=1)
    out -= left
    out *= fx
    out += left
    return out.reshape(planes.shape[0], len(y0), len(x0))


def resize_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[H, W, C] -> [h, w, C] (OpenCV INTER_LINEAR)."""
    planes = np.moveaxis(image, -1, 0)
    return np.moveaxis(resize_window(planes, size, (0, size[0]), (0, size[1])), 0, -1)


def resize_nearest(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[H, W] -> [h, w] (half-pixel nearest)."""
    rows, cols = nearest_taps(size[0], label.shape[0]), nearest_taps(size[1], label.shape[1])
    return np.take(np.take(label, rows, axis=0), cols, axis=1)


def sample_short_edge(augment: AugmentSpec, rng: np.random.Generator) -> int | None:
    """mmseg `RandomChoiceResize` (a choice of short edges) or `RandomResize` (ratio range)."""
    if augment.short_edges:
        return int(augment.short_edges[rng.integers(len(augment.short_edges))])
    if augment.ratio_range:
        low, high = augment.ratio_range
        return int(augment.base_size * (rng.random() * (high - low) + low))
    return None


def sample_crop(label: np.ndarray, crop_size: tuple[int, int], cat_max_ratio: float,
                ignore_index: int, rng: np.random.Generator) -> tuple[int, int]:
    """Top-left corner of an mmseg `RandomCrop`: re-drawn up to 10 times while a single class
    covers >= cat_max_ratio of the crop's labelled pixels (or fewer than 2 classes remain)."""
    height, width = label.shape
    margin_h, margin_w = max(height - crop_size[0], 0), max(width - crop_size[1], 0)

    def draw():
        return int(rng.integers(margin_h + 1)), int(rng.integers(margin_w + 1))

    y, x = draw()
    if cat_max_ratio < 1.0:
        for _ in range(10):
            window = label[y:y + crop_size[0], x:x + crop_size[1]]
            counts = np.bincount(window.ravel(), minlength=ignore_index + 1)
            counts[ignore_index] = 0
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            y, x = draw()
    return y, x


# --- photometric distortion ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PhotometricParams:
    """One draw of mmseg `PhotoMetricDistortion`; None means the step was skipped."""
    brightness: float | None = None
    contrast: float | None = None
    contrast_first: bool = True      # mmseg mode 1: contrast before saturation and hue
    saturation: float | None = None
    hue: int | None = None           # OpenCV hue units (2 degrees)


def sample_photometric(spec: PhotometricSpec, rng: np.random.Generator,
                       has_rgb: bool) -> PhotometricParams:
    """Draws with mmseg's distribution: each step happens with probability 1/2."""
    brightness = (rng.uniform(-spec.brightness_delta, spec.brightness_delta)
                  if rng.integers(2) else None)
    contrast_first = bool(rng.integers(2))
    contrast = rng.uniform(*spec.contrast_range) if rng.integers(2) else None
    saturation = hue = None
    if has_rgb:
        saturation = rng.uniform(*spec.saturation_range) if rng.integers(2) else None
        hue = int(rng.integers(-spec.hue_delta, spec.hue_delta)) if rng.integers(2) else None
    return PhotometricParams(brightness, contrast, contrast_first, saturation, hue)


def rgb_to_hsv(r: np.ndarray, g: np.ndarray, b: np.ndarray):
    """Hue in sextants [0, 6) (degrees / 60), saturation in [0, 1], value in input units."""
    tiny = np.float32(1e-20)
    value = np.maximum(np.maximum(r, g), b)
    delta = value - np.minimum(np.minimum(r, g), b)
    saturation = delta / np.maximum(value, tiny)
    delta = np.maximum(delta, tiny)          # grey pixels get hue 0; their chroma is 0 anyway
    hue = np.where(value == r, (g - b) / delta,
                   np.where(value == g, (b - r) / delta + 2, (r - g) / delta + 4))
    return _wrap_sextants(hue), saturation, value


def hsv_to_rgb(hue: np.ndarray, saturation: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Inverse of `rgb_to_hsv` as [3, ...]: channel n is V - V S clip(min(k, 4 - k), 0, 1),
    k = (n + H) mod 6 with n = 5, 3, 1 for R, G, B."""
    chroma = value * saturation
    channels = []
    for n in (5, 3, 1):
        k = _wrap_sextants(hue + np.float32(n))
        channels.append(value - chroma * np.clip(np.minimum(k, 4 - k), 0, 1))
    return np.stack(channels)


def _wrap_sextants(hue: np.ndarray) -> np.ndarray:
    """Hue in (-6, 12) -> [0, 6) (np.where: much faster than `%` or masked assignment)."""
    hue = np.where(hue >= 6, hue - 6, hue)
    return np.where(hue < 0, hue + 6, hue)


def saturate(rgb: np.ndarray, alpha: float) -> np.ndarray:
    """HSV saturation times alpha (clipped at 1), hue and value kept, without converting:
    each channel c of [3, ...] becomes V - (V - c) min(alpha, V / (V - min))."""
    value = rgb.max(axis=0)
    delta = value - rgb.min(axis=0)
    gain = np.minimum(np.float32(alpha), value / np.maximum(delta, np.float32(1e-20)))
    return value - (value - rgb) * gain


def apply_photometric(planes: np.ndarray, params: PhotometricParams, spec: PhotometricSpec,
                      rgb_bands: tuple[int, int, int] | None) -> np.ndarray:
    """Brightness and contrast on `spec.bands`, saturation and hue on the RGB bands, clipped
    to `spec.value_range` after each step (float32 [C, H, W], modified in place)."""
    low, high = spec.value_range if spec.value_range is not None else (-np.inf, np.inf)
    bands = list(spec.bands) if spec.bands is not None else slice(None)

    def linear(alpha: float, beta: float):
        planes[bands] = np.clip(planes[bands] * np.float32(alpha) + np.float32(beta), low, high)

    if params.brightness is not None:
        linear(1.0, params.brightness)
    if params.contrast is not None and params.contrast_first:
        linear(params.contrast, 0.0)
    if rgb_bands is not None and params.hue is not None:
        rgb = list(rgb_bands)
        hue, saturation, value = rgb_to_hsv(*planes[rgb])
        if params.saturation is not None:
            saturation = np.minimum(saturation * np.float32(params.saturation), 1)
        hue = _wrap_sextants(hue + np.float32(params.hue / 30.0))  # OpenCV unit: 2 degrees
        planes[rgb] = np.clip(hsv_to_rgb(hue, saturation, value), low, high)
    elif rgb_bands is not None and params.saturation is not None:
        rgb = list(rgb_bands)
        planes[rgb] = np.clip(saturate(planes[rgb], params.saturation), low, high)
    if params.contrast is not None and not params.contrast_first:
        linear(params.contrast, 0.0)
    return planes


# --- normalisation ------------------------------------------------------------------------


def normalize(image: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(x - mean) / std per band of [H, W, C], float32."""
    return ((image - mean) / std).astype(np.float32, copy=False)


def normalize_and_pad(planes: np.ndarray, label: np.ndarray, spec: DatasetSpec):
    """[C, h, w] -> normalised [H, W, C] padded bottom/right to the crop size: image 0 (after
    normalisation, as mmseg's SegDataPreProcessor pads), label `ignore_index`."""
    crop_h, crop_w = spec.crop_size
    height, width = label.shape
    out_image = np.zeros((max(crop_h, height), max(crop_w, width), planes.shape[0]), np.float32)
    out_label = np.full(out_image.shape[:2], spec.ignore_index, np.int32)
    normalised = (planes - spec.mean[:, None, None]) / spec.std[:, None, None]
    out_image[:height, :width] = np.moveaxis(normalised, 0, -1)
    out_label[:height, :width] = label
    return out_image, out_label


# --- the per-example transforms grain runs ------------------------------------------------


class TrainTransform:
    """Source element -> `{"image": float32 [h, w, C] normalised, "label": int32 [h, w]}` with
    (h, w) = crop_size; a grain `RandomMapTransform` (same output for the same rng)."""

    def __init__(self, spec: DatasetSpec):
        self.spec = spec

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        return self(element, rng)

    def __call__(self, element: dict, rng: np.random.Generator) -> dict:
        spec, augment = self.spec, self.spec.augment
        image, label = element["image"], element["label"]
        height, width = label.shape

        short_edge = sample_short_edge(augment, rng)
        size = ((height, width) if short_edge is None else
                short_edge_size(height, width, short_edge, augment.max_size))
        resized_label = label if size == (height, width) else resize_nearest(label, size)

        y, x = sample_crop(resized_label, spec.crop_size, augment.cat_max_ratio,
                           spec.ignore_index, rng)
        rows = (y, min(y + spec.crop_size[0], size[0]))
        cols = (x, min(x + spec.crop_size[1], size[1]))
        flip = bool(rng.random() < augment.flip_prob)

        label = resized_label[rows[0]:rows[1], cols[0]:cols[1]]
        label = label[:, ::-1] if flip else label
        # Sources read band-major and hand [H, W, C] views: moving the axis back is free.
        planes = resize_window(np.moveaxis(image, -1, 0), size, rows, cols, flip)
        if augment.photometric.enabled:
            params = sample_photometric(augment.photometric, rng, spec.rgb_bands is not None)
            planes = apply_photometric(planes, params, augment.photometric, spec.rgb_bands)
        image, label = normalize_and_pad(planes, label, spec)
        return {"image": image, "label": label}


class EvalTransform:
    """Normalisation only, full tile; name and domain are kept."""

    def __init__(self, spec: DatasetSpec):
        self.spec = spec

    def __call__(self, element: dict) -> dict:
        image = np.ascontiguousarray(normalize(element["image"], self.spec.mean, self.spec.std))
        return {**element, "image": image}
