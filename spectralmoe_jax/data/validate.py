"""Find bad input before training: every problem of a dataset, each naming its file.

Checks the config (bands, wavelengths, classes), the folders (missing root, a split glob
matching nothing, labels or domains that cannot be derived from a path, duplicate names) and
every tile: missing label, wrong band count, unexpected dtype, image/label size mismatch,
corrupt or truncated file, label values outside the class set after `label_map`. Only reads.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import math
import os

import numpy as np

from spectralmoe_jax.data import layout, readers
from spectralmoe_jax.data.spec import DataError, DatasetSpec, dataset_spec


@dataclasses.dataclass
class ValidationReport:
    name: str
    tiles: dict[str, int] = dataclasses.field(default_factory=dict)       # split -> count
    domains: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        lines = [f"dataset {self.name!r}: "
                 + (", ".join(f"{split} {n} tiles" for split, n in self.tiles.items()) or
                    "no tiles")]
        for split, counts in self.domains.items():
            if counts:
                    lines.append(f"  {split} domains: "
                             + ", ".join(f"{d} ({n})" for d, n in counts.items()))
        if self.problems:
            lines.append(f"{len(self.problems)} problem(s):")
            lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


def _missing_label(tile: layout.Tile) -> list[str]:
    if os.path.exists(tile.label_path):
        return []
    return [f"{tile.label_path}: label file is missing (for image {tile.image_path})"]


def _check_tile(tile: layout.Tile, spec: DatasetSpec, read_pixels: bool) -> list[str]:
    """Every problem of one image/label pair."""
    problems = _missing_label(tile)
    image_info = label_info = None
    try:
        image_info = readers.raster_info(tile.image_path, spec)
        readers.check_band_count(tile.image_path, image_info.count, spec)
        if spec.dtype is not None and image_info.dtype != spec.dtype:
            problems.append(f"{tile.image_path}: image dtype is {image_info.dtype}, config "
                            f"expects {spec.dtype} (config.data.dtype; value_scale "
                            f"{spec.value_scale:g} assumes it)")
        if read_pixels:
            readers.read_image(tile.image_path, spec)
    except DataError as e:
        problems.append(str(e))
    if os.path.exists(tile.label_path):
        try:
            label_info = readers.raster_info(tile.label_path, spec, label=True)
            if read_pixels:
                labels = spec.remap_labels(readers.read_label(tile.label_path, spec))
                values = np.unique(labels)
                bad = values[((values < 0) | (values >= spec.num_classes))
                             & (values != spec.ignore_index)]
                if bad.size:
                    problems.append(
                        f"{tile.label_path}: label values {bad[:20].tolist()} are outside the "
                        f"classes 0..{spec.num_classes - 1} and ignore {spec.ignore_index} "
                        "after config.data.label_map")
        except DataError as e:
            problems.append(str(e))
    if image_info is not None and label_info is not None and \
            (image_info.height, image_info.width) != (label_info.height, label_info.width):
        problems.append(f"{tile.image_path}: image is {image_info.height}x{image_info.width} "
                        f"but its label {tile.label_path} is "
                        f"{label_info.height}x{label_info.width}")
    return problems


def _list_split(spec: DatasetSpec, split: str, report: ValidationReport) -> list[layout.Tile]:
    known_problems = len(report.problems)
    try:
        relatives = layout.list_image_paths(spec, split)
    except DataError as e:
        report.problems.append(str(e))
        return []
    tiles = []
    for relative in relatives:
        try:
            tiles.append(layout.tile_for(spec, relative, split))
        except DataError as e:
            report.problems.append(str(e))
    try:
        tiles = layout.keep_tiles(spec, split, tiles)
    except DataError as e:
        report.problems.append(str(e))
        return []
    if not tiles and len(report.problems) == known_problems:
        report.problems.append(str(layout.no_tiles_error(spec, split)))
    names = collections.Counter(t.name for t in tiles)
    for name, count in names.items():
        if count > 1:
            report.problems.append(f"{spec.root}: {count} images of split {split!r} are named "
                                   f"{name!r} (names must be unique: predictions use them)")
    return tiles


def _validate_tfds(spec: DatasetSpec, splits, report: ValidationReport) -> None:
    from spectralmoe_jax.data.tfds_builders import TfdsSource
    for split in splits:
        try:
            source = TfdsSource(spec, split)
            report.tiles[split] = len(source)
            report.domains[split] = dict(collections.Counter(source.domains))
            bands = source.read_raw(0)["image"].shape[-1]
            if bands != spec.num_bands:
                report.problems.append(f"{spec.tfds_data_dir}: split {split!r} holds {bands} "
                                       f"bands, config selects {spec.num_bands}")
        except (DataError, IndexError) as e:
            report.problems.append(f"{spec.tfds_data_dir}: split {split!r}: {e}")


def validate_dataset(data_config, splits=None, *, read_pixels: bool = True,
                     max_tiles: int | None = None, num_threads: int = 2,
                     raise_errors: bool = True) -> ValidationReport:
    """Checks `config.data` and its files; raises `DataError` listing every problem found.

    splits: the splits to check (default: all of `config.data.splits`). read_pixels=False
    reads headers only (fast; misses truncated pixel data and bad label values). max_tiles
    opens only that many evenly spaced tiles per split (every label's existence is still
    checked): a quick check before a long run. With `config.data.tfds_data_dir` set, checks
    the ArrayRecord dataset instead of the files.
    """
    try:
        spec = dataset_spec(data_config)
    except DataError as e:
        report = ValidationReport(name=str(data_config.get("name", "?")), problems=[str(e)])
    else:
        report = ValidationReport(name=spec.name)
        splits = list(spec.splits) if splits is None else list(splits)
        if spec.tfds_data_dir:
            _validate_tfds(spec, splits, report)
        else:
            for split in splits:
                if split not in spec.splits:
                    report.problems.append(f"config.data.splits has no split {split!r}; it "
                                           f"has {sorted(spec.splits)}")
                    continue
                tiles = _list_split(spec, split, report)
                report.tiles[split] = len(tiles)
                report.domains[split] = dict(collections.Counter(t.domain for t in tiles))
                step = 1 if max_tiles is None else max(1, math.ceil(len(tiles) / max_tiles))

                def check(index: int) -> list[str]:
                    if index % step:
                        return _missing_label(tiles[index])
                    return _check_tile(tiles[index], spec, read_pixels)

                with concurrent.futures.ThreadPoolExecutor(max(num_threads, 1)) as pool:
                    for problems in pool.map(check, range(len(tiles))):
                        report.problems.extend(problems)
    if raise_errors and report.problems:
        raise DataError(str(report))
    return report
