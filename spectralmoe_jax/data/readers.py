"""Band-agnostic tile readers: GeoTIFF (rasterio), PNG/JPEG (PIL), .npy and HDF5 (h5py).

Images come back as the selected bands `[H, W, C]` in the file's own dtype (scaling happens in
`sources.py`), with a boolean nodata mask or None; labels as the raw single-band code map. An
HDF5 image is one array (`hdf5_image_key`) or one 2-D dataset per band (`hdf5_band_keys`, as
geo-bench stores them), its label a dataset of the same or another file.
Every failure is a `DataError` naming the file.

A header read (`raster_info`) also finds truncated files without decoding pixels: a GeoTIFF
whose blocks, as its header locates them, end past the end of the file (GDAL's block offsets
and sizes); a PNG whose chunks stop early (`probe=True`); .npy and HDF5 files, whose headers
state their size, fail to open.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from spectralmoe_jax.data.spec import DataError, DatasetSpec

GEOTIFF_EXTENSIONS = (".tif", ".tiff")
PIL_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
NPY_EXTENSIONS = (".npy",)
HDF5_EXTENSIONS = (".h5", ".hdf5", ".he5")


@dataclasses.dataclass(frozen=True)
class RasterInfo:
    """What a file's header says, read without decoding the pixels."""
    height: int
    width: int
    count: int
    dtype: str
    nodata: float | None = None
    crs: str | None = None  # a GeoTIFF's CRS as WKT (None: not georeferenced)
    transform: tuple[float, ...] | None = None  # its pixel -> CRS affine (a, b, c, d, e, f)


def _kind(path: str, image_format: str | None = None) -> str:
    if image_format is not None:
        return image_format
    ext = os.path.splitext(path)[1].lower()
    for kind, extensions in (("geotiff", GEOTIFF_EXTENSIONS), ("image", PIL_EXTENSIONS),
                             ("npy", NPY_EXTENSIONS), ("hdf5", HDF5_EXTENSIONS)):
        if ext in extensions:
            return kind
    raise DataError(f"{path}: unknown file type {ext!r}; known: "
                    f"{GEOTIFF_EXTENSIONS + PIL_EXTENSIONS + NPY_EXTENSIONS + HDF5_EXTENSIONS}")


def _fail(path: str, what: str, error: Exception) -> DataError:
    if isinstance(error, DataError):
        return error
    return DataError(f"{path}: cannot read {what} (corrupt or truncated file?): "
                     f"{type(error).__name__}: {error}")


def _to_hwc(array: np.ndarray, layout: str, path: str) -> np.ndarray:
    if array.ndim == 2:
        return array[..., None]
    if array.ndim != 3:
        raise DataError(f"{path}: array of shape {array.shape} is not an image (2 or 3 axes)")
    return np.moveaxis(array, 0, -1) if layout == "CHW" else array


# --- headers ------------------------------------------------------------------------------

