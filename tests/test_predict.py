"""The predict mode end to end (tiny model, real FLAIR #2 tiles): which files of a folder are
predicted, the dataset's codes or ids, nodata, the QGIS style, legend, preview, probability
bands and polygons read back; PNG inputs give PNG outputs."""

import dataclasses
import os
import shutil
import warnings

import fiona
import jax
import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window
from shapely.geometry import shape

from spectralmoe_jax.data import benchmarks
from spectralmoe_jax.data.spec import DataError, dataset_spec
from spectralmoe_jax.evaluation import gis
from spectralmoe_jax.evaluation.predict import list_scenes, predict_paths
from spectralmoe_jax.evaluation.scene import SceneInput, SceneOutput, Tiling, predict_scene
from spectralmoe_jax.build import build_segmentor
from tests.tiny import tiny_run

SIZE = 96
HOLE = (slice(40, 56), slice(30, 50))  # nodata in every band: no label, a hole in the polygon


def crop_tile(src_path, dst_path, nodata_hole=False):
    """The top-left SIZE x SIZE of a FLAIR tile (5 bands, EPSG:2154), optionally with nodata."""
    with rasterio.open(src_path) as src:
        data = src.read(window=Window(0, 0, SIZE, SIZE))
        profile = dict(src.profile, width=SIZE, height=SIZE, transform=src.window_transform(
            Window(0, 0, SIZE, SIZE)), nodata=0 if nodata_hole else None)
    data = np.maximum(data, 1)
    if nodata_hole:
        data[:, HOLE[0], HOLE[1]] = 0
    with rasterio.open(dst_path, "w", **profile) as dst:
        dst.write(data)
    return str(dst_path)


def with_predict(run, **fields):
    return dataclasses.replace(run, predict=dataclasses.replace(run.predict, **fields))


@pytest.fixture(scope="module")
def model_and_run():
    run = with_predict(tiny_run(), window=128, overlap=32)
    return build_segmentor(run.model, seed=0).model, run


@pytest.fixture
def folder(tmp_path):
    """A FLAIR-layout folder: two images with their masks, a corrupt image, an earlier output."""
    root = benchmarks.DEMO_ROOT
    folder = tmp_path / "scenes"
    folder.mkdir()
    for stem, hole in (("D004_2021_IMG_000687", True), ("D055_2018_IMG_036294", False)):
        crop_tile(os.path.join(root, f"{stem}_aerial.tif"), folder / f"{stem}_aerial.tif", hole)
        crop_tile(os.path.join(root, f"{stem}_mask.tif"), folder / f"{stem}_mask.tif")
    (folder / "D001_2020_IMG_000001_aerial.tif").write_bytes(b"II*\x00 not a tiff")
    shutil.copy(folder / "D055_2018_IMG_036294_aerial.tif",
                folder / "D055_2018_IMG_036294_aerial_pred.tif")
    return folder


def test_folder_takes_the_layouts_images(folder, tmp_path):
    spec = dataset_spec(benchmarks.flair2_demo())
    names = [os.path.basename(p) for p in list_scenes(spec, str(folder))]
    assert names == ["D001_2020_IMG_000001_aerial.tif", "D004_2021_IMG_000687_aerial.tif",
                     "D055_2018_IMG_036294_aerial.tif"]  # no masks, no earlier outputs
    # The released layout: images under <split>/image/, labels under <split>/label/.
    root = tmp_path / "released"
    for split in ("source_dir", "target_dir"):
        for kind in ("image", "label"):
            (root / split / kind).mkdir(parents=True)
            (root / split / kind / f"{split}_1.tif").write_bytes(b"")
    released = dataset_spec(benchmarks.flair())
    assert [os.path.relpath(p, root) for p in list_scenes(released, str(root))] == [
        "source_dir/image/source_dir_1.tif", "target_dir/image/target_dir_1.tif"]
    # A folder below the layout's root: its files of the format, labels still left out.
    assert [os.path.relpath(p, root) for p in list_scenes(released, str(root / "target_dir"))
            ] == ["target_dir/image/target_dir_1.tif"]


