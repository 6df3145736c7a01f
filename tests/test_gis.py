"""GIS outputs: dataset codes (the inverse of label_map), QGIS style, legend, label PNGs."""

import numpy as np
import pytest
import rasterio
from PIL import Image

from spectralmoe_jax.data import benchmarks
from spectralmoe_jax.data.spec import DataError, dataset_spec, label_lut
from spectralmoe_jax.evaluation import gis


def codes(label_map, num_classes, ignore=255):
    return gis.dataset_codes(label_lut(label_map, ignore), num_classes, ignore)


def test_dataset_codes_rule():
    # FLAIR: codes 1..12 are classes 0..11; 0 and 13..19 are ignored, nodata the smallest: 0.
    assert codes(benchmarks.FLAIR_LABEL_MAP, 12) == (tuple(range(1, 13)), 0)
    # WHU-OHS merges 24 codes into 7 classes: each class is its smallest code.
    merged = {0: 255, **benchmarks.WHU_OHS_MERGE}
    assert codes(merged, 7) == ((1, 3, 7, 10, 15, 18, 24), 0)
    # mmseg reduce_zero_label (LoveDA, GID): class k is code k + 1, nodata 0.
    assert codes(benchmarks.reduce_zero_label(7), 7) == ((1, 2, 3, 4, 5, 6, 7), 0)
    # No label_map: the identity; nodata the ignore index.
    assert codes(None, 5) == ((0, 1, 2, 3, 4), 255)
    # A code the map moves to k wins over an unlisted code that keeps the value k.
    assert codes({5: 0}, 3) == ((5, 1, 2), 255)
    assert codes({1: 0, 2: 1, 3: 2}, 3) == ((1, 2, 3), 255)
    # Codes beyond 255 are kept (the raster becomes uint16).
    assert codes({1000: 0, 2000: 1}, 2) == ((1000, 2000), 255)
    # A class no code maps to has no dataset code.
    with pytest.raises(DataError, match="class 0: config.data.label_map maps no raw code"):
        codes({0: 1, 1: 255}, 2)


def test_label_encoding_from_the_dataset():
    spec = dataset_spec(benchmarks.flair2_demo())
    encoding = gis.label_encoding(spec)
    assert encoding.values == tuple(range(1, 13)) and encoding.nodata == 0
    assert encoding.dtype == "uint8" and encoding.names == benchmarks.FLAIR_CLASSES
    ids = np.array([[0, 11, 3], [5, 7, 2]])
    valid = np.array([[True, True, False], [True, True, True]])
    stored = encoding.encode(ids, valid)
    np.testing.assert_array_equal(stored, [[1, 12, 0], [6, 8, 3]])
    np.testing.assert_array_equal(encoding.decode(stored), np.where(valid, ids, -1))
    # The stored codes read as the dataset's labels: label_map takes them back to the ids.
    np.testing.assert_array_equal(spec.remap_labels(stored.astype(np.uint8)),
                                  np.where(valid, ids, 255))
    as_ids = gis.label_encoding(spec, "ids")
    assert as_ids.values == tuple(range(12)) and as_ids.nodata == 255
    with pytest.raises(DataError, match="config.predict.labels 'names'"):
        gis.label_encoding(spec, "names")
    wide = gis.LabelEncoding((1000, 2000), 0, ("a", "b"), ((1, 2, 3), (4, 5, 6)))
    assert wide.dtype == "uint16"
    np.testing.assert_array_equal(wide.encode(np.array([1, 0])), [2000, 1000])
    with pytest.raises(DataError, match="nodata value 1000 is also class 0's value"):
        gis.LabelEncoding((1000, 2000), 1000, ("a", "b"), ((1, 2, 3), (4, 5, 6)))


def test_qgis_style_and_legend(tmp_path):
    spec = dataset_spec(benchmarks.flair2_demo())
    encoding = gis.label_encoding(spec)
    path = tmp_path / "scene_pred.qml"
    path.write_text(gis.qgis_style(encoding))
    entries = gis.read_qgis_style(str(path))
    assert entries == [(code, name, tuple(color)) for code, name, color in
                       zip(range(1, 13), benchmarks.FLAIR_CLASSES, benchmarks.FLAIR_PALETTE)]
    # Names with XML specials survive.
    odd = gis.ids_encoding(2, names=["a & b", 'say "x" <y>'])
    (tmp_path / "odd.qml").write_text(gis.qgis_style(odd))
    assert [e[1] for e in gis.read_qgis_style(str(tmp_path / "odd.qml"))] == ["a & b",
                                                                                'say "x" <y>']
    legend = gis.legend_image(encoding, title="FLAIR")
    assert legend.dtype == np.uint8 and legend.shape[2] == 3
    assert legend.shape[0] >= 12 * 16
    # Every class colour appears in the legend as a swatch.
    colors = {tuple(c) for c in legend.reshape(-1, 3)}
    assert all(tuple(c) in colors for c in benchmarks.FLAIR_PALETTE)


def test_label_png_keeps_codes_and_colours(tmp_path):
    spec = dataset_spec(benchmarks.flair2_demo())
    encoding = gis.label_encoding(spec)
    stored = encoding.encode(np.arange(12).reshape(3, 4).repeat(4, 0), None)
    stored[0, 0] = encoding.nodata
    path = str(tmp_path / "tile_pred.png")
    gis.write_label_png(path, stored, encoding)
    with Image.open(path) as image:
        assert image.mode == "P"
        np.testing.assert_array_equal(np.asarray(image), stored)
        rgba = np.asarray(image.convert("RGBA"))
    assert rgba[0, 0, 3] == 0  # nodata transparent
    assert tuple(rgba[0, 1, :3]) == benchmarks.FLAIR_PALETTE[1]
    with rasterio.open(path) as src:  # GIS tools read the codes too
        np.testing.assert_array_equal(src.read(1), stored)
    wide = gis.LabelEncoding((1000, 2000), 0, ("a", "b"), ((1, 2, 3), (4, 5, 6)))
    gis.write_label_png(str(tmp_path / "wide.png"), np.array([[1000, 2000], [0, 1000]]), wide)
    with Image.open(tmp_path / "wide.png") as image:
        np.testing.assert_array_equal(np.asarray(image), [[1000, 2000], [0, 1000]])


def test_sidecars_beside_a_label_raster(tmp_path):
    encoding = gis.ids_encoding(3, names=["water", "forest", "town"],
                                palette=[[0, 0, 255], [0, 128, 0], [200, 0, 0]])
    labels = np.array([[0, 1, 2, 255]], np.uint8).repeat(8, 0).repeat(8, 1)
    path = str(tmp_path / "scene_pred.tif")
    with rasterio.open(path, "w", driver="GTiff", width=32, height=8, count=1, dtype="uint8",
                       nodata=255, crs="EPSG:2154",
                       transform=rasterio.transform.from_origin(0, 8, 1, 1)) as dst:
        dst.write(labels[None])
    sidecars = gis.write_sidecars(path, encoding, title="test")
    assert sidecars.style == str(tmp_path / "scene_pred.qml")
    assert [e[0] for e in gis.read_qgis_style(sidecars.style)] == [0, 1, 2]
    preview = np.asarray(Image.open(sidecars.preview))
    legend = np.asarray(Image.open(sidecars.legend))
    assert preview.shape[0] == max(8, legend.shape[0])
    assert preview.shape[1] == 32 + 8 + legend.shape[1]
    np.testing.assert_array_equal(preview[0, :32:8], [[0, 0, 255], [0, 128, 0], [200, 0, 0],
                                                      [255, 255, 255]])
