"""`config.data` checked once and frozen: what every reader, transform and builder consumes.

A dataset config (an `ml_collections.ConfigDict`, see `data/benchmarks.py` for complete
examples) names the files, the bands, the value scaling, the classes and the augmentation. The
fields:

  name                   benchmark or dataset name
  format                 image file format: 'geotiff' | 'image' (PNG/JPEG) | 'npy' | 'hdf5';
                         labels are read by their extension (.tif, .png, .npy, .h5, ...)
  root                   dataset root folder (`--config.data.root=/path`)
  layout.label_pattern   regex on an image path relative to root ...
  layout.label_replace   ... and its replacement giving the label path (`re.sub`)
  layout.domain_pattern  regex whose group 1 is the tile's domain, searched in the relative path
  splits.<split>.glob    images of the split, a glob relative to root (`**` allowed)
  splits.<split>.domains keep only these domains (None: all)
  band_names             names of the bands stored in the file, in file order
  bands                  selected bands, in model order: 0-based file indices or names
  wavelengths            centre wavelength of each selected band in micrometres (DOFA), or None
  rgb_bands              positions of R, G, B among the selected bands (depth encoder, hue and
                         saturation jitter, false-colour views), or None
  dtype                  expected raw image dtype ('uint8', 'uint16', ...) or None for any
  value_scale            the raw values are divided by it (1 for 0-255 data, 10000 for
                         reflectance stored x 10^4); mean and std are in the divided units
  nodata                 image nodata value; None takes the GeoTIFF's own nodata tag
  num_classes, class_names, palette, ignore_index
  label_map              {raw code: train id}; codes not listed keep their value
  mean, std              per selected band, applied after augmentation
  crop_size              (h, w) of training crops; batches are padded to it
  augment                resize (short_edges | ratio_range, base_size, max_size),
                         cat_max_ratio, flip_prob, photometric (see `AugmentSpec`)
  array_layout           'HWC' or 'CHW' for .npy / HDF5 tiles
  hdf5_image_key, hdf5_label_key
  value_range            (low, high) of the raw values, for `--mode stats` histograms of float data
  tfds_data_dir          '' reads the files; a folder reads the ArrayRecord shards written
                         by `data/tfds_builders.py` (the fast path)
  num_workers            grain worker processes for training (0: threads in this process)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from spectralmoe_jax.errors import UserError, unknown_key

IMAGE_FORMATS = ("geotiff", "image", "npy", "hdf5")
# Every key of `config.data` (the docstring above says what each means).
FIELDS = ("name", "format", "root", "layout", "splits", "band_names", "bands", "wavelengths",
          "rgb_bands", "dtype", "value_scale", "value_range", "nodata", "num_classes",
          "class_names", "palette", "ignore_index", "label_map", "mean", "std", "crop_size",
          "augment", "array_layout", "hdf5_image_key", "hdf5_label_key", "tfds_data_dir",
          "num_workers")
LAYOUT_FIELDS = ("label_pattern", "label_replace", "domain_pattern")
SPLIT_FIELDS = ("glob", "domains")


class DataError(UserError, ValueError):
    """A dataset or its config is unusable; the message names the file or key and the problem."""


def _check_keys(section, known, where: str) -> None:
    for key in section:
        if key not in known:
            raise DataError(unknown_key(key, known, where))


@dataclasses.dataclass(frozen=True)
class SplitSpec:
    glob: str
    domains: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True)
class PhotometricSpec:
    """mmseg `PhotoMetricDistortion`, generalised to C bands.

    Brightness (+delta) and contrast (x alpha) act on `bands` (None: all bands); the released
    multispectral version acts on the RGB bands only and leaves NIR untouched. Saturation and
    hue act in HSV space on the dataset's `rgb_bands` and are skipped without them.
    `value_range` is the clip range of the scaled values (mmseg clips to [0, 255]).
    """
    enabled: bool = False
    brightness_delta: float = 32.0
    contrast_range: tuple[float, float] = (0.5, 1.5)
    saturation_range: tuple[float, float] = (0.5, 1.5)
    hue_delta: int = 18                 # on OpenCV's 0..180 hue scale, as mmseg
    bands: tuple[int, ...] | None = None
    value_range: tuple[float, float] | None = (0.0, 255.0)


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
    """The released training augmentation, in order: resize, crop, flip, photometric.

    Resize (mmseg `RandomChoiceResize` + `ResizeShortestEdge`): the short edge becomes one of
    `short_edges`, or `base_size * U(ratio_range)`; the long edge is capped at `max_size`.
    Crop (mmseg `RandomCrop`): up to 10 re-draws while one class covers >= `cat_max_ratio`.
    """
    short_edges: tuple[int, ...] | None = None
    ratio_range: tuple[float, float] | None = None
    base_size: int = 512
    max_size: int | None = 1024
    cat_max_ratio: float = 1.0
    flip_prob: float = 0.5
    photometric: PhotometricSpec = PhotometricSpec()


@dataclasses.dataclass(frozen=True, eq=False)
class DatasetSpec:
    name: str
    format: str
    root: str
    label_pattern: str
    label_replace: str
    domain_pattern: str | None
    splits: Mapping[str, SplitSpec]
    band_indices: tuple[int, ...]
    band_names: tuple[str, ...]          # names of the selected bands
    file_band_count: int | None          # bands the file must hold (len(config band_names))
    wavelengths: tuple[float, ...] | None
    rgb_bands: tuple[int, int, int] | None
    dtype: str | None
    value_scale: float
    nodata: float | None
    num_classes: int
    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    ignore_index: int
    label_lut: np.ndarray                # int32 lookup table raw code -> train id
    mean: np.ndarray                     # float32 [C]
    std: np.ndarray                      # float32 [C]
    crop_size: tuple[int, int]
    augment: AugmentSpec
    array_layout: str
    hdf5_image_key: str
    hdf5_label_key: str
    tfds_data_dir: str
    num_workers: int = 0                 # grain worker processes for training
    value_range: tuple[float, float] | None = None  # raw value range of float images (stats)

    @property
    def num_bands(self) -> int:
        return len(self.band_indices)

    def remap_labels(self, raw: np.ndarray) -> np.ndarray:
        """Raw label codes -> int32 train ids; codes outside the table keep their value."""
        lut = self.label_lut
        if raw.dtype in (np.uint8, np.bool_) and len(lut) >= 256:
            return lut[raw]
        out = raw.astype(np.int32)
        inside = (out >= 0) & (out < len(lut))
        out[inside] = lut[out[inside]]
        return out


def _get(config, key, default=None):
    value = config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)
    return default if value is None else value


def _to_plain(value):
    """ConfigDict / FrozenConfigDict / tuples -> plain Python containers."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return value


