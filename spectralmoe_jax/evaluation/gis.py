"""What a GIS user opens: label rasters in the dataset's own codes, a legend, a QGIS style.

The network predicts train ids 0..K-1; the dataset's label files hold raw codes, which
`config.data.label_map` maps to train ids (`data/spec.py`, `label_lut`). A `LabelEncoding`
says what a predicted label raster stores for each class: by default the dataset's code, so
that predictions and the dataset's own label files read alike ("ids" on request).

The inverse of `label_map` is not unique when several codes map to one id (WHU-OHS merges 24
codes into 7 classes) or when codes not listed keep their value. The rule: class k is written as
the smallest code that `label_map` maps to k; when `label_map` maps no code to k and leaves k
itself alone, as k. Nodata is written as the smallest code `label_map` maps to the ignore
index (the dataset's own "unlabelled" code, e.g. 0 for FLAIR and every `reduce_zero_label`
dataset), else as the ignore index.

Beside each label raster: `<name>.qml`, a paletted QGIS style with the class names (QGIS
loads a `.qml` with the raster's base name as its default style); a legend PNG; a colour
preview with a legend strip.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Sequence
from xml.sax.saxutils import quoteattr

import numpy as np

from spectralmoe_jax.data.spec import DataError, DatasetSpec
from spectralmoe_jax.evaluation import visualize

LABEL_KINDS = ("codes", "ids")
PREVIEW_SIZE = 4096  # long side of the colour preview; larger scenes are read decimated


@dataclasses.dataclass(frozen=True)
class LabelEncoding:
    """The values a label raster stores: `values[k]` for class k, `nodata` where the input
    has none; with the class names and colours for colour tables, styles and legends."""
    values: tuple[int, ...]
    nodata: int
    names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]
    kind: str = "codes"

    def __post_init__(self):
        k = len(self.values)
        if len(self.names) != k or len(self.colors) != k:
            raise DataError(f"label encoding: {k} values, {len(self.names)} names and "
                            f"{len(self.colors)} colours; need one of each per class")
        if len(set(self.values)) != k:
            raise DataError(f"label encoding: two classes would be written as the same value "
                            f"{list(self.values)}")
        if self.nodata in self.values:
            raise DataError(f"label encoding: nodata value {self.nodata} is also class "
                            f"{self.values.index(self.nodata)}'s value")
        if min(self.values + (self.nodata,)) < 0 or max(self.values + (self.nodata,)) > 65535:
            raise DataError(f"label encoding: values {list(self.values)} and nodata "
                            f"{self.nodata} must lie in 0..65535")

    @property
    def num_classes(self) -> int:
        return len(self.values)

    @property
    def dtype(self) -> str:
        return "uint8" if max(self.values + (self.nodata,)) <= 255 else "uint16"

    def encode(self, ids: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        """Train ids [h, w] (0..K-1) -> stored values; `nodata` where `valid` is False."""
        table = np.asarray(self.values + (self.nodata,), self.dtype)
        ids = np.asarray(ids)
        if valid is not None:
            ids = np.where(valid, ids, self.num_classes)
        return table[ids]

    def decode(self, stored: np.ndarray) -> np.ndarray:
        """Stored values -> int32 train ids; -1 for nodata and values of no class."""
        table = np.full(max(self.values + (self.nodata,)) + 1, -1, np.int32)
        table[list(self.values)] = np.arange(self.num_classes)
        stored = np.asarray(stored)
        inside = (stored >= 0) & (stored < len(table))
        return np.where(inside, table[np.where(inside, stored, 0)], -1)

    def colormap(self) -> dict[int, tuple[int, int, int, int]]:
        """GDAL colour table {value: RGBA}; nodata transparent."""
        colormap = {v: (*c, 255) for v, c in zip(self.values, self.colors)}
        colormap[self.nodata] = (0, 0, 0, 0)
        return colormap

    def legend_entries(self) -> list[str]:
        if self.kind == "ids":
            return list(self.names)
        return [f"{value}  {name}" for value, name in zip(self.values, self.names)]


def dataset_codes(lut: np.ndarray, num_classes: int, ignore_index: int,
                  class_names: Sequence[str] | None = None) -> tuple[tuple[int, ...], int]:
    """(code of each class, nodata code) from the dense table raw code -> train id.

    The rule of the module docstring: the smallest code the label map moves to the id, else the
    id itself if the table leaves it alone."""
    lut = np.asarray(lut)
    codes = np.arange(len(lut))
    moved = lut != codes

    def code_of(train_id: int) -> int | None:
        mapped = codes[moved & (lut == train_id)]
        if mapped.size:
            return int(mapped.min())
        if train_id < len(lut) and lut[train_id] == train_id:
            return train_id
        return None

    values = []
    for k in range(num_classes):
        code = code_of(k)
        if code is None:
            name = f" ({class_names[k]})" if class_names else ""
            raise DataError(f"class {k}{name}: config.data.label_map maps no raw code to it, "
                            "so it has no dataset code; write train ids instead "
                            "(--config.predict.labels=ids)")
        values.append(code)
    nodata = code_of(ignore_index)
    return tuple(values), ignore_index if nodata is None else nodata


def label_encoding(spec: DatasetSpec, kind: str = "codes") -> LabelEncoding:
    """The dataset's codes (`kind='codes'`) or its train ids with the ignore index as nodata."""
    if kind not in LABEL_KINDS:
        raise DataError(f"config.predict.labels {kind!r} is not one of {LABEL_KINDS}")
    colors = spec.palette or tuple(map(tuple, visualize.default_palette(spec.num_classes).tolist()))
    if kind == "ids":
        values, nodata = tuple(range(spec.num_classes)), spec.ignore_index
    else:
        values, nodata = dataset_codes(spec.label_lut, spec.num_classes, spec.ignore_index,
                                       spec.class_names)
    return LabelEncoding(values, nodata, tuple(spec.class_names), colors, kind)


