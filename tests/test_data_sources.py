"""Readers and sources: bands, scaling, nodata, label remapping, formats, the bundled tiles.

Also holds the small helpers the other test_data_* files use to write synthetic datasets.
"""
import os

import h5py
import ml_collections
import numpy as np
import pytest
import rasterio
from PIL import Image
from affine import Affine

from spectralmoe_jax.data import benchmarks, pipeline, sources
from spectralmoe_jax.data.spec import DataError, dataset_spec

FLAIR_DIR = benchmarks.DEMO_ROOT


# --- helpers shared by the data tests --------------------------------------------------------

def write_geotiff(path, array_hwc, *, nodata=None, crs="EPSG:2154"):
    """Writes [H, W, C] (or [H, W]) as a GeoTIFF with a 1 m grid at (1000, 2000)."""
    array = np.asarray(array_hwc)
    if array.ndim == 2:
        array = array[..., None]
    height, width, count = array.shape
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", height=height, width=width, count=count,
                       dtype=array.dtype, crs=crs, transform=Affine(1, 0, 1000, 0, -1, 2000),
                       nodata=nodata) as dst:
        dst.write(np.moveaxis(array, -1, 0))


def data_config(root, *, bands=(0, 1, 2), band_names=("R", "G", "B"), num_classes=4,
                size=32, image_ext="tif", label_ext="tif", fmt="geotiff", **overrides):
    """A small dataset in the released `{source_dir,target_dir}/{image,label}` layout."""
    num_bands = len(bands)
    fields = dict(
        name="synthetic", format=fmt, root=str(root),
        layout=benchmarks.split_dir_layout(image_ext, label_ext),
        splits=dict(source=dict(glob=f"source_dir/image/*.{image_ext}", domains=None),
                    target=dict(glob=f"target_dir/image/*.{image_ext}", domains=None)),
        band_names=band_names, bands=bands, dtype=None, value_scale=1.0, nodata=None,
        num_classes=num_classes, class_names=tuple(f"c{i}" for i in range(num_classes)),
        palette=tuple((i, i, i) for i in range(num_classes)), ignore_index=255,
        label_map={}, mean=(0.0,) * num_bands, std=(1.0,) * num_bands,
        crop_size=(size, size), rgb_bands=None, tfds_data_dir="",
        augment=dict(short_edges=None, ratio_range=None, base_size=size, max_size=None,
                     cat_max_ratio=1.0, flip_prob=0.0, photometric=dict(enabled=False)),
    )
    fields.update(overrides)
    return ml_collections.ConfigDict(fields)


def write_split(root, split_dir, count, *, size=32, bands=3, num_classes=4, seed=0,
                dtype=np.uint8):
    """`count` random image/label GeoTIFF pairs; returns {name: (image, label)}."""
    rng = np.random.default_rng(seed)
    tiles = {}
    for i in range(count):
        name = f"{split_dir}_{i:03d}"
        image = rng.integers(1, 250, (size, size, bands)).astype(dtype)
        label = rng.integers(0, num_classes, (size, size)).astype(np.uint8)
        write_geotiff(os.path.join(root, split_dir, "image", name + ".tif"), image)
        write_geotiff(os.path.join(root, split_dir, "label", name + ".tif"), label)
        tiles[name] = (image, label)
    return tiles


# --- the bundled FLAIR #2 tiles ----------------------------------------------------------------

def flair_reference(stem):
    """Bands R, G, B, NIR and the 12-class labels, written out from the FLAIR nomenclature."""
    with rasterio.open(os.path.join(FLAIR_DIR, stem + "_aerial.tif")) as src:
        image = np.moveaxis(src.read(), 0, -1)[..., :4].astype(np.float32)
    with rasterio.open(os.path.join(FLAIR_DIR, stem + "_mask.tif")) as src:
        codes = src.read(1).astype(np.int32)
    label = np.where((codes >= 1) & (codes <= 12), codes - 1, 255)
    return image, label


def test_flair_demo_reads_bundled_tiles_by_domain():
    config = benchmarks.flair2_demo()
    train = sources.TileSource(config, "source")
    target = sources.TileSource(config, "target")
    assert sorted(train.domains) == ["D006_2020", "D051_2019", "D055_2018", "D074_2020"]
    assert target.domains == ["D004_2021", "D004_2021"]
    for source in (train, target):
        for index in range(len(source)):
            element = source[index]
            image, label = flair_reference(element["name"].removesuffix("_aerial"))
            assert element["domain"] == element["name"][:9]
            assert element["image"].dtype == np.float32 and element["label"].dtype == np.int32
            np.testing.assert_array_equal(element["image"], image)
            np.testing.assert_array_equal(element["label"], label)


