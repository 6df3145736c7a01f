"""Find bad input before training: every problem of a dataset, each naming its file.

Checks the config (bands, wavelengths, classes), the folders (missing root, a split glob
matching nothing, labels or domains that cannot be derived from a path, duplicate names) and
every tile: missing label, wrong band count, unexpected dtype, an image and its label that
disagree on size, transform or CRS, corrupt or truncated file, label values outside the class
set after `label_map`. Tiles in different CRSs are legal: the report lists each domain's. Only
reads.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import math
import os
import re

import numpy as np

from spectralmoe_jax.data import layout, readers
from spectralmoe_jax.data.spec import DataError, DatasetSpec, dataset_spec


@dataclasses.dataclass
class ValidationReport:
    name: str
    tiles: dict[str, int] = dataclasses.field(default_factory=dict)       # split -> count
    domains: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    # split -> domain -> {CRS name: tiles}, for the georeferenced tiles whose headers were read
    crs: dict[str, dict[str, dict[str, int]]] = dataclasses.field(default_factory=dict)
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def one_line(self, limit: int = 3) -> str:
        """The problems on one line: the first `limit`, and how many more."""
        shown = "; ".join(self.problems[:limit])
        more = len(self.problems) - limit
        return (f"{len(self.problems)} problem(s) in dataset {self.name!r}: {shown}"
                + (f"; and {more} more" if more > 0 else ""))

    def __str__(self) -> str:
        lines = [f"dataset {self.name!r}: "
                 + (", ".join(f"{split} {n} tiles" for split, n in self.tiles.items()) or
                    "no tiles")]
        for split, counts in self.domains.items():
            if counts:
                lines.append(f"  {split} domains: "
                             + ", ".join(f"{d} ({n})" for d, n in counts.items()))
        for split, by_domain in self.crs.items():
            if by_domain:
                lines.append(f"  {split} CRS: " + "; ".join(
                    f"{d} " + ", ".join(f"{c} ({n})" for c, n in crss.items())
                    for d, crss in by_domain.items()))
        if self.problems:
            lines.append(f"{len(self.problems)} problem(s):")
            lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


def _missing_label(tile: layout.Tile) -> list[str]:
    if os.path.exists(tile.label_path):
        return []
    return [f"{tile.label_path}: label file is missing (for image {tile.image_path})"]


@functools.lru_cache(maxsize=64)
def crs_name(wkt: str | None) -> str:
    """'EPSG:2154', else the CRS's own name from its WKT."""
    if not wkt:
        return "none"
    from rasterio.crs import CRS

    crs = CRS.from_wkt(wkt)
    epsg = crs.to_epsg()
    if epsg is not None:
        return f"EPSG:{epsg}"
    match = re.match(r'\s*\w+\["([^"]*)"', wkt)
    return match.group(1) if match else wkt[:60]


@functools.lru_cache(maxsize=64)
def _same_crs(image_wkt: str, label_wkt: str) -> bool:
    """A label in a local (engineering) CRS named as its image's CRS, as FLAIR's masks are,
    counts as the same: labelling tools often drop the projection's definition."""
    from rasterio.crs import CRS

    image, label = CRS.from_wkt(image_wkt), CRS.from_wkt(label_wkt)
    if image == label:
        return True
    if not (label.is_projected or label.is_geographic):
        names = [re.match(r'\s*\w+\["([^"]*)"', w) for w in (image_wkt, label_wkt)]
        return all(names) and names[0].group(1) == names[1].group(1)
    return False


def _same_grid(image: tuple[float, ...], label: tuple[float, ...]) -> bool:
    """Equal affine transforms: pixel sizes to 1e-6, origins to a hundredth of a pixel."""
    pixel = max(abs(v) for v in image[:2] + image[3:5]) or 1.0
    scale = np.array(image[:2] + image[3:5]) - np.array(label[:2] + label[3:5])
    origin = np.array((image[2], image[5])) - np.array((label[2], label[5]))
    return bool(np.all(np.abs(scale) <= 1e-6 * pixel) and np.all(np.abs(origin) <= 1e-2 * pixel))


def _compare_georeferencing(tile: layout.Tile, image, label) -> list[str]:
    """An image and its label must cover the same ground: size, transform and CRS."""
    if (image.height, image.width) != (label.height, label.width):
        return [f"{tile.image_path}: image is {image.height}x{image.width} but its label "
                f"{tile.label_path} is {label.height}x{label.width}"]
    problems = []
    if image.crs and label.crs and not _same_crs(image.crs, label.crs):
        problems.append(f"{tile.image_path}: image CRS is {crs_name(image.crs)} but its label "
                        f"{tile.label_path} is in {crs_name(label.crs)}")
    if image.transform and label.transform and not _same_grid(image.transform, label.transform):
        problems.append(f"{tile.image_path}: image and its label {tile.label_path} have "
                        f"different transforms (pixel grid {_grid(image.transform)} vs "
                        f"{_grid(label.transform)}): they do not cover the same ground")
    return problems


def _grid(transform) -> str:
    a, b, c, d, e, f = transform
    return f"origin ({c:g}, {f:g}), pixel ({a:g}, {e:g})"


def _check_tile(tile: layout.Tile, spec: DatasetSpec, read_pixels: bool
                ) -> tuple[list[str], str | None]:
    """Every problem of one image/label pair, and the image's CRS (WKT) if it has one.

    Without `read_pixels`, the headers are read and the cheap part of each file decoded that
    shows truncation (readers.raster_info's probe)."""
    problems = _missing_label(tile)
    image_info = label_info = None
    try:
        image_info = readers.raster_info(tile.image_path, spec, probe=not read_pixels)
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
            label_info = readers.raster_info(tile.label_path, spec, label=True,
                                             probe=not read_pixels)
            if read_pixels:
                labels = spec.remap_labels(readers.read_label(tile.label_path, spec))
                spec.check_labels(labels, tile.label_path)
        except DataError as e:
            problems.append(str(e))
    if image_info is not None and label_info is not None:
        problems += _compare_georeferencing(tile, image_info, label_info)
    return problems, image_info.crs if image_info is not None else None


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
    reads headers and decodes only what shows a truncated file (fast; misses corrupt pixel
    data inside a file of the right length, and bad label values, which the input pipeline
    checks as it reads each tile). max_tiles
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

                def check(index: int) -> tuple[list[str], str | None]:
                    if index % step:
                        return _missing_label(tiles[index]), None
                    return _check_tile(tiles[index], spec, read_pixels)

                crs = report.crs.setdefault(split, {})
                with concurrent.futures.ThreadPoolExecutor(max(num_threads, 1)) as pool:
                    for tile, (problems, wkt) in zip(tiles, pool.map(check, range(len(tiles)))):
                        report.problems.extend(problems)
                        if wkt:
                            counts = crs.setdefault(tile.domain, {})
                            counts[crs_name(wkt)] = counts.get(crs_name(wkt), 0) + 1
    if raise_errors and report.problems:
        raise DataError(str(report))
    return report