def ids_encoding(num_classes: int, names: Sequence[str] | None = None, palette=None,
                 nodata: int = 255) -> LabelEncoding:
    """Train ids 0..K-1 as stored values (names and colours defaulted)."""
    names = tuple(names) if names else tuple(f"class {k}" for k in range(num_classes))
    palette = visualize.default_palette(num_classes) if palette is None else np.asarray(palette)
    if palette.ndim != 2 or palette.shape[0] < num_classes or palette.shape[1] != 3:
        raise DataError(f"palette must be [>= {num_classes}, 3], got {palette.shape}")
    colors = tuple(tuple(int(c) for c in rgb) for rgb in palette[:num_classes])
    return LabelEncoding(tuple(range(num_classes)), nodata, names, colors, "ids")


# --- QGIS style --------------------------------------------------------------------------

def qgis_style(encoding: LabelEncoding, band: int = 1) -> str:
    """A QGIS layer style (.qml): paletted renderer, one entry per class with its name;
    nodata is the raster's own nodata value (transparent in QGIS)."""
    entries = "\n".join(
        f"        <paletteEntry value={quoteattr(str(value))} "
        f"color={quoteattr('#%02x%02x%02x' % color)} alpha=\"255\" label={quoteattr(name)}/>"
        for value, name, color in zip(encoding.values, encoding.names, encoding.colors))
    return f"""<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>
<qgis version="3.28.0" styleCategories="AllStyleCategories" hasScaleBasedVisibilityFlag="0"
      minScale="1e+08" maxScale="0">
  <pipe>
    <rasterrenderer type="paletted" band="{band}" opacity="1" alphaBand="-1" nodataColor="">
      <rasterTransparency/>
      <colorPalette>
{entries}
      </colorPalette>
    </rasterrenderer>
    <brightnesscontrast brightness="0" contrast="0" gamma="1"/>
    <huesaturation saturation="0" grayscaleMode="0" colorizeOn="0"/>
    <rasterresampler maxOversampling="2"/>
  </pipe>
  <blendMode>0</blendMode>
</qgis>
"""


