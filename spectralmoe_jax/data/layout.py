"""Folder layouts: which files form a split, which label goes with which image, which domain.

One mechanism covers every layout: a glob per split lists the images, a regex substitution on
the image's path (relative to the root) gives its label, and a regex gives its domain.

The released code's layout, `root/{source_dir|target_dir}/{image,label}/NAME.ext`:
  splits.train.glob = 'source_dir/image/*.tif'
  label_pattern = r'^(.*)image/([^/]+)\\.tif$', label_replace = r'\\1label/\\2.png'
  domain_pattern = r'^([^/]+)/'                  (the split folder is the domain)

Paired files in one folder (FLAIR style, `D055_2018_IMG_036294_aerial.tif` + `..._mask.tif`):
  splits.train.glob = '*_aerial.tif', splits.train.domains = ['D055_2018', ...]
  label_pattern = r'_aerial\\.tif$', label_replace = '_mask.tif'
  domain_pattern = r'^(D\\d{3}_\\d{4})_'
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re

from spectralmoe_jax.data.spec import DataError, DatasetSpec


@dataclasses.dataclass(frozen=True)
class Tile:
    image_path: str
    label_path: str
    name: str       # the image file name without extension
    domain: str


def tile_name(relative_path: str) -> str:
    return os.path.splitext(os.path.basename(relative_path))[0]


def label_path_for(spec: DatasetSpec, relative_image_path: str) -> str:
    relative, count = re.subn(spec.label_pattern, spec.label_replace, relative_image_path)
    if count == 0:
        raise DataError(f"{os.path.join(spec.root, relative_image_path)}: "
                        f"config.data.layout.label_pattern {spec.label_pattern!r} does not match "
                        "this image path, so its label cannot be found")
    return os.path.join(spec.root, relative)


def domain_of(spec: DatasetSpec, relative_image_path: str, split: str) -> str:
    if spec.domain_pattern is None:
        return split
    match = re.search(spec.domain_pattern, relative_image_path)
    if match is None:
        raise DataError(f"{os.path.join(spec.root, relative_image_path)}: "
                        f"config.data.layout.domain_pattern {spec.domain_pattern!r} does not "
                        "match this image path")
    # The first group that took part in the match (patterns may have alternatives).
    return next((g for g in match.groups() if g is not None), match.group(0))


def list_image_paths(spec: DatasetSpec, split: str) -> list[str]:
    """Sorted image paths relative to the root; raises if the split, root or folder is absent."""
    if split not in spec.splits:
        raise DataError(f"config.data.splits has no split {split!r}; it has "
                        f"{sorted(spec.splits)}")
    if not os.path.isdir(spec.root):
        raise DataError(f"{spec.root}: config.data.root is not a folder")
    pattern = os.path.join(spec.root, spec.splits[split].glob)
    paths = glob.glob(pattern, recursive=True)
    return sorted(os.path.relpath(p, spec.root) for p in paths if os.path.isfile(p))


def tile_for(spec: DatasetSpec, relative_image_path: str, split: str) -> Tile:
    return Tile(os.path.join(spec.root, relative_image_path),
                label_path_for(spec, relative_image_path), tile_name(relative_image_path),
                domain_of(spec, relative_image_path, split))


def no_tiles_error(spec: DatasetSpec, split: str) -> DataError:
    wanted = spec.splits[split].domains
    where = os.path.join(spec.root, spec.splits[split].glob)
    extra = f" in domains {list(wanted)}" if wanted else ""
    return DataError(f"{where}: no images for split {split!r}{extra} (empty or missing folder, "
                     "or a glob that matches nothing)")


def list_tiles(spec: DatasetSpec, split: str) -> list[Tile]:
    """The split's tiles in a fixed (sorted) order, filtered by `splits.<split>.domains`."""
    tiles = [tile_for(spec, relative, split) for relative in list_image_paths(spec, split)]
    wanted = spec.splits[split].domains
    tiles = [t for t in tiles if wanted is None or t.domain in wanted]
    if not tiles:
        raise no_tiles_error(spec, split)
    return tiles