def test_flair_demo_eval_source_normalises_and_georeferences():
    config = benchmarks.flair2_demo()
    evaluation = pipeline.make_eval_source(config, "target")
    element = evaluation[1]
    image, label = flair_reference(element["name"].removesuffix("_aerial"))
    mean = np.array([105.08, 110.87, 101.82, 106.38])
    std = np.array([52.17, 45.38, 44.0, 39.69])
    np.testing.assert_allclose(element["image"], (image - mean) / std, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(element["label"], label)
    assert element["path"].endswith(element["name"] + ".tif")
    assert evaluation.domains == ["D004_2021", "D004_2021"]
    profile = evaluation.profile(1)
    with rasterio.open(element["path"]) as src:
        assert profile["crs"] == src.crs and profile["crs"].to_epsg() == 2154
        assert profile["transform"] == src.transform


def test_bands_by_name_equal_bands_by_index():
    by_name = benchmarks.flair2_demo()
    by_name.bands = ("NIR", "B", "R")
    by_name.mean, by_name.std, by_name.rgb_bands = (0.0,) * 3, (1.0,) * 3, None
    by_name.wavelengths = None
    by_index = ml_collections.ConfigDict(by_name.to_dict())
    by_index.bands = (3, 2, 0)
    a = sources.TileSource(by_name, "target")[0]["image"]
    b = sources.TileSource(by_index, "target")[0]["image"]
    full, _ = flair_reference("D004_2021_IMG_000473")
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, full[..., [3, 2, 0]])


# --- bit depth, nodata, remapping ------------------------------------------------------------

def test_uint16_seven_band_geotiff_with_nodata_and_remapping(tmp_path):
    rng = np.random.default_rng(1)
    image = rng.integers(1, 10000, (24, 20, 7)).astype(np.uint16)
    image[:3, :5] = 0                       # nodata in every band
    image[10, 10, 2] = 0                    # one band at 0 is valid data
    codes = rng.integers(1, 6, (24, 20)).astype(np.uint8)
    codes[20:, :] = 9                       # a code the label map ignores
    write_geotiff(str(tmp_path / "source_dir/image/a.tif"), image, nodata=0)
    write_geotiff(str(tmp_path / "source_dir/label/a.tif"), codes)
    names = tuple(f"B{i}" for i in range(1, 8))
    label_map = {1: 0, 2: 1, 3: 2, 4: 3, 5: 255, 9: 255}
    mean = (0.1, 0.2, 0.3)
    config = data_config(tmp_path, bands=("B7", "B2", "B5"), band_names=names,
                         dtype="uint16", value_scale=10000.0, label_map=label_map, mean=mean)
    element = sources.TileSource(config, "source")[0]

    expected = image[..., [6, 1, 4]].astype(np.float32) / np.float32(10000.0)
    nodata = (image == 0).all(axis=-1)
    expected[nodata] = mean
    lut = np.arange(256)
    for code, train_id in label_map.items():
        lut[code] = train_id
    expected_label = np.where(nodata, 255, lut[codes])
    np.testing.assert_array_equal(element["image"], expected)
    np.testing.assert_array_equal(element["label"], expected_label)
    assert nodata.sum() == 15 and element["label"][10, 10] == lut[codes[10, 10]]


def test_thirty_two_band_geotiff_with_wavelengths(tmp_path):
    rng = np.random.default_rng(2)
    image = rng.integers(0, 10000, (16, 16, 32)).astype(np.int16)
    codes = rng.integers(0, 25, (16, 16)).astype(np.uint8)
    write_geotiff(str(tmp_path / "target_dir/image/o1.tif"), image)
    write_geotiff(str(tmp_path / "target_dir/label/o1.tif"), codes)
    config = benchmarks.whu_ohs()
    config.root = str(tmp_path)
    spec = dataset_spec(config)
    assert spec.wavelengths == benchmarks.WHU_OHS_WAVELENGTHS and len(spec.wavelengths) == 32
    assert spec.wavelengths[0] == 0.466 and spec.wavelengths[-1] == 0.940
    element = pipeline.make_eval_source(config, "target")[0]
    np.testing.assert_allclose(element["image"], image / 10000.0, rtol=1e-6)
    merge = {0: 255, **benchmarks.WHU_OHS_MERGE}
    np.testing.assert_array_equal(element["label"], np.vectorize(merge.get)(codes))


