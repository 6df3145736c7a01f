"""Polygons per class, streamed over row strips: the same polygons as tracing the whole
scene at once (regions crossing strip borders come out whole), CRS kept, minimum area."""

import fiona
import numpy as np
import pytest
import rasterio
import rasterio.features
import shapely
from rasterio.transform import from_origin
from scipy import ndimage
from shapely.geometry import shape

from spectralmoe_jax.data.spec import DataError
from spectralmoe_jax.evaluation.gis import LabelEncoding
from spectralmoe_jax.evaluation.vectors import LAYER, write_polygons

TRANSFORM = from_origin(961436.8, 6329262.4, 0.5, 0.5)
ENCODING = LabelEncoding(values=(1, 2, 3, 4, 5), nodata=0,
                         names=("grass", "road", "roof", "pool", "tree"),
                         colors=((0, 200, 0), (90, 90, 90), (200, 0, 0), (0, 0, 255),
                                 (0, 90, 0)))


def write_raster(path, labels, crs="EPSG:2154"):
    with rasterio.open(path, "w", driver="GTiff", width=labels.shape[1], height=labels.shape[0],
                       count=1, dtype="uint8", nodata=0, crs=crs, transform=TRANSFORM) as dst:
        dst.write(labels[None])
    return str(path)


def shapes_scene():
    """Regions built to cross the borders of 8-row strips."""
    labels = np.ones((40, 30), np.uint8)          # grass everywhere
    labels[10:24, 3:6] = 2                        # a U of road: two arms over the border at 16,
    labels[10:24, 10:13] = 2                      # joined below it
    labels[20:24, 3:13] = 2
    labels[4:14, 16:26] = 3                       # a roof ring over the border at 8 ...
    labels[6:12, 19:23] = 4                       # ... holding a pool
    labels[7, 28] = 2                             # road pixels meeting at a corner across the
    labels[8, 29] = 2                             # border at 8: two regions, not one
    labels[1:39, 14] = 5                          # a tree line through every strip
    labels[30:36, 20:28] = 0                      # nodata over the border at 32
    labels[34:38, 2:4] = 99                       # a value of no class: no polygon
    return labels


def smooth_scene(seed, shape=(48, 37)):
    """Blobs of 5 classes, with holes and nesting, and a nodata patch."""
    rng = np.random.default_rng(seed)
    field = ndimage.zoom(rng.random((shape[0] // 4 + 2, shape[1] // 4 + 2)), 4, order=1)
    labels = (1 + np.digitize(field[:shape[0], :shape[1]], [0.3, 0.45, 0.55, 0.7])).astype(np.uint8)
    labels[rng.random(shape) < 0.02] = 3          # speckle: single-pixel regions
    labels[5:9, 30:35] = 0
    return labels


def whole_scene_polygons(labels, min_area=0.0):
    """The reference: rasterio.features.shapes on the whole label map, in CRS coordinates."""
    known = np.isin(labels, ENCODING.values)
    out = []
    for geojson, value in rasterio.features.shapes(labels, mask=known, connectivity=4,
                                                   transform=TRANSFORM):
        geometry = shape(geojson)
        if geometry.area >= min_area:
            out.append((int(value), geometry))
    return out


def read_polygons(path):
    with fiona.open(path, layer=LAYER) as src:
        crs = src.crs
        features = [(f["properties"]["code"], f["properties"]["class_id"],
                     f["properties"]["name"], f["properties"]["area"], shape(f["geometry"]))
                    for f in src]
    return crs, features


def assert_same_polygons(features, reference):
    assert len(features) == len(reference)
    unmatched = list(reference)
    for code, class_id, name, area, geometry in features:
        assert ENCODING.values[class_id] == code and ENCODING.names[class_id] == name
        assert geometry.is_valid and geometry.geom_type == "Polygon"
        assert area == pytest.approx(geometry.area)
        match = [i for i, (value, ref) in enumerate(unmatched)
                 if value == code and ref.equals(geometry)]
        assert len(match) == 1, f"no whole-scene polygon equals this {ENCODING.names[class_id]}"
        unmatched.pop(match[0])


@pytest.mark.parametrize("strip_rows", [8, 3, 1, 64])
def test_strips_give_the_whole_scene_polygons(tmp_path, strip_rows):
    labels = shapes_scene()
    raster = write_raster(tmp_path / "labels.tif", labels)
    count = write_polygons(raster, str(tmp_path / "labels.gpkg"), ENCODING,
                           strip_rows=strip_rows)
    crs, features = read_polygons(tmp_path / "labels.gpkg")
    assert crs.to_epsg() == 2154
    reference = whole_scene_polygons(labels)
    assert count == len(features)
    assert_same_polygons(features, reference)
    names = [f[2] for f in features]
    assert names.count("road") == 3       # the U (one region) and the two corner pixels
    assert names.count("pool") == 1 and names.count("tree") == 1
    roof = next(f[4] for f in features if f[2] == "roof")
    assert len(roof.interiors) == 1       # the ring keeps its hole
    # Areas in square metres: the U is 3 x 14 x 2 + 4 x 4 pixels of 0.25 m^2.
    u = max((f for f in features if f[2] == "road"), key=lambda f: f[3])
    assert u[3] == pytest.approx((3 * 14 * 2 + 4 * 4) * 0.25)


@pytest.mark.parametrize("seed, strip_rows", [(0, 5), (1, 2), (2, 16)])
def test_random_scenes_and_minimum_area(tmp_path, seed, strip_rows):
    labels = smooth_scene(seed)
    raster = write_raster(tmp_path / "labels.tif", labels)
    write_polygons(raster, str(tmp_path / "all.gpkg"), ENCODING, strip_rows=strip_rows)
    _, features = read_polygons(tmp_path / "all.gpkg")
    reference = whole_scene_polygons(labels)
    assert len(reference) > 20
    assert_same_polygons(features, reference)
    # Together the polygons cover every labelled pixel once.
    union = shapely.union_all([f[4] for f in features])
    assert union.area == pytest.approx(np.isin(labels, ENCODING.values).sum() * 0.25)
    assert sum(f[3] for f in features) == pytest.approx(union.area)
    # Minimum area (square metres): small regions, speckle among them, are dropped.
    write_polygons(raster, str(tmp_path / "big.gpkg"), ENCODING, strip_rows=strip_rows,
                   min_area=2.0)
    _, big = read_polygons(tmp_path / "big.gpkg")
    assert 0 < len(big) < len(features)
    assert_same_polygons(big, whole_scene_polygons(labels, min_area=2.0))


def test_needs_a_crs(tmp_path):
    raster = write_raster(tmp_path / "labels.tif", shapes_scene(), crs=None)
    with pytest.raises(DataError, match="polygons need a georeferenced label raster"):
        write_polygons(raster, str(tmp_path / "x.gpkg"), ENCODING)