def raster_info(path: str, spec: DatasetSpec, *, label: bool = False,
                probe: bool = False) -> RasterInfo:
    """Header of an image (`label=False`, read as `config.data.format`) or a label file.

    probe: also decode the cheap part that shows a truncated file where the header cannot
    (a PNG's chunks; a GeoTIFF's last block when GDAL does not locate its blocks).
    """
    kind = _kind(path, None if label else spec.format)
    key = spec.hdf5_label_key if label else spec.hdf5_image_key
    try:
        if kind == "geotiff":
            import rasterio
            with rasterio.open(path) as src:
                _check_geotiff_extent(src, path, probe)
                crs = src.crs.to_wkt() if src.crs else None
                transform = tuple(src.transform)[:6]
                if crs is None and src.transform.is_identity:
                    transform = None
                return RasterInfo(src.height, src.width, src.count, src.dtypes[0], src.nodata,
                                  crs, transform)
        if kind == "image":
            from PIL import Image
            if probe:
                with Image.open(path) as img:
                    if img.format == "PNG":
                        img.verify()  # reads every chunk and its checksum, decodes nothing
                    else:
                        img.load()
            with Image.open(path) as img:
                bands = len(img.getbands())
                dtype = {"I;16": "uint16", "I": "int32", "F": "float32"}.get(img.mode, "uint8")
                return RasterInfo(img.height, img.width, bands, dtype)
        if kind == "npy":
            array = np.load(path, mmap_mode="r")
            shape, dtype = array.shape, array.dtype
        else:
            import h5py
            with h5py.File(path, "r") as f:
                if not label and spec.hdf5_band_keys:
                    planes = _hdf5_planes(f, path, spec.hdf5_band_keys)
                    return RasterInfo(*planes[0].shape, len(planes), str(planes[0].dtype))
                if key not in f:
                    raise DataError(f"{path}: no HDF5 dataset {key!r} (config.data."
                                    f"hdf5_{'label' if label else 'image'}_key); it has "
                                    f"{sorted(f.keys())}")
                shape, dtype = f[key].shape, f[key].dtype
    except Exception as e:  # noqa: BLE001 - any library error becomes a DataError naming the file
        raise _fail(path, "header", e) from e
    if len(shape) == 2:
        return RasterInfo(shape[0], shape[1], 1, str(dtype))
    if len(shape) != 3:
        raise DataError(f"{path}: array of shape {shape} is not an image (2 or 3 axes)")
    h, w, c = (shape[1], shape[2], shape[0]) if spec.array_layout == "CHW" else shape
    return RasterInfo(h, w, c, str(dtype))


# Beyond this many blocks, only each band's last block is located (huge striped scenes).
_MAX_BLOCKS_LOCATED = 4096


