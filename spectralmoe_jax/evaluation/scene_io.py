"""Reading a scene's windows and writing its predictions, window by window.

`SceneReader` turns any rasterio-readable file (GeoTIFF, PNG, JPEG) into normalised model
input, resolving bands as the data pipeline does (`data/spec.py`) and keeping nodata out of the
network. `SceneWriter` receives final rows of labels (and probabilities), stores them in tiled
temporary GeoTIFFs and, once complete, turns them into the outputs: a Cloud-Optimised GeoTIFF
with the input's CRS and transform, or a PNG for a `.png` destination (non-georeferenced input).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
import warnings
from typing import Sequence

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.enums import MaskFlags, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.windows import Window

from spectralmoe_jax.data.spec import DataError, DatasetSpec, per_band, resolve_bands
from spectralmoe_jax.evaluation.gis import LabelEncoding, write_label_png

PROBABILITY_KINDS = ("softmax", "normalize", "identity")
PROBABILITY_DTYPES = ("uint8", "float16")


@contextlib.contextmanager
def quiet_georeferencing():
    """PNG/JPEG inputs have no georeferencing by design: rasterio's warning says nothing new."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        yield


# --- input -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SceneInput:
    """How a file's pixels become the network's input: (x / value_scale - mean) / std of the
    selected bands (`config.data` fields of the same names).

    bands: 0-based band indices or band names, in model order; None takes all bands.
    band_names: the names of the file's bands, in file order (config.data.band_names); None
      takes the file's band descriptions.
    band_count: bands the file must hold (None: any number that holds the selection).
    nodata: input nodata value; None uses the file's masks (nodata tag, mask band, alpha). A
      band's nodata values enter the network as 0 (the mean); a pixel that is nodata in every
      selected band gets no label, as in the data pipeline (`data/readers.py`).
    """
    mean: Sequence[float]
    std: Sequence[float]
    bands: Sequence[int | str] | None = None
    band_names: Sequence[str] | None = None
    band_count: int | None = None
    value_scale: float = 1.0
    nodata: float | None = None

    @classmethod
    def from_spec(cls, spec: DatasetSpec) -> "SceneInput":
        return cls(mean=tuple(spec.mean.tolist()), std=tuple(spec.std.tolist()),
                   bands=spec.band_indices, band_count=spec.file_band_count,
                   value_scale=spec.value_scale, nodata=spec.nodata)


