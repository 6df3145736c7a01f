"""Random-access sources (grain's `RandomAccessDataSource` protocol: `__len__`, `__getitem__`).

Each element is `{"image": float32 [H, W, C], "label": int32 [H, W], "name": str,
"domain": str}`: the selected bands divided by `value_scale`, labels mapped to train ids with
255 (ignore) at nodata pixels, whose image values are set to the band mean (0 once normalised,
like padding). `TileSource` reads files; `tfds_builders.TfdsSource` reads the ArrayRecord
shards written from them, and both share `finalize`, so they return identical elements.
"""

from __future__ import annotations

import numpy as np

from spectralmoe_jax.data import layout, readers
from spectralmoe_jax.data.spec import DataError, DatasetSpec, dataset_spec

def finalize(image: np.ndarray, label: np.ndarray, nodata: np.ndarray | None,
             spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
    """Raw selected bands and remapped labels -> (float32 scaled image, int32 label)."""
    image = image.astype(np.float32)
    if spec.value_scale != 1.0:
        image /= np.float32(spec.value_scale)
    label = label.astype(np.int32, copy=False)
    if nodata is not None:
        image[nodata] = spec.mean
        label = np.where(nodata, spec.ignore_index, label).astype(np.int32)
    return image, label


class TileSource:
    """The tiles of one split of `config.data`, read from their files."""

    def __init__(self, config, split: str):
        self.spec = dataset_spec(config)
        self.split = split
        self.tiles = layout.list_tiles(self.spec, split)

    def __len__(self) -> int:
        return len(self.tiles)

    def __repr__(self) -> str:
        return f"TileSource({self.spec.name!r}, split={self.split!r}, {len(self)} tiles)"

    @property
    def domains(self) -> list[str]:
        """The domain of every tile, in index order (per-domain evaluation)."""
        return [t.domain for t in self.tiles]

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tiles]

    def read_raw(self, index: int) -> dict:
        """Selected bands in the file dtype, remapped int32 labels, nodata mask (or None)."""
        tile = self.tiles[index]
        image, nodata = readers.read_image(tile.image_path, self.spec)
        label = self.spec.remap_labels(readers.read_label(tile.label_path, self.spec))
        if image.shape[:2] != label.shape:
            raise DataError(f"{tile.image_path}: image is {image.shape[0]}x{image.shape[1]} but "
                            f"its label {tile.label_path} is {label.shape[0]}x{label.shape[1]}")
        return {"image": image, "label": label, "nodata": nodata, "name": tile.name,
                "domain": tile.domain}

    def __getitem__(self, index: int) -> dict:
        """The element; a label value outside the classes is a `DataError` naming the file."""
        raw = self.read_raw(int(index))
        self.spec.check_labels(raw["label"], self.tiles[int(index)].label_path)
        image, label = finalize(raw["image"], raw["label"], raw["nodata"], self.spec)
        return {"image": image, "label": label, "name": raw["name"], "domain": raw["domain"]}

    def path(self, index: int) -> str:
        return self.tiles[index].image_path

    def profile(self, index: int) -> dict | None:
        """The rasterio profile of the tile (crs, transform, ...), None for non-GeoTIFF tiles."""
        return readers.read_profile(self.tiles[index].image_path)
