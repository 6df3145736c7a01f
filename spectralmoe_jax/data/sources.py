"""Random-access sources (grain's `RandomAccessDataSource` protocol: `__len__`, `__getitem__`).

Each element is `{"image": float32 [H, W, C], "label": int32 [H, W], "name": str,
"domain": str}`: the selected bands divided by `value_scale`, labels mapped to train ids with
255 (ignore) at nodata pixels, whose image values are set to the band mean (0 once normalised,
like padding). `TileSource` reads files, `TfdsSource` the ArrayRecord shards written by
`tfds_builders.py`; both share `finalize`, so they return identical elements.
"""

from __future__ import annotations

import json
import os

import numpy as np

from spectralmoe_jax.data import layout, readers
from spectralmoe_jax.data.spec import DataError, DatasetSpec, dataset_spec

TFDS_BUILDER_NAME = "spectral_segmentation"


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
        raw = self.read_raw(int(index))
        image, label = finalize(raw["image"], raw["label"], raw["nodata"], self.spec)
        return {"image": image, "label": label, "name": raw["name"], "domain": raw["domain"]}

    def path(self, index: int) -> str:
        return self.tiles[index].image_path

    def profile(self, index: int) -> dict | None:
        """The rasterio profile of the tile (crs, transform, ...), None for non-GeoTIFF tiles."""
        return readers.read_profile(self.tiles[index].image_path)


class TfdsSource:
    """The same elements read from ArrayRecord shards through `tfds.data_source`."""

    def __init__(self, config, split: str):
        import tensorflow_datasets as tfds  # slow to import: only on this path

        from spectralmoe_jax.data import tfds_builders  # registers the builder

        self.spec = dataset_spec(config)
        self.split = split
        data_dir = self.spec.tfds_data_dir
        if not os.path.isdir(data_dir):
            raise DataError(f"{data_dir}: config.data.tfds_data_dir is not a folder; write it "
                            "with spectralmoe_jax.data.tfds_builders.build")
        kwargs = tfds_builders.builder_kwargs(self.spec)
        try:
            builder = tfds.builder(TFDS_BUILDER_NAME, data_dir=data_dir, **kwargs)
            self._source = tfds.data_source(TFDS_BUILDER_NAME, split=split, data_dir=data_dir,
                                            download=False, builder_kwargs=kwargs)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{data_dir}: cannot read tfds dataset {TFDS_BUILDER_NAME}/"
                            f"{self.spec.name} split {split!r}: {e}") from e
        self._domains = list(builder.info.metadata["domains"][split])

    def __len__(self) -> int:
        return len(self._source)

    def __repr__(self) -> str:
        return f"TfdsSource({self.spec.name!r}, split={self.split!r}, {len(self)} tiles)"

    @property
    def domains(self) -> list[str]:
        return self._domains

    def read_raw(self, index: int) -> dict:
        record = self._source[int(index)]
        nodata = record["nodata"]
        return {"image": record["image"], "label": record["label"].astype(np.int32),
                "nodata": nodata if nodata.any() else None,
                "name": _text(record["name"]), "domain": _text(record["domain"]),
                "crs": _text(record["crs"]), "transform": _text(record["transform"])}

    def __getitem__(self, index: int) -> dict:
        raw = self.read_raw(index)
        image, label = finalize(raw["image"], raw["label"], raw["nodata"], self.spec)
        return {"image": image, "label": label, "name": raw["name"], "domain": raw["domain"]}

    def path(self, index: int) -> str:
        return ""

    def profile(self, index: int) -> dict | None:
        """crs and transform stored at build time (GeoTIFF tiles), else None."""
        raw = self.read_raw(index)
        if not raw["crs"]:
            return None
        from affine import Affine
        from rasterio.crs import CRS
        height, width = raw["label"].shape
        return {"driver": "GTiff", "crs": CRS.from_wkt(raw["crs"]),
                "transform": Affine(*json.loads(raw["transform"])), "height": height,
                "width": width}


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def make_source(config, split: str) -> TileSource | TfdsSource:
    """Files, or ArrayRecord shards when `config.data.tfds_data_dir` is set."""
    spec = dataset_spec(config)
    return TfdsSource(spec, split) if spec.tfds_data_dir else TileSource(spec, split)
