"""`config.data` checked once and frozen: what every reader, transform and builder consumes.

A dataset config (an `ml_collections.ConfigDict`: `configs/custom.py` for your own tiles,
`data/benchmarks.py` for the paper's) names the files, the bands, the value scaling, the
classes and the augmentation. Its keys and what each means are the tables below (`FIELDS`,
`LAYOUT_FIELDS`, `SPLIT_FIELDS`, and the dataclasses' comments for `augment`), which
`--mode config` prints beside the values.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from spectralmoe_jax.errors import UserError, unknown_key

IMAGE_FORMATS = ("geotiff", "image", "npy", "hdf5")
BAD_TILE_POLICIES = ("error", "skip")
LAYOUT_KINDS = ("regex", "folders", "pairs", "same_file")

# Every key of `config.data`, and what it means.
FIELDS = {
    "name": "dataset name (reports, summaries)",
    "format": "image files: 'geotiff' | 'image' (PNG/JPEG) | 'npy' | 'hdf5'; labels are read "
              "by their extension (.tif, .png, .npy, .h5 / .hdf5)",
    "root": "dataset root folder: split globs, label paths and names files are relative to it",
    "layout": "how an image's label and domain follow from its path (the layout keys)",
    "splits": "named splits: 'source' trains, eval.split is evaluated (the split keys)",
    "band_names": "names of the bands stored in the file, in file order (default with "
                  "hdf5_band_keys: those keys)",
    "bands": "selected bands in model order: 0-based file indices or band names",
    "wavelengths": "centre wavelength of each selected band in micrometres (DOFA needs them)",
    "rgb_bands": "positions of R, G, B among the selected bands (depth encoder, hue / "
                 "saturation jitter, colour views)",
    "dtype": "expected raw image dtype ('uint8', 'uint16', ...), None for any",
    "value_scale": "raw values are divided by it (10000 for reflectance stored x 10^4); mean "
                   "and std are in the divided units",
    "value_range": "(low, high) of raw float values, for the --mode stats histograms",
    "nodata": "image nodata value; None takes the GeoTIFF's own nodata tag",
    "num_classes": "number of classes; None: one per class name",
    "class_names": "class names in train-id order",
    "palette": "one (r, g, b) per class for maps and reports; empty: distinct generated colours",
    "ignore_index": "train id the loss and the metrics ignore",
    "reduce_zero_label": "mmseg's reduce_zero_label: code 0 is ignored, code k becomes train "
                         "id k - 1 (label_map entries apply on top)",
    "label_map": "raw code -> train id, a dict or ((code, id), ...) pairs; unlisted codes keep "
                 "their value",
    "mean": "per selected band, subtracted after augmentation (--mode stats prints it); "
            "None: train, eval and predict ask for it",
    "std": "per selected band, divides after the mean (--mode stats prints it)",
    "crop_size": "(h, w) of training crops; batches are padded to it",
    "augment": "training augmentation, in order: resize, crop, flip, photometric (the "
               "augment keys)",
    "array_layout": "'HWC' or 'CHW': axes of .npy and HDF5 image arrays",
    "hdf5_image_key": "HDF5 dataset holding the image array",
    "hdf5_band_keys": "HDF5 datasets holding one 2-D band each, stacked in this order "
                      "(geo-bench); when set, hdf5_image_key is not read",
    "hdf5_label_key": "HDF5 dataset holding the label map (in the image's own file with "
                      "layout.kind='same_file')",
    "tfds_data_dir": "'' reads the files; a folder reads the ArrayRecord shards written by "
                     "data/tfds_builders.py (the fast path)",
    "num_workers": "grain worker processes for training (0: threads in this process)",
    "on_bad_tile": "a tile unusable when the pipeline reads it (unreadable, label codes outside "
                   "the classes): 'error' stops the run naming the file; 'skip' logs it "
                   "(workdir/bad_tiles.txt in training, counted in the metrics) and uses the "
                   "next good tile in its place",
}
LAYOUT_FIELDS = {
    "kind": "'regex' (label_pattern / label_replace), 'folders' (image_dir -> label_dir, "
            "mmseg's img_dir / ann_dir), 'pairs' (image_suffix -> label_suffix in one folder), "
            "'same_file' (the label is in the image's file: HDF5)",
    "label_pattern": "kind 'regex': a regex on the image path relative to root ...",
    "label_replace": "... and its replacement (re.sub) giving the label path",
    "image_dir": "kind 'folders': the image folder's name in the path ('img_dir')",
    "label_dir": "kind 'folders': the label folder's name that replaces it ('ann_dir')",
    "image_suffix": "kinds 'folders' and 'pairs': how image file names end ('.png', "
                    "'_aerial.tif') ...",
    "label_suffix": "... and what label file names end with instead ('.png', '_mask.tif')",
    "domain_pattern": "regex searched in the relative path, its first group is the tile's "
                      "domain; None: the split's name",
}
SPLIT_FIELDS = {
    "glob": "the split's images, a glob relative to root ('**' allowed); empty: no such split",
    "domains": "keep only tiles of these domains; None or empty: every domain",
    "names_file": "a file (relative to root) naming the split's tiles (file names without "
                  "extension): .txt one a line, .json a list or {key: [names]}",
    "names_key": "the key of a .json names_file holding the list; None: the split's name "
                 "(geo-bench's default_partition.json: 'train', 'valid', 'test')",
}

class DataError(UserError, ValueError):
    """A dataset or its config is unusable; the message names the file or key and the problem."""


def _check_keys(section, known, where: str) -> None:
    for key in section:
        if key not in known:
            raise DataError(unknown_key(key, known, where))


@dataclasses.dataclass(frozen=True)
class SplitSpec:
    glob: str
    domains: tuple[str, ...] | None = None  # None: every domain
    names_file: str | None = None  # relative to root: the tile names the split keeps
    names_key: str | None = None  # the list's key in a .json names_file


@dataclasses.dataclass(frozen=True)
class PhotometricSpec:
    """mmseg `PhotoMetricDistortion`, generalised to C bands.

    Brightness (+delta) and contrast (x alpha) act on `bands` (None: all bands); the released
    multispectral version acts on the RGB bands only and leaves NIR untouched. Saturation and
    hue act in HSV space on the dataset's `rgb_bands` and are skipped without them.
    `value_range` is the clip range of the scaled values (mmseg clips to [0, 255]).
    """
    enabled: bool = False  # photometric distortion on or off
    brightness_delta: float = 32.0  # brightness + U(-delta, delta), in scaled units
    contrast_range: tuple[float, float] = (0.5, 1.5)  # contrast x U(low, high)
    saturation_range: tuple[float, float] = (0.5, 1.5)  # saturation x U(low, high)
    hue_delta: int = 18  # hue + U(-delta, delta) on OpenCV's 0..180 scale, as mmseg
    bands: tuple[int, ...] | None = None  # selected bands brightness and contrast act on; None: all
    value_range: tuple[float, float] | None = (0.0, 255.0)  # clip range of the scaled values


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
    """The released training augmentation, in order: resize, crop, flip, photometric.

    Resize (mmseg `RandomChoiceResize` + `ResizeShortestEdge`): the short edge becomes one of
    `short_edges`, or `base_size * U(ratio_range)`; the long edge is capped at `max_size`.
    Crop (mmseg `RandomCrop`): up to 10 re-draws while one class covers >= `cat_max_ratio`.
    """
    short_edges: tuple[int, ...] | None = None  # short edge drawn from these (or ratio_range)
    ratio_range: tuple[float, float] | None = None  # short edge base_size x U(low, high)
    base_size: int = 512  # the size ratio_range scales
    max_size: int | None = 1024  # cap on the long edge after resizing; None: no cap
    cat_max_ratio: float = 1.0  # crop re-drawn while one class covers this share (1: never)
    flip_prob: float = 0.5  # probability of a horizontal flip
    photometric: PhotometricSpec = PhotometricSpec()  # brightness, contrast, saturation, hue


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
    hdf5_band_keys: tuple[str, ...] = ()  # one 2-D dataset per file band, in file order
    normalization_given: bool = True     # mean and std set (else 0 and 1, and modes ask)
    num_workers: int = 0                 # grain worker processes for training
    value_range: tuple[float, float] | None = None  # raw value range of float images (stats)
    on_bad_tile: str = "error"           # 'error' | 'skip' (FIELDS)

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

    def bad_label_values(self, labels: np.ndarray) -> np.ndarray:
        """The train ids in `labels` (after `remap_labels`) that are neither a class nor the
        ignore index, sorted; empty for a good map. Two comparisons per pixel in the common
        case, cheap enough to run on every tile the pipeline reads."""
        bad = (labels >= self.num_classes) | (labels < 0)
        if not 0 <= self.ignore_index < self.num_classes:
            bad &= labels != self.ignore_index
        if not bad.any():
            return np.zeros((0,), labels.dtype)
        return np.unique(labels[bad])

    def check_labels(self, labels: np.ndarray, path: str) -> None:
        """A `DataError` naming `path` and the values when `labels` holds codes outside the
        classes and the ignore index."""
        bad = self.bad_label_values(labels)
        if bad.size:
            raise DataError(
                f"{path}: label values {bad[:20].tolist()} are outside the classes "
                f"0..{self.num_classes - 1} and ignore {self.ignore_index} after "
                "config.data.label_map")


def _get(config, key, default=None):
    """config[key], or `default` for None (and for (None,): `--config.data.x=None` on a tuple)."""
    value = config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)
    return default if value is None or (isinstance(value, tuple) and value == (None,)) else value


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


def label_map_entries(label_map, where: str = "config.data.label_map") -> dict[int, int]:
    """{raw code: train id} from a dict or from ((code, id), ...) pairs (what a command line
    can give: ml_collections cannot override a dict)."""
    value = _to_plain(label_map)
    if value is None:
        return {}
    items = value.items() if isinstance(value, Mapping) else list(value)
    try:
        pairs = [(int(code), int(train_id)) for code, train_id in items]
    except (TypeError, ValueError) as error:
        raise DataError(f"{where}: give {{code: train id}} or ((code, train id), ...) pairs of "
                        f"integers, got {value!r}") from error
    return dict(pairs)


def label_lut(label_map: Mapping | None, ignore_index: int, *,
              reduce_zero_label: bool = False) -> np.ndarray:
    """Dense int32 table raw code -> train id: identity (or mmseg's reduce_zero_label: 0 ->
    ignore, k -> k - 1, the ignore code kept), then the `label_map` entries."""
    label_map = label_map_entries(label_map)
    size = max([256, ignore_index + 1] + [k + 1 for k in label_map])
    lut = np.arange(size, dtype=np.int32)
    if reduce_zero_label:
        lut -= 1
        lut[0] = lut[ignore_index] = ignore_index
    for raw, train_id in label_map.items():
        if raw < 0:
            raise DataError(f"config.data.label_map: raw code {raw} is negative")
        lut[raw] = train_id
    return lut


def default_palette(num_colors: int) -> tuple[tuple[int, int, int], ...]:
    """Distinct colours, hues spaced by the golden ratio (for datasets that name none)."""
    import colorsys

    hues = (np.arange(num_colors) * 0.618033988749895) % 1.0
    colors = [colorsys.hsv_to_rgb(h, 0.75 if i % 2 else 0.95, 0.95 if i % 3 else 0.7)
              for i, h in enumerate(hues)]
    return tuple(tuple(int(round(c * 255)) for c in rgb) for rgb in colors)


def _literal(text: str) -> str:
    """`text` as a literal in a re.sub replacement."""
    return text.replace("\\", "\\\\")


def label_rule(layout) -> tuple[str, str]:
    """(regex, replacement) turning an image path (relative to root) into its label's, for
    every `layout.kind`: the kinds other than 'regex' are shorthands for such a pair."""
    kind = _get(layout, "kind", "regex")
    if kind not in LAYOUT_KINDS:
        raise DataError(f"config.data.layout.kind {kind!r} is not one of {LAYOUT_KINDS}")
    if kind == "regex":
        for key in ("label_pattern", "label_replace"):
            if _get(layout, key) is None:
                raise DataError(f"config.data.layout.{key} is missing (layout.kind 'regex'; "
                                f"or choose a kind of {LAYOUT_KINDS[1:]})")
        return layout.label_pattern, layout.label_replace
    if kind == "same_file":
        return "$", ""  # matches once, changes nothing: the image's own path
    image_suffix = _get(layout, "image_suffix", "")
    label_suffix = _get(layout, "label_suffix", image_suffix)
    if kind == "pairs":
        if not image_suffix or image_suffix == label_suffix:
            raise DataError("config.data.layout.kind 'pairs' needs image_suffix and a different "
                            "label_suffix (e.g. '_aerial.tif' and '_mask.tif'); got "
                            f"{image_suffix!r} and {label_suffix!r}")
        return re.escape(image_suffix) + "$", _literal(label_suffix)
    image_dir, label_dir = _get(layout, "image_dir"), _get(layout, "label_dir")
    if not image_dir or not label_dir or image_dir == label_dir:
        raise DataError("config.data.layout.kind 'folders' needs image_dir and a different "
                        "label_dir (mmseg: 'img_dir' and 'ann_dir'); got "
                        f"{image_dir!r} and {label_dir!r}")
    return (rf"^(.*/)?{re.escape(image_dir)}/(.*){re.escape(image_suffix)}$",
            rf"\g<1>{_literal(label_dir)}/\g<2>{_literal(label_suffix)}")


def _splits(config) -> dict[str, SplitSpec]:
    """The splits that have a glob: a config for evaluation or prediction only may leave the
    source (or every split) empty."""
    splits = {}
    for split, split_cfg in (_to_plain(_get(config, "splits", {})) or {}).items():
        if isinstance(split_cfg, str):
            split_cfg = {"glob": split_cfg}
        split_cfg = split_cfg or {}
        _check_keys(split_cfg, SPLIT_FIELDS, f"data.splits.{split}")
        if not split_cfg.get("glob"):
            continue
        # None, empty, or None given on the command line (which ml_collections turns into
        # (None,) for a tuple field): every domain.
        domains = split_cfg.get("domains")
        domains = (domains,) if isinstance(domains, str) else tuple(domains or ())
        domains = tuple(str(d) for d in domains if d not in (None, "", "None"))
        splits[split] = SplitSpec(split_cfg["glob"], domains or None,
                                  split_cfg.get("names_file") or None,
                                  split_cfg.get("names_key") or None)
    return splits


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


def _classes(config) -> tuple[int, tuple[str, ...], tuple]:
    """num_classes, class names and palette (one colour per class)."""
    names = _get(config, "class_names")
    num_classes = _get(config, "num_classes")
    if num_classes is None and names is None:
        raise DataError("config.data.class_names is missing: name the classes in train-id "
                        "order (--config.data.class_names=\"('background', 'building')\"), or "
                        "give config.data.num_classes")
    num_classes = len(names) if num_classes is None else int(num_classes)
    names = tuple(str(n) for n in (names or [f"class{i}" for i in range(num_classes)]))
    if len(names) != num_classes:
        raise DataError(f"config.data.class_names has {len(names)} names for "
                        f"num_classes={num_classes}")
    palette = tuple(tuple(int(c) for c in rgb) for rgb in _get(config, "palette", ()))
    if palette and len(palette) != num_classes:
        raise DataError(f"config.data.palette has {len(palette)} colours for "
                        f"num_classes={num_classes}")
    return num_classes, names, palette or default_palette(num_classes)


def dataset_spec(config: Any) -> DatasetSpec:
    """Checks `config.data` and returns the frozen spec; a bad key raises `DataError`.

    Nothing is read: a missing root or split is reported by what needs it (`layout.py`)."""
    if isinstance(config, DatasetSpec):
        return config
    if config is None:
        raise DataError("config.data is missing")
    _check_keys(config, FIELDS, "data")
    for key in ("name", "layout", "bands"):
        if _get(config, key) is None:
            raise DataError(f"config.data.{key} is missing")
    fmt = _get(config, "format", "geotiff")
    if fmt not in IMAGE_FORMATS:
        raise DataError(f"config.data.format {fmt!r} is not one of {IMAGE_FORMATS}")
    layout = config.layout
    _check_keys(layout, LAYOUT_FIELDS, "data.layout")
    label_pattern, label_replace = label_rule(layout)

    band_keys = tuple(str(k) for k in _get(config, "hdf5_band_keys", ()))
    names = tuple(_get(config, "band_names", band_keys))
    if band_keys and len(names) != len(band_keys):
        raise DataError(f"config.data.band_names {list(names)} name {len(names)} bands but "
                        f"config.data.hdf5_band_keys {list(band_keys)} reads {len(band_keys)}")
    indices = resolve_bands(list(config.bands), names)
    selected_names = tuple(names[i] if names else f"band{i}" for i in indices)
    num_bands = len(indices)

    rgb = _get(config, "rgb_bands")
    if rgb is not None:
        rgb = tuple(int(b) for b in rgb)
        if len(rgb) != 3 or any(not 0 <= b < num_bands for b in rgb):
            raise DataError(f"config.data.rgb_bands {list(rgb)} must be 3 positions among the "
                            f"{num_bands} selected bands")

    num_classes, class_names, palette = _classes(config)
    ignore_index = int(_get(config, "ignore_index", 255))
    std = _per_band(config, "std", num_bands, [1.0] * num_bands, positive=True)
    layout_kind = _get(config, "array_layout", "HWC")
    if layout_kind not in ("HWC", "CHW"):
        raise DataError(f"config.data.array_layout {layout_kind!r} must be 'HWC' or 'CHW'")
    crop = _get(config, "crop_size", (512, 512))
    crop = (int(crop), int(crop)) if np.isscalar(crop) else tuple(int(c) for c in crop)
    nodata = _get(config, "nodata")
    value_range = _get(config, "value_range")
    if value_range is not None:
        value_range = tuple(float(v) for v in value_range)
        if len(value_range) != 2 or not value_range[1] > value_range[0]:
            raise DataError(f"config.data.value_range {list(value_range)} must be (low, high) "
                            "with high > low")
    on_bad_tile = str(_get(config, "on_bad_tile", "error"))
    if on_bad_tile not in BAD_TILE_POLICIES:
        raise DataError(f"config.data.on_bad_tile {on_bad_tile!r} must be one of "
                        f"{BAD_TILE_POLICIES}")

    return DatasetSpec(
        name=str(config.name),
        format=fmt,
        root=str(_get(config, "root", "")),
        label_pattern=label_pattern,
        label_replace=label_replace,
        domain_pattern=_get(layout, "domain_pattern"),
        splits=_splits(config),
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
        label_lut=label_lut(_get(config, "label_map"), ignore_index,
                            reduce_zero_label=bool(_get(config, "reduce_zero_label", False))),
        mean=_per_band(config, "mean", num_bands, [0.0] * num_bands),
        std=std,
        crop_size=crop,
        augment=_augment(_get(config, "augment"), num_bands),
        array_layout=layout_kind,
        hdf5_image_key=_get(config, "hdf5_image_key", "image"),
        hdf5_label_key=_get(config, "hdf5_label_key", "label"),
        hdf5_band_keys=band_keys,
        normalization_given=_get(config, "mean") is not None and _get(config, "std") is not None,
        tfds_data_dir=_get(config, "tfds_data_dir", ""),
        num_workers=int(_get(config, "num_workers", 0)),
        value_range=value_range,
        on_bad_tile=on_bad_tile,
    )
