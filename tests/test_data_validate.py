"""Bad input is found before training, each problem naming its file; nothing is modified."""
import hashlib
import os
import shutil

import numpy as np
import pytest
import rasterio
from affine import Affine
from PIL import Image

from spectralmoe_jax.data import benchmarks, sources
from spectralmoe_jax.data.spec import DataError
from spectralmoe_jax.data.validate import validate_dataset
from tests.test_data_sources import data_config, write_geotiff, write_split


def good_dataset(tmp_path):
    write_split(str(tmp_path), "source_dir", 3, seed=0)
    write_split(str(tmp_path), "target_dir", 2, seed=1)
    return data_config(tmp_path)


def problems_of(config):
    with pytest.raises(DataError) as error:
        validate_dataset(config)
    return str(error.value)


def test_good_dataset_passes_with_counts(tmp_path):
    report = validate_dataset(good_dataset(tmp_path))
    assert report.ok and report.tiles == {"source": 3, "target": 2}
    assert report.domains == {"source": {"source_dir": 3}, "target": {"target_dir": 2}}


def test_wrong_band_count_names_file_found_and_expected(tmp_path):
    config = good_dataset(tmp_path)
    bad = str(tmp_path / "source_dir/image/source_dir_001.tif")
    write_geotiff(bad, np.ones((32, 32, 4), np.uint8))
    message = problems_of(config)
    assert f"{bad}: has 4 bands, config expects 3" in message