def resolve_bands(bands: Sequence, names: Sequence[str],
                  names_from: str = "config.data.band_names") -> tuple[int, ...]:
    """0-based file band indices of `bands` (indices or names, in model order).

    `names` are the file's band names in file order (may be empty: indices only), taken from
    `names_from` (the config, or a file's band descriptions); errors name it.
    """
    indices = []
    for band in bands:
        if isinstance(band, str):
            if band not in names:
                raise DataError(f"config.data.bands: band name {band!r} is not one of "
                                f"{names_from} {list(names)}")
            indices.append(list(names).index(band))
        elif isinstance(band, (int, np.integer)) and not isinstance(band, bool):
            if band < 0 or (names and band >= len(names)):
                raise DataError(f"config.data.bands: index {band} is outside the "
                                f"{len(names) or 'file'} bands {list(names)} ({names_from})")
            indices.append(int(band))
        else:
            raise DataError(f"config.data.bands: {band!r} is neither a 0-based index nor a "
                            "band name")
    if not indices:
        raise DataError("config.data.bands is empty: select at least one band")
    return tuple(indices)


def check_wavelengths(wavelengths, num_bands: int) -> tuple[float, ...] | None:
    """Wavelengths in micrometres, one per selected band (DOFA's wave_list)."""
    if wavelengths is None:
        return None
    values = tuple(float(w) for w in wavelengths)
    if len(values) != num_bands:
        raise DataError(f"config.data.wavelengths has {len(values)} values for {num_bands} "
                        "selected bands: give one wavelength per band, in band order")
    if any(not 0.2 <= w <= 20.0 for w in values):
        unit = "nanometres" if all(100.0 <= w <= 20000.0 for w in values) else "an unknown unit"
        raise DataError(f"config.data.wavelengths {list(values)} look like {unit}: give "
                        "micrometres (0.2-20 um, e.g. 0.665 for red)")
    return values