@pytest.mark.parametrize("wavelengths, message", [
    ((0.5,) * 31, "31 values for 32 selected bands"),
    (tuple(w * 1000 for w in benchmarks.WHU_OHS_WAVELENGTHS), "nanometres"),
])
def test_wavelengths_checked_against_band_count_and_unit(wavelengths, message):
    config = benchmarks.whu_ohs()
    config.wavelengths = wavelengths
    with pytest.raises(DataError, match=message):
        dataset_spec(config)


def test_bad_band_name_names_the_key():
    config = benchmarks.flair2_demo()
    config.bands = ("R", "SWIR")
    with pytest.raises(DataError, match=r"config.data.bands: band name 'SWIR'"):
        dataset_spec(config)


# --- other formats ---------------------------------------------------------------------------

def test_npy_and_hdf5_tiles(tmp_path):
    rng = np.random.default_rng(3)
    image = rng.random((3, 12, 10)).astype(np.float32)       # CHW float reflectance
    label = rng.integers(0, 4, (12, 10)).astype(np.int64)
    os.makedirs(tmp_path / "npy/source_dir/image")
    os.makedirs(tmp_path / "npy/source_dir/label")
    np.save(tmp_path / "npy/source_dir/image/t.npy", image)
    np.save(tmp_path / "npy/source_dir/label/t.npy", label)
    os.makedirs(tmp_path / "h5/source_dir")
    with h5py.File(tmp_path / "h5/source_dir/t.h5", "w") as f:   # image and label in one file
        f["bands"] = image
        f["classes"] = label
    npy = data_config(tmp_path / "npy", fmt="npy", image_ext="npy", label_ext="npy",
                      array_layout="CHW", bands=(2, 0))
    h5 = data_config(tmp_path / "h5", fmt="hdf5", array_layout="CHW", bands=(2, 0),
                     layout=dict(label_pattern=r"$", label_replace="", domain_pattern=None),
                     splits=dict(source=dict(glob="source_dir/*.h5")),
                     hdf5_image_key="bands", hdf5_label_key="classes")
    for config in (npy, h5):
        element = sources.TileSource(config, "source")[0]
        np.testing.assert_array_equal(element["image"], np.moveaxis(image, 0, -1)[..., [2, 0]])
        np.testing.assert_array_equal(element["label"], label)


def test_png_tiles_in_released_bgr_order(tmp_path):
    rng = np.random.default_rng(4)
    rgb = rng.integers(0, 256, (20, 30, 3)).astype(np.uint8)
    codes = rng.integers(0, 8, (20, 30)).astype(np.uint8)
    for folder in ("Train/Rural", "Val/Urban"):
        os.makedirs(tmp_path / folder / "image")
        os.makedirs(tmp_path / folder / "label")
        Image.fromarray(rgb).save(tmp_path / folder / "image/1.png")
        Image.fromarray(codes).save(tmp_path / folder / "label/1.png")
    config = benchmarks.loveda()
    config.root = str(tmp_path)
    source = sources.TileSource(config, "target")
    element = source[0]
    assert source.domains == ["Urban"] and sources.TileSource(config, "source").domains == [
        "Rural"]
    np.testing.assert_array_equal(element["image"], rgb[..., ::-1])
    np.testing.assert_array_equal(element["label"], np.where(codes == 0, 255, codes - 1))
    assert source.profile(0) is None


def test_every_benchmark_definition_is_consistent():
    for name, make in benchmarks.BENCHMARKS.items():
        config = make()
        spec = dataset_spec(config)
        assert spec.name == name
        assert len(spec.class_names) == len(spec.palette) == spec.num_classes
        assert spec.wavelengths is not None and len(spec.wavelengths) == spec.num_bands
        assert spec.rgb_bands is not None
        red, green, blue = (spec.wavelengths[i] for i in spec.rgb_bands)
        assert red > green > blue
        # Every class is reached by some raw code, and codes map only to classes or ignore.
        train_ids = {int(v) for v in config.label_map.values()}
        assert train_ids - {255} == set(range(spec.num_classes))
    assert dataset_spec(benchmarks.whu_ohs()).num_bands == 32
