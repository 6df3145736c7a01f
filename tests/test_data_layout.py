"""Layout kinds, split filters (domains, names files), classes from names, label maps given as
pairs, and HDF5 tiles holding one dataset per band: each against what the files hold."""

import json
import os

import h5py
import numpy as np
import pytest
from PIL import Image

from spectralmoe_jax.data import benchmarks, layout, readers, sources
from spectralmoe_jax.data.spec import DataError, dataset_spec


def config(root, **fields):
    return benchmarks.dataset_config(**{
        "name": "t", "format": "image", "root": str(root), "class_names": ("a", "b", "c"),
        "layout": dict(kind="folders", image_dir="img_dir", label_dir="ann_dir",
                       image_suffix=".png", label_suffix=".png"),
        "splits": dict(source=dict(glob="img_dir/train/*.png"),
                       target=dict(glob="img_dir/val/*.png")),
        **fields})


def write_png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8)).save(path)


@pytest.mark.parametrize("kind, fields, image, label", [
    ("folders", dict(image_dir="img_dir", label_dir="ann_dir", image_suffix=".png",
                     label_suffix=".png"),
     "potsdam/img_dir/train/top_1.png", "potsdam/ann_dir/train/top_1.png"),
    ("folders", dict(image_dir="images_png", label_dir="masks_png", image_suffix=".png"),
     "Train/Rural/images_png/12.png", "Train/Rural/masks_png/12.png"),
    ("folders", dict(image_dir="img", label_dir="gt", image_suffix="_rgb.tif",
                     label_suffix="_gt.png"),
     "img/a/b_rgb.tif", "gt/a/b_gt.png"),
    ("pairs", dict(image_suffix="_aerial.tif", label_suffix="_mask.tif"),
     "D004_2021_IMG_1_aerial.tif", "D004_2021_IMG_1_mask.tif"),
    ("same_file", {}, "m-task/sample_3.hdf5", "m-task/sample_3.hdf5"),
    ("regex", dict(label_pattern=r"img/IMG_(\d+)\.tif$", label_replace=r"msk/MSK_\1.tif"),
     "train/D004_2021/Z1_UN/img/IMG_000473.tif", "train/D004_2021/Z1_UN/msk/MSK_000473.tif"),
])
def test_each_layout_kind_finds_the_label(tmp_path, kind, fields, image, label):
    spec = dataset_spec(config(tmp_path, layout=dict(kind=kind, **fields)))
    assert layout.label_path_for(spec, image) == os.path.join(str(tmp_path), label)


def test_layout_kinds_name_what_they_miss(tmp_path):
    with pytest.raises(DataError, match="'folders' needs image_dir and a different label_dir"):
        dataset_spec(config(tmp_path, layout=dict(kind="folders", image_dir="img_dir")))
    with pytest.raises(DataError, match="'pairs' needs image_suffix"):
        dataset_spec(config(tmp_path, layout=dict(kind="pairs", image_suffix=".png")))
    with pytest.raises(DataError, match="layout.kind 'grid'"):
        dataset_spec(config(tmp_path, layout=dict(kind="grid")))
    with pytest.raises(DataError, match="label_pattern is missing"):
        dataset_spec(config(tmp_path, layout=dict(kind="regex")))


def test_splits_without_a_glob_do_not_exist_and_domains_none_means_all(tmp_path):
    for name in ("a", "b"):
        write_png(tmp_path / "img_dir" / "val" / f"{name}.png", np.zeros((4, 4, 3)))
        write_png(tmp_path / "ann_dir" / "val" / f"{name}.png", np.zeros((4, 4)))
    cfg = config(tmp_path)
    cfg.splits.source.glob = ""
    cfg.splits.target.domains = (None,)  # what `--config.data.splits.target.domains=None` gives
    spec = dataset_spec(cfg)
    assert sorted(spec.splits) == ["target"] and spec.splits["target"].domains is None
    assert [t.name for t in layout.list_tiles(spec, "target")] == ["a", "b"]
    with pytest.raises(DataError, match="no split 'source'.*splits.source.glob"):
        layout.list_tiles(spec, "source")
    cfg.root = ""
    with pytest.raises(DataError, match="config.data.root is not set"):
        layout.list_tiles(dataset_spec(cfg), "target")