def test_predict_folder_codes_ids_and_gis_files(model_and_run, folder, tmp_path, capsys):
    model, run = model_and_run
    out = tmp_path / "codes"
    written = predict_paths(model, with_predict(run, probabilities=True,
                                                probability_dtype="float16", vector=True),
                            str(folder), str(out))
    assert "skipping" in capsys.readouterr().out  # the corrupt file, with a message
    assert [os.path.basename(p) for p in written] == ["D004_2021_IMG_000687_aerial_pred.tif",
                                                      "D055_2018_IMG_036294_aerial_pred.tif"]
    ids_paths = predict_paths(model, with_predict(run, labels="ids"),
                              [str(folder / "D004_2021_IMG_000687_aerial.tif")],
                              str(tmp_path / "ids"))

    spec = run.data
    encoding = gis.label_encoding(spec)  # the default, 'codes'
    source = folder / "D004_2021_IMG_000687_aerial.tif"
    stem = str(out / "D004_2021_IMG_000687_aerial_pred")
    with rasterio.open(source) as src, rasterio.open(stem + ".tif") as labels, \
            rasterio.open(ids_paths[0]) as ids:
        assert labels.crs == src.crs and labels.transform == src.transform
        assert labels.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert labels.nodata == 0 and ids.nodata == 255
        assert labels.colormap(1)[1] == (*benchmarks.FLAIR_PALETTE[0], 255)
        codes, train_ids = labels.read(1), ids.read(1)
    hole = np.zeros((SIZE, SIZE), bool)
    hole[HOLE] = True
    np.testing.assert_array_equal(codes == 0, hole)       # nodata kept, as the dataset's 0
    np.testing.assert_array_equal(train_ids == 255, hole)
    # The codes are the ids through the inverse of label_map: FLAIR code = id + 1.
    np.testing.assert_array_equal(codes[~hole], train_ids[~hole] + 1)
    np.testing.assert_array_equal(spec.remap_labels(codes)[~hole], train_ids[~hole])

    style = gis.read_qgis_style(stem + ".qml")
    assert [(v, n) for v, n, _ in style] == list(zip(range(1, 13), benchmarks.FLAIR_CLASSES))
    assert np.asarray(Image.open(stem + "_legend.png")).shape[0] >= 12 * 16
    preview = np.asarray(Image.open(stem + "_color.png"))
    assert preview.shape[1] > SIZE
    np.testing.assert_array_equal(preview[:SIZE, :SIZE][hole], 255)  # nodata white

    with rasterio.open(stem + "_probabilities.tif") as probs:
        assert probs.count == 12 and probs.tags(1, ns="IMAGE_STRUCTURE")["NBITS"] == "16"
        assert probs.descriptions == benchmarks.FLAIR_CLASSES
        p = probs.read()
    assert np.isnan(p[:, hole]).all()
    np.testing.assert_allclose(p[:, ~hole].sum(0), 1.0, atol=1e-2)
    assert ((p.argmax(0) == train_ids) | hole).mean() > 0.99

    with fiona.open(stem + ".gpkg") as polygons:
        assert polygons.crs.to_epsg() == 2154
        features = list(polygons)
    area = sum(f["properties"]["area"] for f in features)
    assert area == pytest.approx((~hole).sum() * 0.2 * 0.2)
    for f in features:
        assert f["properties"]["code"] == encoding.values[f["properties"]["class_id"]]
        assert f["properties"]["name"] == encoding.names[f["properties"]["class_id"]]
    assert any(len(shape(f["geometry"]).interiors) == 1 for f in features)  # around the hole


def test_output_never_overwrites_an_input(model_and_run, folder):
    model, run = model_and_run
    scene = str(folder / "D055_2018_IMG_036294_aerial.tif")
    earlier = str(folder / "D055_2018_IMG_036294_aerial_pred.tif")
    before = open(earlier, "rb").read()
    with pytest.raises(DataError, match="would overwrite this input"):
        predict_paths(model, run, [scene, earlier], str(folder))
    assert open(earlier, "rb").read() == before
    with pytest.raises(FileNotFoundError, match="scene not found"):
        predict_paths(model, run, str(folder / "missing.tif"), str(folder))


