"""The `predict` mode: scenes in, GIS-ready results out.

For each input scene `<stem>` (a GeoTIFF, or a PNG / JPEG tile), in the output folder:
  <stem>_pred.tif            labels as a COG with the input's CRS and transform (a PNG input
                             gives <stem>_pred.png): the dataset's own codes by default
                             (`predict.labels`, see `gis.py`), nodata kept
  <stem>_pred.qml            QGIS style: paletted, class names (QGIS loads it with the raster)
  <stem>_pred_legend.png     the legend
  <stem>_pred_color.png      colour preview with a legend strip
  <stem>_pred_probabilities.tif   per-class probabilities (`predict.probabilities`), a
                             compressed uint8-scaled or float16 COG (`probability_dtype`)
  <stem>_pred.gpkg           polygons per class (`predict.vector`, `min_area`)
  <stem>_pred_experts.tif    the adapter's top-1 expert of every patch after every block
                             (`predict.routing_maps`), one uint8 band per block at patch
                             resolution, georeferenced (a PNG input: `_pred_experts.tif` without)

A folder is read as the config's layout describes it (`data/layout.py`): the images its split
globs list (else the folder's files of the configured format), never the labels those images
pair with, nor outputs of an earlier prediction. A file that cannot be read is skipped with a
message; an output path that is an input path stops the run before anything is written.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re

from flax import nnx

from spectralmoe_jax.data.layout import label_path_for
from spectralmoe_jax.data.readers import GEOTIFF_EXTENSIONS, PIL_EXTENSIONS
from spectralmoe_jax.data.spec import DataError, DatasetSpec
from spectralmoe_jax.evaluation import gis
from spectralmoe_jax.evaluation.scene_io import SceneInput, SceneOutput

PRED_SUFFIX = "_pred"
NO_EXPERT = 255  # routing maps: patches of a border sliver narrower than the model's multiple
# Names of this mode's outputs, so that predicting into an input folder twice does not predict
# the first run's results.
OUTPUT_PATTERN = re.compile(r"_pred(_probabilities|_legend|_color|_experts)?\.(tif|png|qml|gpkg)$")
FORMAT_EXTENSIONS = {"geotiff": GEOTIFF_EXTENSIONS, "image": PIL_EXTENSIONS}


def list_scenes(spec: DatasetSpec, folder: str) -> list[str]:
    """The images of a folder, as the config's layout describes them (see the module doc)."""
    if spec.format not in FORMAT_EXTENSIONS:
        raise DataError(f"config.data.format {spec.format!r}: predict reads GeoTIFF, PNG and "
                        "JPEG scenes (format 'geotiff' or 'image')")
    layout = dataclasses.replace(spec, root=folder)
    relative = set()
    for split in spec.splits.values():
        for path in glob.glob(os.path.join(folder, split.glob), recursive=True):
            if os.path.isfile(path):
                relative.add(os.path.relpath(path, folder))
    if not relative:  # a folder of scenes outside the split globs: its files of the format
        extensions = FORMAT_EXTENSIONS[spec.format]
        for parent, dirs, files in os.walk(folder):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            relative |= {os.path.relpath(os.path.join(parent, f), folder) for f in files
                         if os.path.splitext(f)[1].lower() in extensions}
    relative = {r for r in relative if not OUTPUT_PATTERN.search(r)}
    # Where the layout's label pattern recognises images, the rest are not images of it.
    images = {r for r in relative if re.search(spec.label_pattern, r)} or relative
    labels = {os.path.relpath(label_path_for(layout, r), folder)
              for r in images if re.search(spec.label_pattern, r)}
    return [os.path.join(folder, r) for r in sorted(images - labels)]


def input_paths(spec: DatasetSpec, input_path) -> list[str]:
    """Scenes to predict from a file, a folder or a list of files."""
    if isinstance(input_path, (list, tuple)):
        paths = [str(p) for p in input_path]
    elif os.path.isdir(input_path):
        paths = list_scenes(spec, input_path)
        if not paths:
            raise FileNotFoundError(f"no images to predict in {input_path}: nothing matches "
                                    "the config.data.splits globs or the format's extensions "
                                    f"{FORMAT_EXTENSIONS[spec.format]}")
    else:
        paths = [input_path]
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"scene not found: {path}")
    return paths


def output_paths(path: str, output_dir: str, predict_config) -> list[str]:
    """Every file predict writes for the scene `path`."""
    stem = os.path.join(output_dir, os.path.splitext(os.path.basename(path))[0] + PRED_SUFFIX)
    ext = ".tif" if os.path.splitext(path)[1].lower() in GEOTIFF_EXTENSIONS else ".png"
    outputs = [stem + ext, stem + ".qml", stem + "_legend.png", stem + "_color.png"]
    if predict_config.probabilities:
        outputs.append(stem + "_probabilities.tif")
    if predict_config.vector:
        outputs.append(stem + ".gpkg")
    if predict_config.routing_maps:
        outputs.append(stem + "_experts.tif")
    return outputs