class SceneReader:
    """Normalised float32 windows [h, w, C] of one raster file, and where it holds data."""

    def __init__(self, path: str, scene_input: SceneInput):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"scene not found: {path}")
        self.path = path
        try:
            with quiet_georeferencing():
                self._src = rasterio.open(path)
        except RasterioError as e:
            raise DataError(f"{path}: cannot open as a raster ({e})") from e
        try:
            self._setup(scene_input)
        except Exception:
            self._src.close()
            raise

    def _setup(self, scene_input: SceneInput) -> None:
        src, path = self._src, self.path
        if scene_input.band_count is not None and src.count != scene_input.band_count:
            raise DataError(f"{path}: has {src.count} bands, config expects "
                            f"{scene_input.band_count} (config.data.band_names)")
        if scene_input.band_names is not None:
            names, names_from = tuple(scene_input.band_names), "config.data.band_names"
        else:
            names = tuple(d or "" for d in src.descriptions)
            names_from = f"the band descriptions of {path}"
        if scene_input.bands is None:
            indices = tuple(range(src.count))
        else:
            indices = resolve_bands(list(scene_input.bands), names, names_from)
        if max(indices) >= src.count:
            raise DataError(f"{path}: has {src.count} bands, config.data.bands selects band "
                            f"index {max(indices)}")
        self.indexes = [i + 1 for i in indices]  # rasterio counts bands from 1
        count = len(indices)
        self.mean = per_band(scene_input.mean, f"{path}: mean", count)
        self.std = per_band(scene_input.std, f"{path}: std", count, positive=True)
        self.value_scale = np.float32(scene_input.value_scale)
        self.nodata = scene_input.nodata
        self._masked = self.nodata is not None or any(
            MaskFlags.all_valid not in src.mask_flag_enums[i - 1] for i in self.indexes)

    # Geometry of the scene, for the writer.
    @property
    def height(self) -> int:
        return self._src.height

    @property
    def width(self) -> int:
        return self._src.width

    @property
    def num_bands(self) -> int:
        return len(self.indexes)

    @property
    def crs(self):
        return self._src.crs

    @property
    def transform(self):
        return self._src.transform

    @property
    def georeferenced(self) -> bool:
        src = self._src
        return src.crs is not None or not src.transform.is_identity or bool(src.gcps[0])

    @property
    def driver(self) -> str:
        return self._src.driver

    def _read(self, region: Window, **kwargs) -> np.ndarray:
        try:
            return self._src.read(self.indexes, window=region, **kwargs)
        except RasterioError as e:
            raise DataError(f"{self.path}: cannot read pixels {region} (corrupt or truncated "
                            f"file?): {e}") from e

    def band_valid(self, region: Window, raw: np.ndarray | None = None) -> np.ndarray | None:
        """[C, h, w] bool, True where a band holds data; None when the file has no nodata."""
        if not self._masked:
            return None
        if self.nodata is None:
            try:
                return self._src.read_masks(self.indexes, window=region) > 0
            except RasterioError as e:
                raise DataError(f"{self.path}: cannot read the nodata mask: {e}") from e
        raw = self._read(region) if raw is None else raw
        return ~np.isnan(raw) if np.isnan(self.nodata) else raw != self.nodata

    def valid(self, region: Window) -> np.ndarray | None:
        """[h, w] bool: the pixel holds data in at least one selected band (None: all do)."""
        valid = self.band_valid(region)
        return None if valid is None else valid.any(axis=0)

    def read(self, region: Window) -> np.ndarray:
        """The normalised float32 [h, w, C] input of a region; nodata values set to 0."""
        raw = self._read(region, out_dtype=np.float32)
        image = (np.moveaxis(raw, 0, -1) / self.value_scale - self.mean) / self.std
        valid = self.band_valid(region, raw)
        if valid is not None:
            image[~np.moveaxis(valid, 0, -1)] = 0.0
        return image

    def read_windows(self, row: int, columns: Sequence[int], shape: tuple[int, int],
                     batch_size: int) -> np.ndarray:
        """float32 [batch_size, h, w, C]: the windows at `row` and `columns`, zeros after them
        (batch padding). The windows are read as one region."""
        win_h, win_w = shape
        image = self.read(Window(columns[0], row, columns[-1] + win_w - columns[0], win_h))
        batch = np.zeros((batch_size, win_h, win_w, self.num_bands), np.float32)
        for i, x in enumerate(columns):
            batch[i] = image[:, x - columns[0]:x - columns[0] + win_w]
        return batch

    def close(self) -> None:
        self._src.close()

    def __enter__(self) -> "SceneReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- output ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SceneOutput:
    """What a scene prediction writes.

    labels: the stored value of each class and of nodata, with names and colours (the label
      band's colour table); None stores train ids 0..K-1 with nodata 255.
    probabilities: None, or per-class probability bands `<dst stem>_probabilities.tif`:
      'uint8' (round(255 p), scale 1/255, 0 at nodata pixels) or 'float16' (NaN at nodata);
      p from the blended scores by `probability_kind`: 'softmax' of logits, 'normalize'
      non-negative scores to sum 1, or 'identity'.
    compress: COG compression ('deflate', 'zstd', 'lzw', ...).
    """
    labels: LabelEncoding | None = None
    probabilities: str | None = None
    probability_kind: str = "softmax"
    compress: str = "deflate"

    def __post_init__(self):
        if self.probabilities is not None and self.probabilities not in PROBABILITY_DTYPES:
            raise ValueError(f"probabilities must be None or one of {PROBABILITY_DTYPES}, "
                             f"got {self.probabilities!r}")
        if self.probability_kind not in PROBABILITY_KINDS:
            raise ValueError(f"probability_kind must be one of {PROBABILITY_KINDS}, "
                             f"got {self.probability_kind!r}")


def probabilities_path(dst_path: str) -> str:
    return os.path.splitext(dst_path)[0] + "_probabilities.tif"