def test_png_input_gives_png_labels(tmp_path):
    # A PNG tile (no georeferencing) -> a paletted PNG of codes, without rasterio's warning.
    encoding = gis.label_encoding(dataset_spec(benchmarks.flair2_demo()))
    rgb = np.random.default_rng(0).integers(1, 255, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "tile.png")
    weight = np.random.default_rng(1).normal(size=(3, 12)).astype(np.float32)
    predict = jax.jit(lambda x: sum(x[..., c:c + 1] * weight[c] for c in range(3)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotGeoreferencedWarning)
        result = predict_scene(predict, str(tmp_path / "tile.png"),
                               str(tmp_path / "tile_pred.png"), num_classes=12,
                               scene_input=SceneInput([128] * 3, [64] * 3),
                               tiling=Tiling(window=32, overlap=8), output=SceneOutput(encoding),
                               progress=False)
        gis.write_sidecars(result.labels_path, encoding)
    assert not result.georeferenced
    assert sorted(os.listdir(tmp_path)) == ["tile.png", "tile_pred.png", "tile_pred.qml",
                                            "tile_pred_color.png", "tile_pred_legend.png"]
    with Image.open(tmp_path / "tile_pred.png") as image:
        assert image.mode == "P" and image.size == (50, 40)
        codes = np.asarray(image)
    scores = ((rgb - 128.0) / 64.0) @ weight
    decided = np.diff(np.sort(scores, -1)[..., -2:], axis=-1)[..., 0] > 1e-4
    np.testing.assert_array_equal(codes[decided], scores.argmax(-1)[decided] + 1)


def test_scene_reader_names_the_file_and_the_problem(folder):
    from spectralmoe_jax.evaluation.scene_io import SceneReader

    spec = dataset_spec(benchmarks.flair2_demo())
    good = SceneInput.from_spec(spec)
    assert good.bands == (0, 1, 2, 3) and good.band_count == 5
    with SceneReader(str(folder / "D004_2021_IMG_000687_aerial.tif"), good) as reader:
        assert reader.indexes == [1, 2, 3, 4] and reader.georeferenced
        window = reader.read(Window(0, 0, 8, 4))
    assert window.shape == (4, 8, 4) and window.dtype == np.float32
    corrupt = str(folder / "D001_2020_IMG_000001_aerial.tif")
    with pytest.raises(DataError, match="D001_2020_IMG_000001_aerial.tif: cannot open"):
        SceneReader(corrupt, good)
    mask = str(folder / "D004_2021_IMG_000687_mask.tif")
    with pytest.raises(DataError, match="_mask.tif: has 1 bands, config expects 5"):
        SceneReader(mask, good)
    named = SceneInput(good.mean, good.std, bands=("R", "G", "B", "SWIR"),
                       band_names=("R", "G", "B", "NIR", "elevation"))
    with pytest.raises(DataError, match="band name 'SWIR' is not one of config.data.band_names"):
        SceneReader(str(folder / "D004_2021_IMG_000687_aerial.tif"), named)


def test_routing_maps_are_the_models_top1_experts_georeferenced(model_and_run, tmp_path):
    """predict.routing_maps: one band per block at patch resolution, each window's patches the
    model's own top-1 experts (`aux['expert_v']`), on the scene's grid scaled by the patch."""
    from affine import Affine

    from spectralmoe_jax.evaluation.runner import routing_maps

    model, run = model_and_run
    scene = crop_tile(os.path.join(benchmarks.DEMO_ROOT, "D004_2021_IMG_000473_aerial.tif"),
                      tmp_path / "scene_aerial.tif")
    predict_paths(model, with_predict(run, routing_maps=True), scene, str(tmp_path / "out"))
    patch, blocks = model.vfm.config.patch_size, model.vfm.config.depth
    with rasterio.open(tmp_path / "out" / "scene_aerial_pred_experts.tif") as src, \
            rasterio.open(scene) as image:
        maps = src.read()
        assert maps.shape == (blocks, SIZE // patch, SIZE // patch)
        assert src.crs == image.crs and src.transform == image.transform @ Affine.scale(patch)
    assert maps.max() < model.adapter.config.num_experts
    # The scene (96 px) fits one window (128): the maps are the model's on the whole image.
    reader_input = SceneInput.from_spec(run.data)
    with rasterio.open(scene) as image:
        raw = np.moveaxis(image.read([1, 2, 3, 4]).astype(np.float32), 0, -1)
    normalised = (raw / reader_input.value_scale - np.asarray(reader_input.mean)) / np.asarray(
        reader_input.std)
    np.testing.assert_array_equal(maps, routing_maps(model, normalised.astype(np.float32)))