def predict_paths(model, run, input_path, output_dir: str) -> list[str]:
    """Predicts every scene of `input_path` (a file, a folder or a list of files) with `model`
    and the run's data and predict sections (`RunConfig`) into `output_dir`; returns the label
    rasters written. See the module docstring."""
    from spectralmoe_jax.evaluation.runner import patch_multiple, state_predict_fn
    from spectralmoe_jax.evaluation.scene import Tiling, predict_scene
    from spectralmoe_jax.evaluation.vectors import polygons_path, write_polygons

    spec, pc = run.data, run.predict
    labels = gis.label_encoding(spec, pc.labels)
    paths = input_paths(spec, input_path)
    os.makedirs(output_dir, exist_ok=True)
    inputs = {os.path.realpath(p) for p in paths}
    for path in paths:
        for out in output_paths(path, output_dir, pc):
            if os.path.realpath(out) in inputs:
                raise DataError(f"{out}: predicting {path} would overwrite this input; choose "
                                "another output folder (--output)")

    scene_input = SceneInput.from_spec(spec)
    tiling = Tiling(window=pc.window, overlap=pc.overlap, patch_multiple=patch_multiple(model),
                    tta=pc.flip)
    output = SceneOutput(
        labels=labels, probability_kind="normalize",
        probabilities=pc.probability_dtype if pc.probabilities else None)
    graphdef, state = nnx.split(model)
    predict_fn = state_predict_fn(graphdef)
    written, skipped = [], []
    for path in paths:
        try:  # an unreadable file, or one without the configured bands, is skipped
            result = predict_scene(predict_fn, path, output_paths(path, output_dir, pc)[0],
                                   num_classes=spec.num_classes, scene_input=scene_input,
                                   tiling=tiling, output=output, params=state)
        except DataError as error:
            print(f"skipping {path}: {error}")
            skipped.append(path)
            continue
        gis.write_sidecars(result.labels_path, labels, title=f"{spec.name}: predicted classes")
        if pc.vector:
            if result.georeferenced:
                count = write_polygons(result.labels_path, polygons_path(result.labels_path),
                                       labels, min_area=pc.min_area)
                print(f"wrote {count} polygons to {polygons_path(result.labels_path)}")
            else:
                print(f"no polygons for {path}: it has no georeferencing")
        if pc.routing_maps:
            experts = output_paths(path, output_dir, pc)[-1]
            if write_routing_maps(model, path, experts, scene_input, pc.window):
                print(f"wrote {experts}")
        written.append(result.labels_path)
        print(f"wrote {result.labels_path}")
    if skipped and not written:
        raise DataError(f"none of the {len(paths)} scenes could be read: {', '.join(skipped)}")
    if skipped:
        print(f"skipped {len(skipped)} of {len(paths)} scenes that could not be read")
    return written


def write_routing_maps(model, path: str, dst_path: str, scene_input: SceneInput,
                       window: int) -> bool:
    """The top-1 expert of every patch after every block (`aux['expert_v']`) over the scene, in
    windows of `window` pixels (no overlap: routing is per token), as a GeoTIFF with one uint8
    band per block at patch resolution (the scene's transform scaled by the patch size).
    False, writing nothing, when the adapter does not route (REIN, w/o MoE, no adapter)."""
    import numpy as np
    import rasterio
    from affine import Affine
    from rasterio.windows import Window

    from spectralmoe_jax.evaluation.runner import patch_multiple, routing_maps
    from spectralmoe_jax.evaluation.scene_io import SceneReader

    if model.adapter is None or not model.adapter.config.routed:
        return False
    patch, multiple = model.vfm.config.patch_size, patch_multiple(model)
    window = max(multiple, window - window % multiple)
    with SceneReader(path, scene_input) as reader:
        height, width = reader.height // patch, reader.width // patch
        maps = np.full((model.vfm.config.depth, height, width), NO_EXPERT, np.uint8)
        for y in range(0, reader.height, window):
            for x in range(0, reader.width, window):
                region = Window(x, y, min(window, reader.width - x), min(window, reader.height - y))
                image = reader.read(region)
                if min(image.shape[:2]) < multiple:  # a sliver at the border: left NO_EXPERT
                    continue
                experts = routing_maps(model, image)  # [L, h, w] of the whole patches
                maps[:, y // patch:y // patch + experts.shape[1],
                     x // patch:x // patch + experts.shape[2]] = experts
        profile = dict(driver="GTiff", width=width, height=height, count=maps.shape[0],
                       dtype="uint8", compress="deflate", nodata=NO_EXPERT)
        if reader.georeferenced:
            profile.update(crs=reader.crs, transform=reader.transform @ Affine.scale(patch))
        with rasterio.open(dst_path, "w", **profile) as dst:
            dst.write(maps)
            for layer in range(maps.shape[0]):
                dst.set_band_description(layer + 1, f"block {layer}: top-1 expert")
    return True
