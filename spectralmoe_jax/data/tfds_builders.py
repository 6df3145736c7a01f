"""TensorFlow-datasets builder writing ArrayRecord shards: the fast input path for big runs.

One builder class, `SpectralSegmentation`, parameterised by a dataset definition: its builder
config carries a `config.data` (a benchmark of `benchmarks.py` or your own) and is named after
the dataset. It reads the manual download folder with the same sources as training
(`manual_dir` replaces `config.data.root`) and stores, per tile, what `TileSource.read_raw`
returns: the selected bands in the file's dtype, the labels after `label_map`, the nodata
mask, name, domain and the GeoTIFF's CRS and transform. Changing bands or `label_map` means
building again.
Reading back (`TfdsSource`, through `tfds.data_source` and `sources.finalize`) gives the same
elements as the files. Build once, then train with `--config.data.tfds_data_dir=DIR`:

    from spectralmoe_jax.data import benchmarks, tfds_builders
    tfds_builders.build(benchmarks.flair(), data_dir="/data/tfds", manual_dir="/data/FLAIR")

Tensorflow is not needed: tfds writes and reads ArrayRecord with NumPy.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from spectralmoe_jax.data import readers
from spectralmoe_jax.data.sources import TileSource, finalize
from spectralmoe_jax.data.spec import DataError, DatasetSpec, dataset_spec

TFDS_BUILDER_NAME = "spectral_segmentation"


def _spec(data: Any) -> DatasetSpec:
    if isinstance(data, dict):
        data = ml_collections.ConfigDict(data)
    return dataset_spec(data)


@dataclasses.dataclass(eq=False)
class SegmentationConfig(tfds.core.BuilderConfig):
    """A builder config holding a dataset definition (`config.data` as a dict, or its spec)."""
    data: Any = dataclasses.field(default=None, repr=False)


class SpectralSegmentation(tfds.core.GeneratorBasedBuilder):
    """Image / label tiles of a segmentation benchmark (see `data/benchmarks.py`)."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "Selected bands in the file dtype, remapped labels, nodata mask.",
                     "1.1.0": "The image file's path, for predicting the tiles as scenes."}
    # tfds looks its own source file up through the `importlib_resources` backport, which
    # Python >= 3.9 does not install; the file path is what that lookup returns anyway.
    code_path = epath.Path(__file__)
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download the benchmark yourself and arrange it as the docstring of its function in "
        "spectralmoe_jax/data/benchmarks.py describes; pass that folder as manual_dir.")

    def _info(self) -> tfds.core.DatasetInfo:
        spec = _spec(self.builder_config.data)
        if spec.dtype is None:
            raise DataError(f"config.data.dtype is needed to build {spec.name!r} with tfds "
                            "(the image dtype of the stored tiles)")
        small = spec.ignore_index <= 255 and spec.num_classes <= 255
        label_dtype = np.uint8 if small else np.int32
        zlib = "zlib"     # per-array compression; decoding stays in NumPy
        return self.dataset_info_from_configs(
            description=f"{spec.name}: bands {list(spec.band_names)}, "
                        f"{spec.num_classes} classes {list(spec.class_names)}",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(None, None, spec.num_bands),
                                              dtype=np.dtype(spec.dtype), encoding=zlib),
                "label": tfds.features.Tensor(shape=(None, None), dtype=label_dtype,
                                              encoding=zlib),
                "nodata": tfds.features.Tensor(shape=(None, None), dtype=np.bool_,
                                               encoding=zlib),
                "name": tfds.features.Text(),
                "domain": tfds.features.Text(),
                "path": tfds.features.Text(),          # the image file it was built from
                "crs": tfds.features.Text(),           # WKT, '' for non-GeoTIFF tiles
                # JSON of the 6 affine coefficients: tf.Example would round floats to float32.
                "transform": tfds.features.Text(),
            }),
            metadata=tfds.core.MetadataDict(),
            # Keep tile order, so index i is tile i of the file source.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        spec = dataclasses.replace(_spec(self.builder_config.data),
                                   root=str(dl_manager.manual_dir), tfds_data_dir="")
        sources = {split: TileSource(spec, split) for split in spec.splits}
        self.info.metadata["domains"] = {split: s.domains for split, s in sources.items()}
        return {split: self._generate_examples(source) for split, source in sources.items()}

    def _generate_examples(self, source: TileSource):
        label_dtype = self.info.features["label"].np_dtype
        for index in range(len(source)):
            raw = source.read_raw(index)
            label = raw["label"]
            if np.iinfo(label_dtype).max < label.max() or label.min() < 0:
                raise DataError(f"{source.tiles[index].label_path}: label values "
                                f"{np.unique(label)[:10].tolist()} do not fit {label_dtype}")
            profile = readers.read_profile(source.tiles[index].image_path) or {}
            crs, transform = profile.get("crs"), profile.get("transform")
            height, width = label.shape
            nodata = raw["nodata"]
            yield index, {
                "image": np.ascontiguousarray(raw["image"]),
                "label": label.astype(label_dtype),
                "nodata": np.zeros((height, width), bool) if nodata is None else nodata,
                "name": raw["name"],
                "domain": raw["domain"],
                "path": source.tiles[index].image_path,
                "crs": crs.to_wkt() if crs else "",
                "transform": json.dumps(list(transform)[:6]) if transform else "",
            }


def build(data_config, data_dir: str, *, manual_dir: str | None = None) -> SpectralSegmentation:
    """Writes every split of `data_config` as ArrayRecord shards under `data_dir`.

    `manual_dir` defaults to `data_config.root`. Returns the prepared builder.
    """
    data = data_config.to_dict() if hasattr(data_config, "to_dict") else dict(data_config)
    builder = SpectralSegmentation(config=SegmentationConfig(name=data["name"], data=data),
                                   data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=manual_dir or data["root"]))
    return builder


def builder_kwargs(spec: DatasetSpec) -> dict:
    """`tfds.builder` / `tfds.data_source` arguments that name this dataset's config."""
    return {"config": SegmentationConfig(name=spec.name, data=spec)}


class TfdsSource:
    """The same elements read from ArrayRecord shards through `tfds.data_source`."""

    def __init__(self, config, split: str):
        self.spec = dataset_spec(config)
        self.split = split
        data_dir = self.spec.tfds_data_dir
        if not os.path.isdir(data_dir):
            raise DataError(f"{data_dir}: config.data.tfds_data_dir is not a folder; write it "
                            "with spectralmoe_jax.data.tfds_builders.build")
        kwargs = builder_kwargs(self.spec)
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
                "path": _text(record["path"]),
                "crs": _text(record["crs"]), "transform": _text(record["transform"])}

    def __getitem__(self, index: int) -> dict:
        raw = self.read_raw(index)
        self.spec.check_labels(raw["label"],
                               f"{raw['path']} (its label, in {self.spec.tfds_data_dir})")
        image, label = finalize(raw["image"], raw["label"], raw["nodata"], self.spec)
        return {"image": image, "label": label, "name": raw["name"], "domain": raw["domain"]}

    def path(self, index: int) -> str:
        """The image file the tile was built from (it may have moved since)."""
        return self.read_raw(index)["path"]

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