def read_qgis_style(path: str) -> list[tuple[int, str, tuple[int, int, int]]]:
    """(value, label, colour) of each palette entry of a paletted .qml (for tests and tools)."""
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()
    renderer = root.find("./pipe/rasterrenderer")
    if renderer is None or renderer.get("type") != "paletted":
        raise DataError(f"{path}: not a paletted QGIS raster style")
    entries = []
    for entry in renderer.findall("./colorPalette/paletteEntry"):
        color = entry.get("color").lstrip("#")
        entries.append((int(float(entry.get("value"))), entry.get("label"),
                        tuple(int(color[i:i + 2], 16) for i in (0, 2, 4))))
    return entries


# --- pictures ----------------------------------------------------------------------------

def legend_image(encoding: LabelEncoding, title: str | None = None) -> np.ndarray:
    """uint8 [h, w, 3]: a swatch and 'code  name' per class."""
    return visualize.legend(encoding.legend_entries(), np.asarray(encoding.colors, np.uint8),
                            title=title)


def colorize_stored(stored: np.ndarray, encoding: LabelEncoding) -> np.ndarray:
    """uint8 [h, w, 3] colours of a stored label map; nodata white."""
    ids = encoding.decode(stored)
    return visualize.colorize(np.where(ids < 0, 255, ids), np.asarray(encoding.colors, np.uint8))


def with_legend(image: np.ndarray, legend: np.ndarray, gap: int = 8) -> np.ndarray:
    """The image with the legend strip to its right, on white."""
    height = max(image.shape[0], legend.shape[0])
    canvas = np.full((height, image.shape[1] + gap + legend.shape[1], 3), 255, np.uint8)
    canvas[:image.shape[0], :image.shape[1]] = image
    canvas[:legend.shape[0], image.shape[1] + gap:] = legend
    return canvas


def read_labels(path: str, max_size: int | None = None) -> np.ndarray:
    """A label raster's band 1, read decimated (nearest, from the overviews) to at most
    `max_size` pixels on its long side."""
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path) as src:
            scale = 1.0 if max_size is None else min(1.0, max_size / max(src.shape))
            shape = (max(1, round(src.height * scale)), max(1, round(src.width * scale)))
            return src.read(1, out_shape=shape, resampling=Resampling.nearest)


def write_label_png(path: str, stored: np.ndarray, encoding: LabelEncoding) -> str:
    """Labels as a PNG that keeps the stored values: paletted (values 0..255 index the class
    colours, nodata transparent), or 16-bit grey when codes exceed 255."""
    from PIL import Image

    stored = np.asarray(stored)
    if encoding.dtype == "uint8":
        stored = np.ascontiguousarray(stored, np.uint8)
        image = Image.frombytes("P", (stored.shape[1], stored.shape[0]), stored.tobytes())
        palette = np.zeros((256, 3), np.uint8)
        for value, color in zip(encoding.values, encoding.colors):
            palette[value] = color
        image.putpalette(palette.reshape(-1).tolist())
        image.save(path, transparency=encoding.nodata)
    else:
        Image.fromarray(stored.astype(np.uint16)).save(path)
    return path


@dataclasses.dataclass(frozen=True)
class Sidecars:
    style: str
    legend: str
    preview: str


def write_sidecars(label_path: str, encoding: LabelEncoding, title: str | None = None,
                   preview_size: int = PREVIEW_SIZE) -> Sidecars:
    """`<stem>.qml`, `<stem>_legend.png` and `<stem>_color.png` beside a label raster."""
    from spectralmoe_jax.evaluation.visualize import save_png

    stem = os.path.splitext(label_path)[0]
    style = stem + ".qml"
    with open(style, "w", encoding="utf-8") as f:
        f.write(qgis_style(encoding))
    legend = legend_image(encoding, title)
    legend_path = save_png(stem + "_legend.png", legend)
    preview = colorize_stored(read_labels(label_path, preview_size), encoding)
    preview_path = save_png(stem + "_color.png", with_legend(preview, legend))
    return Sidecars(style, legend_path, preview_path)