def _check_geotiff_extent(src, path: str, probe: bool) -> None:
    """A `DataError` when the pixel data the header locates runs past the end of the file."""
    ends = []
    for band in range(1, src.count + 1):
        block_h, block_w = src.block_shapes[band - 1]
        rows, cols = -(-src.height // block_h), -(-src.width // block_w)
        blocks = [(x, y) for y in range(rows) for x in range(cols)]
        if src.count * len(blocks) > _MAX_BLOCKS_LOCATED:
            blocks = blocks[-1:]
        for x, y in blocks:
            offset = src.get_tag_item(f"BLOCK_OFFSET_{x}_{y}", "TIFF", bidx=band)
            size = src.get_tag_item(f"BLOCK_SIZE_{x}_{y}", "TIFF", bidx=band)
            if offset is None or size is None:  # not a file GDAL reads as TIFF blocks
                if probe:
                    src.read(window=src.block_window(1, rows - 1, cols - 1))
                return
            ends.append(int(offset) + int(size))
    file_size = os.path.getsize(path)
    if ends and max(ends) > file_size:
        raise DataError(f"{path}: truncated file: {file_size} bytes, but its pixel data runs to "
                        f"byte {max(ends)} (an interrupted copy or download?)")


def check_band_count(path: str, count: int, spec: DatasetSpec) -> None:
    expected = spec.file_band_count
    if expected is not None and count != expected:
        raise DataError(f"{path}: has {count} bands, config expects {expected} "
                        f"(config.data.band_names)")
    if max(spec.band_indices) >= count:
        raise DataError(f"{path}: has {count} bands, config.data.bands selects band index "
                        f"{max(spec.band_indices)}")


# --- pixels -------------------------------------------------------------------------------

def _nodata_mask(bands: np.ndarray, nodata: float | None) -> np.ndarray | None:
    if nodata is None:
        return None
    planes = np.moveaxis(bands, -1, 0)    # reduce over whole planes, not 4-element pixels
    mask = (np.isnan(planes) if np.isnan(nodata) else planes == nodata).all(axis=0)
    return mask if mask.any() else None


def _read_array(path: str, kind: str, hdf5_key: str, config_key: str, *, image: bool) -> np.ndarray:
    """A PNG/JPEG, .npy or HDF5 array as stored (palette images become RGB for images only)."""
    if kind == "image":
        from PIL import Image
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB") if image and img.mode == "P" else img)
    if kind == "npy":
        return np.load(path)
    import h5py
    with h5py.File(path, "r") as f:
        if hdf5_key not in f:
            raise DataError(f"{path}: no HDF5 dataset {hdf5_key!r} "
                            f"(config.data.{config_key}); it has {sorted(f)}")
        return f[hdf5_key][...]


def _hdf5_planes(f, path: str, keys) -> list:
    """The h5py datasets `keys` of an open file, each a 2-D band of one shape (not read)."""
    missing = [key for key in keys if key not in f]
    if missing:
        raise DataError(f"{path}: no HDF5 dataset(s) {missing} (config.data.hdf5_band_keys); "
                        f"it has {sorted(f)}")
    planes = [f[key] for key in keys]
    for key, plane in zip(keys, planes):
        if plane.ndim != 2 or plane.shape != planes[0].shape:
            raise DataError(f"{path}: HDF5 dataset {key!r} has shape {plane.shape}; every band "
                            f"of config.data.hdf5_band_keys must be 2-D of one shape "
                            f"({keys[0]!r}: {planes[0].shape})")
    return planes


def _read_hdf5_bands(path: str, spec: DatasetSpec) -> np.ndarray:
    """The selected bands `[H, W, C]` of a file holding one dataset per band."""
    import h5py
    with h5py.File(path, "r") as f:
        keys = [spec.hdf5_band_keys[i] for i in spec.band_indices]
        return np.stack([plane[...] for plane in _hdf5_planes(f, path, keys)], axis=-1)


def read_image(path: str, spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray | None]:
    """Selected bands `[H, W, C]` in the file's dtype, and the nodata mask `[H, W]` or None.

    A pixel is nodata when every selected band equals the nodata value (config.data.nodata,
    else the GeoTIFF's tag).
    """
    kind = spec.format
    indices = list(spec.band_indices)
    try:
        if kind == "geotiff":
            import rasterio
            with rasterio.open(path) as src:
                check_band_count(path, src.count, spec)
                nodata = spec.nodata if spec.nodata is not None else src.nodata
                bands = np.moveaxis(src.read([i + 1 for i in indices]), 0, -1)
        elif kind == "hdf5" and spec.hdf5_band_keys:
            bands, nodata = _read_hdf5_bands(path, spec), spec.nodata
        else:
            array = _read_array(path, kind, spec.hdf5_image_key, "hdf5_image_key", image=True)
            array = _to_hwc(array, "HWC" if kind == "image" else spec.array_layout, path)
            check_band_count(path, array.shape[-1], spec)
            nodata = spec.nodata
            bands = array[..., indices]
    except Exception as e:  # noqa: BLE001
        raise _fail(path, "image", e) from e
    # GeoTIFF bands stay band-major in memory ([H, W, C] view of [C, H, W] data), which is what
    # the transforms work on.
    return bands, _nodata_mask(bands, nodata)


def read_label(path: str, spec: DatasetSpec) -> np.ndarray:
    """The raw single-band label map `[H, W]` (codes before `label_map`)."""
    if not os.path.exists(path):
        raise DataError(f"{path}: label file is missing")
    kind = _kind(path)
    try:
        if kind == "geotiff":
            import rasterio
            with rasterio.open(path) as src:
                if src.count != 1:
                    raise DataError(f"{path}: label has {src.count} bands; expected one band "
                                    "of class codes")
                return src.read(1)
        array = _read_array(path, kind, spec.hdf5_label_key, "hdf5_label_key", image=False)
    except Exception as e:  # noqa: BLE001
        raise _fail(path, "label", e) from e
    if array.ndim == 3 and 1 in (array.shape[0], array.shape[-1]):
        array = array.reshape(array.shape[1:] if array.shape[0] == 1 else array.shape[:2])
    if array.ndim != 2:
        raise DataError(f"{path}: label of shape {array.shape} is not a single-band map of "
                        "class codes (colour-coded labels must be converted to codes first)")
    return array


def read_profile(path: str) -> dict | None:
    """The GeoTIFF profile (crs, transform, nodata, ...) to georeference predictions; else None."""
    if _kind(path) != "geotiff":
        return None
    import rasterio
    with rasterio.open(path) as src:
        return dict(src.profile)
