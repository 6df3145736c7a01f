"""Polygons of a label raster, per class, as a GeoPackage: streamed over scenes of any size.

`rasterio.features.shapes` traces the 4-connected regions of equal value. Run on a whole scene
it would hold the scene in memory, so the raster is read in row strips: a region that touches
no strip border is complete and written at once; a region touching the strip's bottom border
stays open, and is merged with the regions of the next strip that share a border segment with
it (a shared segment of positive length is exactly 4-connectivity across the border; regions
meeting at a corner stay apart, as in a whole-scene trace). Only the open regions, those
crossing the current border, are kept in memory. Coordinates are traced in pixel units (exact
integers, so merging is exact) and mapped to the raster's CRS on writing.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import rasterio
import rasterio.features
import shapely
from affine import Affine
from rasterio.windows import Window
from shapely.geometry import shape

from spectralmoe_jax.data.spec import DataError
from spectralmoe_jax.evaluation.gis import LabelEncoding

LAYER = "classes"
SCHEMA = {"geometry": "Polygon",
          "properties": {"class_id": "int", "code": "int", "name": "str", "area": "float"}}


@dataclasses.dataclass
class _Region:
    value: int
    geometry: shapely.Geometry   # pixel coordinates
    border: shapely.Geometry | None = None  # its last pixel row, when it touches the border


def polygons_path(label_path: str) -> str:
    return os.path.splitext(label_path)[0] + ".gpkg"


def write_polygons(label_path: str, dst_path: str, labels: LabelEncoding, *,
                   min_area: float = 0.0, strip_rows: int = 1024) -> int:
    """Writes one polygon per connected region of each class of the label raster (values as
    `labels` stores them; nodata and values of no class are skipped) to the GeoPackage
    `dst_path`, layer 'classes', fields class_id, code, name and area (CRS units squared).
    Regions smaller than `min_area` are dropped. Returns the number of polygons written."""
    import fiona

    if strip_rows < 1:
        raise ValueError(f"strip_rows {strip_rows} must be positive")
    with rasterio.open(label_path) as src:
        if src.crs is None:
            raise DataError(f"{label_path}: polygons need a georeferenced label raster (no CRS)")
        transform, crs_wkt = src.transform, src.crs.to_wkt()
        pixel_area = abs(transform.a * transform.e - transform.b * transform.d)
        classes = {value: k for k, value in enumerate(labels.values)}
        if os.path.exists(dst_path):
            os.remove(dst_path)
        count = 0
        with fiona.open(dst_path, "w", driver="GPKG", layer=LAYER, schema=SCHEMA,
                        crs_wkt=crs_wkt) as sink:

            def emit(region: _Region) -> None:
                nonlocal count
                geometry = shapely.simplify(region.geometry, 0)  # drop the strip-border vertices
                for part in getattr(geometry, "geoms", [geometry]):
                    area = part.area * pixel_area
                    if area < min_area:
                        continue
                    k = classes[region.value]
                    part = shapely.affinity.affine_transform(
                        part, [transform.a, transform.b, transform.d, transform.e,
                               transform.c, transform.f])
                    sink.write({"geometry": shapely.geometry.mapping(part), "properties": {
                        "class_id": k, "code": region.value, "name": labels.names[k],
                        "area": area}})
                    count += 1

            open_regions: list[_Region] = []
            for top in range(0, src.height, strip_rows):
                rows = min(strip_rows, src.height - top)
                strip = src.read(1, window=Window(0, top, src.width, rows))
                known = np.isin(strip, list(classes))
                traced = [_Region(int(value), shape(geojson)) for geojson, value in
                          rasterio.features.shapes(strip, mask=known, connectivity=4,
                                                   transform=Affine.translation(0, top))]
                bottom = top + rows if top + rows < src.height else None
                open_regions = _merge_strip(open_regions, traced, top, bottom, src.width, emit)
            for region in open_regions:
                emit(region)
    return count


def _merge_strip(open_regions: list[_Region], traced: list[_Region], top: int,
                 bottom: int | None, width: int, emit) -> list[_Region]:
    """Joins a strip's regions to the regions open at its top border; emits the complete ones
    and returns those open at its bottom border (None: the last strip)."""
    parent = list(range(len(open_regions) + len(traced)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    if open_regions:
        # This strip's first pixel row, per region that reaches it.
        firsts = [(i, shapely.clip_by_rect(r.geometry, 0, top, width, top + 1))
                  for i, r in enumerate(traced) if r.geometry.bounds[1] == top]
        if firsts:
            tree = shapely.STRtree([g for _, g in firsts])
            for a, region in enumerate(open_regions):
                for hit in tree.query(region.border):
                    b, first = firsts[hit]
                    if (traced[b].value == region.value
                            and region.border.intersection(first).length > 0):
                        parent[find(a)] = find(len(open_regions) + b)

    members: dict[int, list[_Region]] = {}
    for i, region in enumerate(open_regions + traced):
        members.setdefault(find(i), []).append(region)
    still_open = []
    for group in members.values():
        geometry = (group[0].geometry if len(group) == 1
                    else shapely.union_all([r.geometry for r in group]))
        region = _Region(group[0].value, geometry)
        if bottom is not None and geometry.bounds[3] == bottom:
            region.border = shapely.clip_by_rect(geometry, 0, bottom - 1, width, bottom)
            still_open.append(region)
        else:
            emit(region)
    return still_open