class SceneWriter:
    """Final rows of one scene's labels (train ids) and probabilities, stored as they come;
    `finish()` writes the outputs. Used as a context manager, an error leaves no output."""

    def __init__(self, dst_path: str, reader: SceneReader, labels: LabelEncoding,
                 output: SceneOutput):
        self.dst_path = os.path.abspath(dst_path)
        self.labels, self.output = labels, output
        self.georeferenced = reader.georeferenced
        dst_dir = os.path.dirname(self.dst_path)
        os.makedirs(dst_dir, exist_ok=True)
        self._tmp_dir = tempfile.mkdtemp(prefix=".predict_", dir=dst_dir)
        profile = dict(driver="GTiff", width=reader.width, height=reader.height, tiled=True,
                       blockxsize=256, blockysize=256, bigtiff="IF_SAFER")
        if self.georeferenced:
            profile.update(crs=reader.crs, transform=reader.transform)
        self._files = []
        try:
            self._open_files(profile)
        except Exception:
            self.__exit__()
            raise

    def _open_files(self, profile: dict) -> None:
        labels, output = self.labels, self.output
        with quiet_georeferencing():
            self._labels = self._open("labels.tif", profile, count=1, dtype=labels.dtype,
                                      nodata=labels.nodata)
            self._probs = None
            if output.probabilities == "uint8":
                self._probs = self._open("probabilities.tif", profile, dtype="uint8",
                                         count=labels.num_classes)
            elif output.probabilities == "float16":  # float32 stored in 16 bits (half)
                self._probs = self._open("probabilities.tif", profile, dtype="float32",
                                         nbits=16, nodata=float("nan"),
                                         count=labels.num_classes)

    def _open(self, name: str, profile: dict, **kwargs):
        dataset = rasterio.open(os.path.join(self._tmp_dir, name), "w", **profile, **kwargs)
        self._files.append(dataset)
        return dataset

    def write(self, region: Window, ids: np.ndarray, probs: np.ndarray | None,
              valid: np.ndarray | None) -> None:
        """ids [h, w] train ids; probs [h, w, K] (uint8, or float in [0, 1]); valid [h, w]."""
        self._labels.write(self.labels.encode(ids, valid)[None], window=region)
        if self._probs is not None:
            probs = np.moveaxis(np.asarray(probs), -1, 0)
            if valid is not None:
                fill = 0 if self.output.probabilities == "uint8" else np.nan
                probs = np.where(valid[None], probs, fill)
            self._probs.write(probs.astype(self._probs.dtypes[0]), window=region)

    def finish(self) -> tuple[str, str | None]:
        """Writes the label COG (or PNG) and the probabilities COG; returns their paths."""
        self._labels.write_colormap(1, self.labels.colormap())
        self._labels.set_band_description(1, "label")
        if self._probs is not None:
            if self.output.probabilities == "uint8":
                self._probs.scales = [1 / 255] * self.labels.num_classes
            for k, name in enumerate(self.labels.names):
                self._probs.set_band_description(k + 1, str(name))
        self._close_files()
        with quiet_georeferencing():
            labels_tmp = os.path.join(self._tmp_dir, "labels.tif")
            if self.dst_path.lower().endswith(".png"):
                with rasterio.open(labels_tmp) as tmp:
                    write_label_png(self.dst_path, tmp.read(1), self.labels)
            else:
                write_cog(labels_tmp, self.dst_path, self.output.compress, "nearest")
            probs_path = None
            if self._probs is not None:
                probs_path = probabilities_path(self.dst_path)
                nbits = 16 if self.output.probabilities == "float16" else None
                write_cog(os.path.join(self._tmp_dir, "probabilities.tif"), probs_path,
                          self.output.compress, "average", nbits=nbits)
        shutil.rmtree(self._tmp_dir, ignore_errors=True)
        return self.dst_path, probs_path

    def _close_files(self) -> None:
        for dataset in self._files:
            if not dataset.closed:
                dataset.close()

    def __enter__(self) -> "SceneWriter":
        return self

    def __exit__(self, *exc) -> None:
        self._close_files()
        shutil.rmtree(self._tmp_dir, ignore_errors=True)


def write_cog(tmp_path: str, dst_path: str, compress: str, resampling: str,
              nbits: int | None = None) -> None:
    """Copies a tiled GeoTIFF to a COG (GDAL's COG driver, else a GTiff with overviews)."""
    if os.path.exists(dst_path):
        os.remove(dst_path)
    extra = {} if nbits is None else {"nbits": nbits}
    with rasterio.Env() as env:
        has_cog = "COG" in env.drivers()
    if has_cog:
        rasterio.shutil.copy(tmp_path, dst_path, driver="COG", compress=compress,
                             blocksize=512, overview_resampling=resampling, bigtiff="IF_SAFER",
                             **extra)
        return
    with rasterio.open(tmp_path, "r+") as tmp:
        factors = [2 ** i for i in range(1, 32) if max(tmp.shape) // 2 ** i >= 256]
        tmp.build_overviews(factors, Resampling[resampling])
    rasterio.shutil.copy(tmp_path, dst_path, driver="GTiff", tiled=True, blockxsize=512,
                         blockysize=512, compress=compress, copy_src_overviews=True,
                         bigtiff="IF_SAFER", **extra)