def test_truncated_geotiff_is_named(tmp_path):
    config = benchmarks.flair2_demo()
    for name in os.listdir(benchmarks.DEMO_ROOT):
        shutil.copy(os.path.join(benchmarks.DEMO_ROOT, name), tmp_path)
    truncated = str(tmp_path / "D055_2018_IMG_036294_aerial.tif")
    size = os.path.getsize(truncated)
    os.chmod(truncated, 0o644)
    with open(truncated, "r+b") as f:
        f.truncate(size // 2)
    config.root = str(tmp_path)
    message = problems_of(config)
    expected = (f"{truncated}: truncated file: {size // 2} bytes, but its pixel data runs to "
                f"byte {size}")
    assert expected in message
    assert message.count("problem") == 1 and "1 problem(s)" in message
    # The quick check before training finds it from the header alone.
    quick = validate_dataset(config, read_pixels=False, raise_errors=False)
    assert len(quick.problems) == 1 and expected in quick.problems[0]


@pytest.mark.parametrize("kind", ["png", "npy", "hdf5"])
def test_quick_check_finds_truncated_png_npy_and_hdf5_tiles(tmp_path, kind):
    import h5py

    extension = {"png": "png", "npy": "npy", "hdf5": "h5"}[kind]
    fmt = {"png": "image", "npy": "npy", "hdf5": "hdf5"}[kind]
    rng = np.random.default_rng(0)
    for split_dir in ("source_dir", "target_dir"):
        for i in range(2):
            image = rng.integers(0, 255, (64, 64, 3)).astype(np.uint8)
            label = rng.integers(0, 4, (64, 64)).astype(np.uint8)
            for folder, array in (("image", image), ("label", label)):
                path = tmp_path / split_dir / folder / f"{split_dir}_{i}.{extension}"
                os.makedirs(path.parent, exist_ok=True)
                if kind == "png":
                    Image.fromarray(array).save(path)
                elif kind == "npy":
                    np.save(path, array)
                else:
                    with h5py.File(path, "w") as f:
                        f["image" if folder == "image" else "label"] = array
    config = data_config(tmp_path, image_ext=extension, label_ext=extension, fmt=fmt)
    assert validate_dataset(config, read_pixels=False).ok
    truncated = tmp_path / "target_dir" / "image" / f"target_dir_1.{extension}"
    with open(truncated, "r+b") as f:
        f.truncate(os.path.getsize(truncated) // 2)
    report = validate_dataset(config, read_pixels=False, raise_errors=False)
    assert len(report.problems) == 1 and str(truncated) in report.problems[0]


def write_tile_pair(root, name, *, label_crs="EPSG:2154", label_shift=0.0):
    """An image and its label; the label optionally in another CRS or shifted by pixels."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (16, 16, 3)).astype(np.uint8)
    write_geotiff(str(root / "source_dir/image" / f"{name}.tif"), image)
    path = str(root / "source_dir/label" / f"{name}.tif")
    write_geotiff(path, np.zeros((16, 16), np.uint8), crs=label_crs)
    if label_shift:
        with rasterio.open(path, "r+") as dst:
            dst.transform = Affine(1, 0, 1000 + label_shift, 0, -1, 2000)
    return path


def test_image_and_label_must_agree_on_crs_and_transform(tmp_path):
    write_split(str(tmp_path), "target_dir", 1)
    good = write_tile_pair(tmp_path, "good")
    other_crs = write_tile_pair(tmp_path, "other_crs", label_crs="EPSG:32631")
    shifted = write_tile_pair(tmp_path, "shifted", label_shift=3.0)
    # A label in a local CRS named as its image's projection (FLAIR's masks) is the same CRS.
    local = write_tile_pair(tmp_path, "local", label_crs='LOCAL_CS["RGF93 v1 / Lambert-93",'
                            'UNIT["metre",1],AXIS["Easting",EAST],AXIS["Northing",NORTH]]')
    report = validate_dataset(data_config(tmp_path), read_pixels=False, raise_errors=False)
    text = "\n".join(report.problems)
    assert len(report.problems) == 2, text
    assert f"image CRS is EPSG:2154 but its label {other_crs} is in EPSG:32631" in text
    assert f"its label {shifted} have different transforms" in text
    assert good not in text and local not in text


def test_tiles_in_different_crss_are_legal_and_reported_per_domain(tmp_path):
    write_split(str(tmp_path), "source_dir", 2)
    write_split(str(tmp_path), "target_dir", 1)
    for folder in ("image", "label"):
        path = str(tmp_path / "target_dir" / folder / "target_dir_000.tif")
        with rasterio.open(path, "r+") as dst:
            dst.crs = "EPSG:32631"
    report = validate_dataset(data_config(tmp_path))
    assert report.crs == {"source": {"source_dir": {"EPSG:2154": 2}},
                          "target": {"target_dir": {"EPSG:32631": 1}}}
    assert "target CRS: target_dir EPSG:32631 (1)" in str(report)


def test_label_values_outside_the_classes_are_named(tmp_path):
    config = good_dataset(tmp_path)
    bad = str(tmp_path / "target_dir/label/target_dir_000.tif")
    label = np.zeros((32, 32), np.uint8)
    label[0, :3] = (7, 9, 255)                 # 255 is ignore: allowed
    write_geotiff(bad, label)
    message = problems_of(config)
    assert f"{bad}: label values [7, 9] are outside the classes 0..3" in message


def test_size_mismatch_missing_label_and_corrupt_label_all_reported(tmp_path):
    config = good_dataset(tmp_path)
    mismatched = str(tmp_path / "source_dir/label/source_dir_000.tif")
    write_geotiff(mismatched, np.zeros((30, 32), np.uint8))
    missing = str(tmp_path / "source_dir/label/source_dir_002.tif")
    os.remove(missing)
    garbage = str(tmp_path / "target_dir/label/target_dir_001.tif")
    with open(garbage, "wb") as f:
        f.write(b"not a tiff at all")
    message = problems_of(config)
    assert (f"{tmp_path}/source_dir/image/source_dir_000.tif: image is 32x32 but its label "
            f"{mismatched} is 30x32") in message
    assert f"{missing}: label file is missing" in message
    assert f"{garbage}: cannot read header (corrupt or truncated file?)" in message
    assert "3 problem(s)" in message


def test_empty_and_missing_folders(tmp_path):
    config = good_dataset(tmp_path)
    shutil.rmtree(tmp_path / "target_dir")
    message = problems_of(config)
    assert f"{tmp_path}/target_dir/image/*.tif: no images for split 'target'" in message
    config.root = str(tmp_path / "nowhere")
    assert f"{tmp_path}/nowhere: config.data.root is not a folder" in problems_of(config)


def test_dtype_and_config_problems(tmp_path):
    config = good_dataset(tmp_path)
    config.dtype = "uint16"
    assert "image dtype is uint8, config expects uint16" in problems_of(config)
    config.dtype = None
    config.mean = (0.0, 0.0)
    assert "config.data.mean has 2 values for 3 selected bands" in problems_of(config)


def test_label_path_not_derivable_and_png_image(tmp_path):
    os.makedirs(tmp_path / "source_dir/image")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "source_dir/image/a.png")
    config = data_config(tmp_path, splits=dict(source=dict(glob="source_dir/image/*")))
    message = problems_of(config)
    assert f"{tmp_path}/source_dir/image/a.png: config.data.layout.label_pattern" in message


def test_quick_check_opens_some_tiles_but_finds_every_missing_label(tmp_path):
    config = good_dataset(tmp_path)
    write_geotiff(str(tmp_path / "source_dir/image/source_dir_001.tif"),
                  np.ones((32, 32, 4), np.uint8))          # not among the opened tiles
    os.remove(tmp_path / "source_dir/label/source_dir_002.tif")
    report = validate_dataset(config, read_pixels=False, max_tiles=2, raise_errors=False)
    assert len(report.problems) == 1 and "source_dir_002.tif: label file is missing" in str(
        report)
    assert "has 4 bands" in problems_of(config)


def test_validation_touches_nothing(tmp_path):
    config = good_dataset(tmp_path)
    os.remove(tmp_path / "source_dir/label/source_dir_001.tif")

    def snapshot():
        result = {}
        for folder, _, files in os.walk(tmp_path):
            for name in files:
                path = os.path.join(folder, name)
                with open(path, "rb") as f:
                    result[path] = (os.stat(path).st_mtime_ns, hashlib.sha1(f.read()).digest())
        return result

    before = snapshot()
    with pytest.raises(DataError):
        validate_dataset(config)
    assert snapshot() == before


def test_source_errors_name_the_file(tmp_path):
    config = good_dataset(tmp_path)
    bad = str(tmp_path / "source_dir/image/source_dir_000.tif")
    write_geotiff(bad, np.ones((32, 32, 2), np.uint8))
    with pytest.raises(DataError, match=f"{bad}: has 2 bands, config expects 3"):
        sources.TileSource(config, "source")[0]