def label_lut(label_map: Mapping | None, ignore_index: int) -> np.ndarray:
    """Dense int32 table: identity, with `label_map` entries applied (raw code -> train id)."""
    label_map = {int(k): int(v) for k, v in (label_map or {}).items()}
    size = max([256, ignore_index + 1] + [k + 1 for k in label_map])
    lut = np.arange(size, dtype=np.int32)
    for raw, train_id in label_map.items():
        if raw < 0:
            raise DataError(f"config.data.label_map: raw code {raw} is negative")
        lut[raw] = train_id
    return lut


def per_band(values, what: str, num_bands: int, *, positive: bool = False) -> np.ndarray:
    """float32 [num_bands]: one value per selected band (mean, std, ...); `what` names them."""
    values = np.asarray(values, np.float32).reshape(-1)
    if values.size != num_bands:
        raise DataError(f"{what} has {values.size} values for {num_bands} selected bands")
    if positive and np.any(values <= 0):
        raise DataError(f"{what} {values.tolist()} must be positive")
    return values


def _per_band(config, key, num_bands, default, *, positive: bool = False):
    return per_band(_get(config, key, default), f"config.data.{key}", num_bands,
                    positive=positive)


def _photometric(config, num_bands: int) -> PhotometricSpec:
    if config is None:
        return PhotometricSpec()
    fields = {f.name for f in dataclasses.fields(PhotometricSpec)}
    values = {k: _to_plain(v) for k, v in _to_plain(config).items()}
    unknown = set(values) - fields
    if unknown:
        raise DataError(f"config.data.augment.photometric: unknown keys {sorted(unknown)}; "
                        f"known: {sorted(fields)}")
    for key in ("contrast_range", "saturation_range", "value_range", "bands"):
        if values.get(key) is not None:
            values[key] = tuple(values[key])
    spec = PhotometricSpec(**values)
    if spec.bands is not None and any(not 0 <= b < num_bands for b in spec.bands):
        raise DataError(f"config.data.augment.photometric.bands {spec.bands} must index the "
                        f"{num_bands} selected bands")
    return spec


def _augment(config, num_bands: int) -> AugmentSpec:
    if config is None:
        return AugmentSpec()
    fields = {f.name for f in dataclasses.fields(AugmentSpec)}
    values = dict(_to_plain(config))
    unknown = set(values) - fields
    if unknown:
        raise DataError(f"config.data.augment: unknown keys {sorted(unknown)}; known: "
                        f"{sorted(fields)}")
    photometric = _photometric(values.pop("photometric", None), num_bands)
    for key in ("short_edges", "ratio_range"):
        if values.get(key) is not None:
            values[key] = tuple(values[key])
    spec = AugmentSpec(**values, photometric=photometric)
    if spec.short_edges is not None and spec.ratio_range is not None:
        raise DataError("config.data.augment: set short_edges or ratio_range, not both")
    if not 0.0 < spec.cat_max_ratio <= 1.0:
        raise DataError(f"config.data.augment.cat_max_ratio {spec.cat_max_ratio} must be in "
                        "(0, 1]")
    return spec


