"""Folder layouts: which files form a split, which label goes with which image, which domain.

One mechanism covers every layout: a glob per split lists the images, a regex substitution on
the image's path (relative to the root) gives its label, and a regex gives its domain. The
`layout.kind` shorthands build the substitution (`spec.label_rule`):

mmseg's folders (Potsdam, Vaihingen, LoveDA converted by mmseg's scripts), `img_dir/train/*.png`
with labels `ann_dir/train/*.png`:
  layout.kind = 'folders', layout.image_dir = 'img_dir', layout.label_dir = 'ann_dir'
  splits.source.glob = 'img_dir/train/*.png', splits.target.glob = 'img_dir/val/*.png'

The released code's layout, `root/{source_dir|target_dir}/{image,label}/NAME.ext`:
  splits.source.glob = 'source_dir/image/*.tif'
  layout.label_pattern = r'^(.*)image/([^/]+)\\.tif$', layout.label_replace = r'\\1label/\\2.png'
  layout.domain_pattern = r'([^/]+)/image/'       (the folder holding image/ is the domain)

Paired files in one folder (FLAIR style, `D055_2018_IMG_036294_aerial.tif` + `..._mask.tif`):
  layout.kind = 'pairs', layout.image_suffix = '_aerial.tif', layout.label_suffix = '_mask.tif'
  splits.source.glob = '*_aerial.tif', splits.source.domains = ('D055_2018', ...)
  layout.domain_pattern = r'^(D\\d{3}_\\d{4})_'

Label and bands in one HDF5 file per tile, splits named in a file (geo-bench):
  layout.kind = 'same_file', splits.source.glob = '*.hdf5',
  splits.source.names_file = 'default_partition.json', splits.source.names_key = 'train'
"""

from __future__ import annotations

import dataclasses
import glob
import json
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
        raise DataError(f"config.data.splits has no split {split!r} (or its glob is empty); "
                        f"it has {sorted(spec.splits) or 'none'}: set "
                        f"--config.data.splits.{split}.glob")
    if not spec.root:
        raise DataError("config.data.root is not set: --config.data.root=/path/to/the/tiles")
    if not os.path.isdir(spec.root):
        raise DataError(f"{spec.root}: config.data.root is not a folder")
    pattern = os.path.join(spec.root, spec.splits[split].glob)
    paths = glob.glob(pattern, recursive=True)
    return sorted(os.path.relpath(p, spec.root) for p in paths if os.path.isfile(p))


def tile_for(spec: DatasetSpec, relative_image_path: str, split: str) -> Tile:
    return Tile(os.path.join(spec.root, relative_image_path),
                label_path_for(spec, relative_image_path), tile_name(relative_image_path),
                domain_of(spec, relative_image_path, split))


def _names_in(path: str, key: str) -> frozenset[str]:
    if not os.path.isfile(path):
        raise DataError(f"{path}: the split's names_file (config.data.splits.*.names_file) "
                        "does not exist")
    with open(path) as f:
        if not path.endswith(".json"):
            return frozenset(line.strip() for line in f if line.strip())
        try:
            names = json.load(f)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: not valid JSON: {error}") from error
    if isinstance(names, dict):
        if key not in names:
            raise DataError(f"{path}: no list {key!r} (config.data.splits.*.names_key); it has "
                            f"{sorted(names)}")
        names = names[key]
    if not isinstance(names, list):
        raise DataError(f"{path}: expected a list of tile names under {key!r}")
    return frozenset(str(n) for n in names)


def keep_tiles(spec: DatasetSpec, split: str, tiles: list[Tile]) -> list[Tile]:
    """The tiles of `split.domains` (all when None) named in `split.names_file` (all when
    unset)."""
    wanted = spec.splits[split]
    if wanted.domains is not None:
        tiles = [t for t in tiles if t.domain in wanted.domains]
    if wanted.names_file:
        names = _names_in(os.path.join(spec.root, wanted.names_file), wanted.names_key or split)
        tiles = [t for t in tiles if t.name in names]
    return tiles


def no_tiles_error(spec: DatasetSpec, split: str) -> DataError:
    wanted = spec.splits[split]
    where = os.path.join(spec.root, wanted.glob)
    extra = f" in domains {list(wanted.domains)}" if wanted.domains else ""
    if wanted.names_file:
        extra += f" named in {wanted.names_file}"
    return DataError(f"{where}: no images for split {split!r}{extra} (empty or missing folder, "
                     "or a glob that matches nothing)")


def list_tiles(spec: DatasetSpec, split: str) -> list[Tile]:
    """The split's tiles in a fixed (sorted) order, filtered by `keep_tiles`."""
    tiles = [tile_for(spec, relative, split) for relative in list_image_paths(spec, split)]
    tiles = keep_tiles(spec, split, tiles)
    if not tiles:
        raise no_tiles_error(spec, split)
    return tiles
