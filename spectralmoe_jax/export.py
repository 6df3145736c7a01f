"""`--mode export`: the trained segmentor for use outside this package, at a fixed tile size.

One function is exported, `tile_probabilities`: a normalised tile [1, C, S, S] (bands in
`data.bands` order, (x / value_scale - mean) / std) -> class probabilities
[1, K, S, S], the Mask2Former semantic scores normalised to sum to 1 over the classes (their
argmax is the predicted class). Channels first, as the QGIS Deepness plugin feeds its models.

  model.onnx        ONNX (jax2onnx), float32, weights inside (or in model.onnx.data beyond
                    2 GB), with Deepness metadata: model_type, class_names, tiles_size,
                    tiles_overlap, resolution and standardization_mean / _std, which map
                    Deepness' x / 255 input to the normalised tile (docs/gis.md)
  model.jax_export  `jax.export` serialisation of (weights, tile) -> probabilities for CPU,
                    CUDA and TPU; `model_params.npz` holds the weights in its argument order
  export.json       input layout, normalisation, classes and their dataset codes, and the check

The export checks itself: onnxruntime and the deserialised `jax.export` run a real tile of the
dataset (when its files are at hand) against the JAX model; class probabilities must agree to
1e-4 relative (max |a - b| / max |b|) and the labels must be identical except at near-ties.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spectralmoe_jax.data.spec import DataError
from spectralmoe_jax.errors import ConfigError
from spectralmoe_jax.models.segmentor import Segmentor, SegmentorConfig

TOLERANCE = 1e-4
ONNX_NAME, JAX_NAME, PARAMS_NAME, INFO_NAME = ("model.onnx", "model.jax_export",
                                                "model_params.npz", "export.json")
SINGLE_FILE_LIMIT = 1_800_000_000  # protobuf's 2 GB limit, with room for the graph
JAX_PLATFORMS = ("cpu", "cuda", "tpu")


class ExportError(RuntimeError):
    """The exported model does not reproduce the JAX model."""


@dataclasses.dataclass(frozen=True)
class ExportResult:
    onnx_path: str
    jax_path: str
    params_path: str
    info_path: str
    check: dict


def tile_probabilities(model, tiles: jax.Array) -> jax.Array:
    """[B, C, S, S] normalised tiles -> [B, K, S, S] class probabilities (the exported
    function; the scores are `runner.semantic_scores`, the ones predict blends)."""
    from spectralmoe_jax.evaluation.runner import semantic_scores

    scores = semantic_scores(model, jnp.transpose(tiles, (0, 2, 3, 1)))
    scores = jnp.maximum(scores, 0.0)
    probs = scores / jnp.maximum(jnp.sum(scores, axis=-1, keepdims=True), 1e-12)
    return jnp.transpose(probs, (0, 3, 1, 2))


def export_segmentor_config(config: SegmentorConfig) -> SegmentorConfig:
    """The model an exported graph is traced from: float32 compute and XLA attention (no cuDNN
    or Pallas kernels, which neither ONNX nor the other platforms have)."""
    f32 = jnp.dtype("float32")

    def vit(c):
        return None if c is None else dataclasses.replace(c, dtype="float32", attention="xla")

    adapter = config.adapter and dataclasses.replace(config.adapter, dtype=f32)
    return dataclasses.replace(config, vfm=vit(config.vfm), depth=vit(config.depth),
                               adapter=adapter,
                               decoder=dataclasses.replace(config.decoder, dtype=f32))


def for_export(model: Segmentor) -> Segmentor:
    """`model`'s weights in the module structure of `export_segmentor_config` (the settings
    change how it computes, not its parameters)."""
    config = export_segmentor_config(model.config)
    abstract = nnx.eval_shape(lambda: Segmentor(config, rngs=nnx.Rngs(0)))
    return nnx.merge(nnx.graphdef(abstract), nnx.state(model))


def deepness_metadata(run, resolution_cm: float | None) -> dict[str, str]:
    """Deepness reads these keys (JSON values): the model's type and classes, its tile size and
    overlap, the ground resolution, and the standardisation after its x / 255: with
    mean' = mean * value_scale / 255 and std' = std * value_scale / 255, Deepness'
    (x / 255 - mean') / std' is our (x / value_scale - mean) / std."""
    spec = run.data
    scale = spec.value_scale / 255.0
    meta = {
        "model_type": "Segmentor",
        "class_names": {k: name for k, name in enumerate(spec.class_names)},
        "tiles_size": run.export.tile_size,
        "tiles_overlap": int(round(100 * run.predict.overlap / run.predict.window)),
        "standardization_mean": [float(m) * scale for m in spec.mean],
        "standardization_std": [float(s) * scale for s in spec.std],
        "seg_thresh": 0.0,  # keep every pixel's argmax
        "seg_small_segment": 0,
    }
    if resolution_cm:
        meta["resolution"] = float(resolution_cm)
    return {key: json.dumps(value) for key, value in meta.items()}


def check_tile(run, tile_size: int) -> tuple[np.ndarray, str, float | None]:
    """A real normalised tile [1, C, S, S] of the dataset (its first evaluation image, top left,
    zero-padded), its source and its ground resolution in cm when georeferenced in metres;
    random normal values when the dataset's files are not at hand."""
    from rasterio.windows import Window

    from spectralmoe_jax.data.layout import list_tiles
    from spectralmoe_jax.evaluation.scene_io import SceneInput, SceneReader

    spec, split = run.data, run.eval.split
    try:
        path = list_tiles(spec, split if split in spec.splits else next(iter(spec.splits)))[0]
        path = path.image_path
        with SceneReader(path, SceneInput.from_spec(spec)) as reader:
            h, w = min(tile_size, reader.height), min(tile_size, reader.width)
            tile = np.zeros((tile_size, tile_size, reader.num_bands), np.float32)
            tile[:h, :w] = reader.read(Window(0, 0, w, h))
            resolution = None
            if reader.crs is not None and reader.crs.is_projected and (
                    reader.crs.linear_units or "").lower() in ("metre", "meter", "m"):
                resolution = round(abs(reader.transform.a) * 100.0, 6)
    except (DataError, FileNotFoundError, IndexError) as error:
        print(f"export check: no dataset tile at hand ({error}); checking on random input")
        rng = np.random.default_rng(0)
        tile = rng.normal(size=(tile_size, tile_size, spec.num_bands)).astype(np.float32)
        path, resolution = "random normal input", None
    return np.moveaxis(tile, -1, 0)[None], path, resolution


def compare(reference: np.ndarray, other: np.ndarray, tie: float = 1e-4) -> dict:
    """Relative error of class probabilities [1, K, S, S], and label agreement away from ties."""
    reference, other = np.asarray(reference, np.float64), np.asarray(other, np.float64)
    error = float(np.abs(other - reference).max() / max(np.abs(reference).max(), 1e-30))
    top2 = np.sort(reference, axis=1)[:, -2:]
    decided = top2[:, 1] - top2[:, 0] > tie * np.abs(top2[:, 1]).max()
    same = reference.argmax(1) == other.argmax(1)
    return {"relative_error": error, "labels_equal_away_from_ties": bool(same[decided].all()),
            "label_agreement": float(same.mean()), "decided_fraction": float(decided.mean())}


def onnx_graph(fn, inputs, opset: int, **names):
    """jax2onnx's graph (onnx_ir) of `fn` on `inputs` (ShapeDtypeStructs)."""
    from jax2onnx import to_onnx as jax2onnx

    try:
        return jax2onnx(fn, list(inputs), model_name="spectralmoe", opset=opset,
                        return_mode="ir", **names)
    finally:
        # jax2onnx traces with jax.numpy patched to its own primitives, and JAX's tracing
        # caches (jax.checkpoint's, around the deformable sampling) would hand those traces to
        # a later trace of the same function: jax.export or jit could not lower it.
        jax.clear_caches()


def to_onnx(model, num_bands: int, tile_size: int, path: str, opset: int,
            metadata: dict[str, str]) -> str:
    """Writes `tile_probabilities` of `model` as ONNX, input 'image', output 'probabilities'."""
    import onnx_ir as ir

    spec = jax.ShapeDtypeStruct((1, num_bands, tile_size, tile_size), jnp.float32)
    # Quiet: notes on intermediate values left untyped, which onnxruntime types itself.
    with _quiet_loggers("jax2onnx", "onnx_ir"):
        graph = onnx_graph(lambda tiles: tile_probabilities(model, tiles), [spec], opset,
                           input_names=["image"], output_names=["probabilities"])
        graph.metadata_props.update(metadata)
        weights = sum(v.const_value.nbytes for v in graph.graph.initializers.values()
                      if v.const_value is not None)
        external = os.path.basename(path) + ".data" if weights > SINGLE_FILE_LIMIT else None
        ir.save(graph, path, external_data=external)
    return path


@contextlib.contextmanager
def _quiet_loggers(*names: str):
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def onnx_session(path: str):
    """An onnxruntime CPU session (its notes on unused initialisers silenced)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def to_jax_export(model, num_bands: int, tile_size: int, jax_path: str, params_path: str):
    """Writes `jax.export` of (weights, tile) -> probabilities, and the weights (flat list)."""
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)

    def run(weights, tiles):
        return tile_probabilities(nnx.merge(graphdef, jax.tree.unflatten(treedef, weights)),
                                  tiles)

    specs = ([jax.ShapeDtypeStruct(np.shape(x), x.dtype) for x in leaves],
             jax.ShapeDtypeStruct((1, num_bands, tile_size, tile_size), jnp.float32))
    exported = jax.export.export(jax.jit(run), platforms=JAX_PLATFORMS)(*specs)
    with open(jax_path, "wb") as f:
        f.write(exported.serialize())
    np.savez(params_path, **{f"w{i:05d}": np.asarray(x) for i, x in enumerate(leaves)})
    return leaves


def load_jax_export(jax_path: str, params_path: str):
    """(exported, weights): call as `exported.call(weights, tiles)`."""
    with open(jax_path, "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    with np.load(params_path) as npz:
        weights = [npz[f"w{i:05d}"] for i in range(len(npz.files))]
    return exported, weights


def export_model(model: Segmentor, run, output_dir: str) -> ExportResult:
    """Exports `model` (its trained weights) as ONNX and jax.export into `output_dir`, checks
    both against the JAX model on a real tile and writes export.json. See the module doc."""
    from spectralmoe_jax.evaluation.gis import label_encoding
    from spectralmoe_jax.evaluation.runner import patch_multiple

    spec = run.data
    tile_size = run.export.tile_size
    multiple = patch_multiple(model)
    if tile_size % multiple:
        raise ConfigError(f"config.export.tile_size {tile_size} must be a multiple of {multiple} "
                        "(the patch size, halved once more by the stride-32 level)")
    os.makedirs(output_dir, exist_ok=True)
    paths = {name: os.path.join(output_dir, name)
             for name in (ONNX_NAME, JAX_NAME, PARAMS_NAME, INFO_NAME)}
    tile, tile_source, resolution = check_tile(run, tile_size)
    resolution = run.export.resolution_cm or resolution

    jax_model = for_export(model)
    reference = np.asarray(jax.jit(lambda x: tile_probabilities(jax_model, x))(tile))

    to_onnx(jax_model, spec.num_bands, tile_size, paths[ONNX_NAME],
            run.export.opset, deepness_metadata(run, resolution))
    onnx_out = onnx_session(paths[ONNX_NAME]).run(["probabilities"], {"image": tile})[0]

    to_jax_export(jax_model, spec.num_bands, tile_size, paths[JAX_NAME], paths[PARAMS_NAME])
    exported, weights = load_jax_export(paths[JAX_NAME], paths[PARAMS_NAME])
    jax_out = np.asarray(exported.call(weights, tile))

    check = {"tile": tile_source, "onnxruntime": compare(reference, onnx_out),
             "jax_export": compare(reference, jax_out), "tolerance": TOLERANCE}
    labels = label_encoding(spec, run.predict.labels)
    info = {
        "function": "normalised tile [1, C, S, S] -> class probabilities [1, K, S, S]",
        "input": {"name": "image", "layout": "NCHW", "tile_size": tile_size,
                  "bands": list(spec.band_names), "value_scale": spec.value_scale,
                  "mean": spec.mean.tolist(), "std": spec.std.tolist(),
                  "normalisation": "(x / value_scale - mean) / std, bands in this order"},
        "output": {"name": "probabilities", "layout": "NCHW",
                   "classes": [{"id": k, "code": code, "name": name} for k, (code, name)
                               in enumerate(zip(labels.values, labels.names))]},
        "deepness": {k: json.loads(v) for k, v in deepness_metadata(run, resolution).items()},
        "check": check,
    }
    with open(paths[INFO_NAME], "w") as f:
        json.dump(info, f, indent=2)
    for name in ("onnxruntime", "jax_export"):
        result = check[name]
        if result["relative_error"] > TOLERANCE or not result["labels_equal_away_from_ties"]:
            raise ExportError(f"{name} differs from the JAX model on {tile_source}: {result} "
                              f"(tolerance {TOLERANCE}); see {paths[INFO_NAME]}")
    print(f"export check on {tile_source}: onnxruntime relative error "
          f"{check['onnxruntime']['relative_error']:.2e}, jax.export "
          f"{check['jax_export']['relative_error']:.2e}")
    return ExportResult(paths[ONNX_NAME], paths[JAX_NAME], paths[PARAMS_NAME],
                        paths[INFO_NAME], check)
