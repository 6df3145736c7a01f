"""Pictures to check predictions by eye: colour maps, false-colour composites, panels, and the
adapter's expert-routing maps. All images are uint8 [h, w, 3] NumPy arrays; PIL writes PNGs.
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from spectralmoe_jax.data import spec

IGNORE_COLOR = (255, 255, 255)
ERROR_COLORS = {"correct": (40, 40, 40), "wrong": (230, 30, 30), "ignored": (255, 255, 255)}


def default_palette(num_colors: int) -> np.ndarray:
    """uint8 [num_colors, 3] distinct colours (the datasets' default, `spec.default_palette`)."""
    return np.asarray(spec.default_palette(num_colors), np.uint8).reshape(num_colors, 3)


def colorize(label, palette, ignore_index: int = 255,
             ignore_color: Sequence[int] = IGNORE_COLOR) -> np.ndarray:
    """uint8 [h, w, 3] colours of a label map [h, w]; the ignore index (and any value the
    palette has no colour for) in `ignore_color`."""
    label = np.asarray(label)
    palette = np.asarray(palette, np.uint8)
    if palette.ndim != 2 or palette.shape[1] != 3:
        raise ValueError(f"palette must be [K, 3], got {palette.shape}")
    table = np.tile(np.asarray(ignore_color, np.uint8), (256, 1))
    table[:len(palette)] = palette[:256]
    known = (label >= 0) & (label < len(palette)) & (label != ignore_index)
    return table[np.where(known, label, 255).astype(np.uint8)]


def percentile_stretch(image, bands: Sequence[int] = (0, 1, 2),
                       percentiles: tuple[float, float] = (2.0, 98.0), valid=None) -> np.ndarray:
    """uint8 [h, w, 3] false-colour composite of three bands of image [h, w, C], each mapped
    linearly from its own (low, high) percentiles (over `valid` pixels) to 0..255."""
    image = np.asarray(image)
    if image.ndim != 3 or len(bands) != 3:
        raise ValueError(f"need an image [h, w, C] and 3 bands, got {image.shape} and {bands}")
    if max(bands) >= image.shape[-1] or min(bands) < 0:
        raise ValueError(f"bands {tuple(bands)} out of range for {image.shape[-1]} bands")
    composite = image[..., list(bands)].astype(np.float64)
    sample = composite[np.asarray(valid, bool)] if valid is not None else composite.reshape(-1, 3)
    low, high = np.percentile(sample, percentiles, axis=0)
    scale = np.where(high > low, high - low, 1.0)
    return np.round(np.clip((composite - low) / scale, 0, 1) * 255).astype(np.uint8)


def error_map(pred, label, ignore_index: int = 255) -> np.ndarray:
    """uint8 [h, w, 3]: correct pixels dark, wrong red, ignored white."""
    pred, label = np.asarray(pred), np.asarray(label)
    out = np.empty(label.shape + (3,), np.uint8)
    out[...] = ERROR_COLORS["wrong"]
    out[pred == label] = ERROR_COLORS["correct"]
    out[label == ignore_index] = ERROR_COLORS["ignored"]
    return out


def panel(images: Sequence[np.ndarray], captions: Sequence[str] | None = None,
          gap: int = 4, columns: int | None = None) -> np.ndarray:
    """Images side by side (rows of `columns`) on white, each with its caption above."""
    images = [np.asarray(im, np.uint8) for im in images]
    captions = list(captions) if captions is not None else [""] * len(images)
    if len(captions) != len(images):
        raise ValueError(f"{len(captions)} captions for {len(images)} images")
    columns = columns or len(images)
    rows = -(-len(images) // columns)
    cell_h = max(im.shape[0] for im in images) + (14 if any(captions) else 0)
    cell_w = max(im.shape[1] for im in images)
    canvas = Image.new("RGB", (columns * cell_w + (columns + 1) * gap,
                               rows * cell_h + (rows + 1) * gap), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (image, caption) in enumerate(zip(images, captions)):
        x = gap + (i % columns) * (cell_w + gap)
        y = gap + (i // columns) * (cell_h + gap)
        if caption:
            draw.text((x, y), caption, fill=(0, 0, 0))
            y += 14
        canvas.paste(Image.fromarray(image), (x, y))
    return np.asarray(canvas)


def prediction_panel(image, label, pred, palette, *, bands: Sequence[int] = (0, 1, 2),
                     ignore_index: int = 255, name: str = "") -> np.ndarray:
    """Input (false colour) | ground truth | prediction | error, side by side."""
    title = f"{name}: " if name else ""
    return panel([percentile_stretch(image, bands), colorize(label, palette, ignore_index),
                  colorize(pred, palette, ignore_index), error_map(pred, label, ignore_index)],
                 [f"{title}input (bands {', '.join(map(str, bands))})", "ground truth",
                  "prediction", "error"])


def legend(names: Sequence[str], palette, swatch: int = 12,
           title: str | None = None) -> np.ndarray:
    """uint8 image: an optional title, then one outlined colour swatch and its name a line."""
    palette = np.asarray(palette, np.uint8)
    top = 4 + (swatch + 6 if title else 0)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text = max([measure.textlength(n) for n in names] + [measure.textlength(title or "") - swatch])
    width = swatch + 16 + int(np.ceil(text))
    canvas = Image.new("RGB", (width, top + len(names) * (swatch + 4)), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 4), title, fill=(0, 0, 0))
    for i, name in enumerate(names):
        y = top + i * (swatch + 4)
        draw.rectangle([4, y, 4 + swatch - 1, y + swatch - 1], fill=tuple(map(int, palette[i])),
                       outline=(90, 90, 90))
        draw.text((swatch + 8, y), name, fill=(0, 0, 0))
    return np.asarray(canvas)


def routing_grid(expert_maps, num_experts: int, *, palette=None, scale: int = 8,
                 columns: int = 6, captions: Sequence[str] | None = None) -> np.ndarray:
    """Per-layer expert-routing maps int [L, h, w] (the top-1 expert of each patch, e.g. the
    adapter's aux['expert_v'] reshaped to the patch grid) as a grid of colour images, with a
    legend of the experts' colours below."""
    expert_maps = np.asarray(expert_maps)
    if expert_maps.ndim != 3:
        raise ValueError(f"expert maps must be [layers, h, w], got {expert_maps.shape}")
    if expert_maps.min() < 0 or expert_maps.max() >= num_experts:
        raise ValueError(f"expert indices must be in 0..{num_experts - 1}, got "
                         f"{expert_maps.min()}..{expert_maps.max()}")
    palette = default_palette(num_experts) if palette is None else np.asarray(palette)
    images = [colorize(m, palette).repeat(scale, axis=0).repeat(scale, axis=1)
              for m in expert_maps]
    captions = captions or [f"layer {i}" for i in range(len(images))]
    grid = panel(images, captions, columns=min(columns, len(images)))
    key = legend([f"expert {e}" for e in range(num_experts)], palette)
    width = max(grid.shape[1], key.shape[1])
    canvas = np.full((grid.shape[0] + key.shape[0], width, 3), 255, np.uint8)
    canvas[:grid.shape[0], :grid.shape[1]] = grid
    canvas[grid.shape[0]:, :key.shape[1]] = key
    return canvas


def to_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(path: str, image: np.ndarray) -> str:
    with open(path, "wb") as f:
        f.write(to_png(image))
    return path