def test_names_files_select_tiles_txt_and_json(tmp_path):
    for name in ("a", "b", "c"):
        write_png(tmp_path / "img_dir" / "train" / f"{name}.png", np.zeros((4, 4, 3)))
        write_png(tmp_path / "ann_dir" / "train" / f"{name}.png", np.zeros((4, 4)))
    (tmp_path / "train.txt").write_text("c\n\na\n")
    (tmp_path / "partition.json").write_text(json.dumps({"source": ["b"], "test": ["a", "c"]}))
    cfg = config(tmp_path)
    cfg.splits.source.names_file = "train.txt"
    assert [t.name for t in layout.list_tiles(dataset_spec(cfg), "source")] == ["a", "c"]
    cfg.splits.source.names_file = "partition.json"
    assert [t.name for t in layout.list_tiles(dataset_spec(cfg), "source")] == ["b"]  # key: split
    cfg.splits.source.names_key = "test"
    assert [t.name for t in layout.list_tiles(dataset_spec(cfg), "source")] == ["a", "c"]
    cfg.splits.source.names_key = "valid"
    with pytest.raises(DataError, match="partition.json: no list 'valid'.*'source', 'test'"):
        layout.list_tiles(dataset_spec(cfg), "source")


def test_classes_from_names_label_map_pairs_and_reduce_zero_label(tmp_path):
    spec = dataset_spec(config(tmp_path))
    assert spec.num_classes == 3 and len(spec.palette) == 3  # colours generated
    codes = np.array([[0, 1, 2], [3, 255, 7]], np.uint8)
    reduced = dataset_spec(config(tmp_path, reduce_zero_label=True))
    np.testing.assert_array_equal(reduced.remap_labels(codes), [[255, 0, 1], [2, 255, 6]])
    mapped = dataset_spec(config(tmp_path, reduce_zero_label=True, label_map=((7, 2), (3, 255))))
    np.testing.assert_array_equal(mapped.remap_labels(codes), [[255, 0, 1], [255, 255, 2]])
    with pytest.raises(DataError, match="label_map: give"):
        dataset_spec(config(tmp_path, label_map=("7:2",)))
    with pytest.raises(DataError, match="class_names is missing"):
        dataset_spec(config(tmp_path, class_names=None))


def write_geobench(path, bands: dict, label):
    with h5py.File(path, "w") as f:
        for key, plane in bands.items():
            f.create_dataset(key, data=plane)
        f.create_dataset("label", data=label)


def test_hdf5_bands_from_one_dataset_each_and_the_label_beside_them(tmp_path, np_rng):
    planes = {k: np_rng.uniform(0, 3000, (8, 6)).astype(np.float32)
              for k in ("Blue", "Green", "Red", "NearInfrared")}
    label = np_rng.integers(0, 3, (8, 6))
    write_geobench(tmp_path / "s1.hdf5", planes, label)
    cfg = config(tmp_path, format="hdf5", hdf5_band_keys=("Blue", "Green", "Red", "NearInfrared"),
                 bands=("Red", "Green", "Blue", "NearInfrared"), mean=(0,) * 4, std=(1,) * 4,
                 value_scale=1000.0, layout=dict(kind="same_file"),
                 splits=dict(source=dict(glob="*.hdf5")))
    spec = dataset_spec(cfg)
    assert spec.band_names == ("Red", "Green", "Blue", "NearInfrared")
    image, nodata = readers.read_image(str(tmp_path / "s1.hdf5"), spec)
    expected = np.stack([planes[k] for k in ("Red", "Green", "Blue", "NearInfrared")], -1)
    np.testing.assert_array_equal(image, expected)
    assert nodata is None
    info = readers.raster_info(str(tmp_path / "s1.hdf5"), spec)
    assert (info.height, info.width, info.count, info.dtype) == (8, 6, 4, "float32")
    element = sources.TileSource(spec, "source")[0]
    np.testing.assert_allclose(element["image"], expected / 1000.0, rtol=1e-6)
    np.testing.assert_array_equal(element["label"], label)


def test_hdf5_band_errors_name_the_file_and_the_dataset(tmp_path):
    write_geobench(tmp_path / "s1.hdf5", {"Red": np.zeros((4, 4)), "Green": np.zeros((4, 5))},
                   np.zeros((4, 4)))
    cfg = config(tmp_path, format="hdf5", hdf5_band_keys=("Red", "Green", "Blue"),
                 bands=("Red", "Green", "Blue"), layout=dict(kind="same_file"))
    path = str(tmp_path / "s1.hdf5")
    with pytest.raises(DataError, match=r"s1.hdf5: no HDF5 dataset\(s\) \['Blue'\]"):
        readers.read_image(path, dataset_spec(cfg))
    cfg.hdf5_band_keys, cfg.bands = ("Red", "Green"), ("Red", "Green")
    with pytest.raises(DataError, match=r"s1.hdf5: HDF5 dataset 'Green' has shape \(4, 5\)"):
        readers.raster_info(path, dataset_spec(cfg))
    cfg.band_names = ("R", "G", "B")
    with pytest.raises(DataError, match="band_names.*3 bands.*hdf5_band_keys.*2"):
        dataset_spec(cfg)