def dataset_spec(config: Any) -> DatasetSpec:
    """Checks `config.data` and returns the frozen spec; a bad key raises `DataError`."""
    if isinstance(config, DatasetSpec):
        return config
    if config is None:
        raise DataError("config.data is missing")
    _check_keys(config, FIELDS, "data")
    for key in ("name", "root", "layout", "splits", "bands", "num_classes"):
        if _get(config, key) is None:
            raise DataError(f"config.data.{key} is missing")
    fmt = _get(config, "format", "geotiff")
    if fmt not in IMAGE_FORMATS:
        raise DataError(f"config.data.format {fmt!r} is not one of {IMAGE_FORMATS}")
    layout = config.layout
    _check_keys(layout, LAYOUT_FIELDS, "data.layout")
    for key in ("label_pattern", "label_replace"):
        if _get(layout, key) is None:
            raise DataError(f"config.data.layout.{key} is missing")

    names = tuple(_get(config, "band_names", ()))
    indices = resolve_bands(list(config.bands), names)
    selected_names = tuple(names[i] if names else f"band{i}" for i in indices)
    num_bands = len(indices)

    rgb = _get(config, "rgb_bands")
    if rgb is not None:
        rgb = tuple(int(b) for b in rgb)
        if len(rgb) != 3 or any(not 0 <= b < num_bands for b in rgb):
            raise DataError(f"config.data.rgb_bands {list(rgb)} must be 3 positions among the "
                            f"{num_bands} selected bands")

    num_classes = int(config.num_classes)
    class_names = tuple(_get(config, "class_names", [f"class{i}" for i in range(num_classes)]))
    if len(class_names) != num_classes:
        raise DataError(f"config.data.class_names has {len(class_names)} names for "
                        f"num_classes={num_classes}")
    palette = tuple(tuple(int(c) for c in rgb_) for rgb_ in _get(config, "palette", ()))
    if palette and len(palette) != num_classes:
        raise DataError(f"config.data.palette has {len(palette)} colours for "
                        f"num_classes={num_classes}")
    ignore_index = int(_get(config, "ignore_index", 255))

    splits = {}
    for split, split_cfg in _to_plain(config.splits).items():
        if isinstance(split_cfg, str):
            split_cfg = {"glob": split_cfg}
        _check_keys(split_cfg, SPLIT_FIELDS, f"data.splits.{split}")
        if not split_cfg.get("glob"):
            raise DataError(f"config.data.splits.{split}.glob is missing")
        # None, empty, or None given on the command line (which ml_collections turns into
        # (None,) for a tuple field): every domain.
        domains = split_cfg.get("domains")
        domains = (domains,) if isinstance(domains, str) else tuple(domains or ())
        domains = tuple(str(d) for d in domains if d not in (None, "", "None"))
        splits[split] = SplitSpec(split_cfg["glob"], domains or None)

    std = _per_band(config, "std", num_bands, [1.0] * num_bands, positive=True)
    layout_kind = _get(config, "array_layout", "HWC")
    if layout_kind not in ("HWC", "CHW"):
        raise DataError(f"config.data.array_layout {layout_kind!r} must be 'HWC' or 'CHW'")
    crop = _get(config, "crop_size", (512, 512))
    crop = (int(crop), int(crop)) if np.isscalar(crop) else tuple(int(c) for c in crop)
    nodata = _get(config, "nodata")

    return DatasetSpec(
        name=str(config.name),
        format=fmt,
        root=str(config.root),
        label_pattern=layout.label_pattern,
        label_replace=layout.label_replace,
        domain_pattern=_get(layout, "domain_pattern"),
        splits=splits,
        band_indices=indices,
        band_names=selected_names,
        file_band_count=len(names) or None,
        wavelengths=check_wavelengths(_get(config, "wavelengths"), num_bands),
        rgb_bands=rgb,
        dtype=_get(config, "dtype"),
        value_scale=float(_get(config, "value_scale", 1.0)),
        nodata=None if nodata is None else float(nodata),
        num_classes=num_classes,
        class_names=class_names,
        palette=palette,
        ignore_index=ignore_index,
        label_lut=label_lut(_to_plain(_get(config, "label_map")), ignore_index),
        mean=_per_band(config, "mean", num_bands, [0.0] * num_bands),
        std=std,
        crop_size=crop,
        augment=_augment(_get(config, "augment"), num_bands),
        array_layout=layout_kind,
        hdf5_image_key=_get(config, "hdf5_image_key", "image"),
        hdf5_label_key=_get(config, "hdf5_label_key", "label"),
        tfds_data_dir=_get(config, "tfds_data_dir", ""),
        num_workers=int(_get(config, "num_workers", 0)),
        value_range=None if _get(config, "value_range") is None
        else tuple(float(v) for v in _get(config, "value_range")),
    )
