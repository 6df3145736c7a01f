"""Export: ONNX under onnxruntime and the deserialised jax.export equal the JAX model on a
real FLAIR #2 tile; the ONNX carries the metadata QGIS Deepness reads."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from spectralmoe_jax import export
from spectralmoe_jax.build import build_segmentor
from spectralmoe_jax.run_config import parse
from tests.conftest import relative_error
from tests.tiny import tiny_config

TILE = 64


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    config = tiny_config()
    config.model.vfm.overrides.depth = 1
    config.model.depth.overrides.depth = 1
    config.model.feature_layers = (0, 0, 0, 0)
    config.model.decoder.decoder_layers = 1
    config.export.tile_size = TILE
    run = parse(config)
    model = build_segmentor(run.model, seed=0).model
    out = str(tmp_path_factory.mktemp("export"))
    return model, run, export.export_model(model, run, out)


def test_onnx_and_jax_export_equal_jax_on_a_real_tile(exported):
    model, run, result = exported
    # The export checked itself on the first evaluation tile (real FLAIR #2 imagery).
    assert result.check["tile"].endswith("D004_2021_IMG_000473_aerial.tif")
    for name in ("onnxruntime", "jax_export"):
        assert result.check[name]["relative_error"] < 1e-4
        assert result.check[name]["labels_equal_away_from_ties"]
    # Again here, on another real tile, through the files as a user loads them.
    spec = run.data
    with rasterio.open(os.path.join(spec.root, "D074_2020_IMG_050549_aerial.tif")) as src:
        raw = src.read([1, 2, 3, 4], window=Window(100, 200, TILE, TILE)).astype(np.float32)
    tile = ((raw - spec.mean[:, None, None]) / spec.std[:, None, None])[None]
    reference = np.asarray(jax.jit(lambda x: export.tile_probabilities(model, x))(tile))
    assert reference.shape == (1, 12, TILE, TILE)
    np.testing.assert_allclose(reference.sum(1), 1.0, rtol=1e-5)
    session = export.onnx_session(result.onnx_path)
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert session.get_inputs()[0].shape == [1, 4, TILE, TILE]
    onnx_out = session.run(["probabilities"], {"image": tile})[0]
    assert relative_error(onnx_out, reference) < 1e-4
    fn, weights = export.load_jax_export(result.jax_path, result.params_path)
    jax_out = np.asarray(fn.call(weights, tile))
    assert relative_error(jax_out, reference) < 1e-4
    for out in (onnx_out, jax_out):
        check = export.compare(reference, out)
        assert check["labels_equal_away_from_ties"] and check["decided_fraction"] > 0.99


def test_deepness_metadata_maps_its_input_to_ours(exported):
    _, run, result = exported
    spec = run.data
    meta = {k: json.loads(v) for k, v in
            export.onnx_session(result.onnx_path).get_modelmeta().custom_metadata_map.items()}
    assert meta["model_type"] == "Segmentor"
    assert meta["class_names"] == {str(k): n for k, n in enumerate(spec.class_names)}
    assert meta["tiles_size"] == TILE and meta["tiles_overlap"] == 25
    assert meta["resolution"] == pytest.approx(20.0)  # FLAIR: 0.2 m pixels
    # Deepness feeds (x / 255 - mean') / std' (its preprocessing_utils): our normalisation.
    x = np.random.default_rng(0).integers(0, 256, (4, 8)).astype(np.float32)
    deepness = (x / 255 - np.array(meta["standardization_mean"])[:, None]) / np.array(
        meta["standardization_std"])[:, None]
    ours = (x / spec.value_scale - spec.mean[:, None]) / spec.std[:, None]
    np.testing.assert_allclose(deepness, ours, rtol=1e-5, atol=1e-5)
    with open(result.info_path) as f:
        info = json.load(f)
    assert info["input"]["bands"] == ["R", "G", "B", "NIR"]
    assert [c["code"] for c in info["output"]["classes"]] == list(range(1, 13))
    assert info["check"]["onnxruntime"]["relative_error"] < 1e-4


def test_tracing_after_the_onnx_conversion_is_clean():
    # jax2onnx traces with jax.numpy patched to its own primitives; none of that trace may
    # reach later ones (jax.checkpoint caches traces, as around the deformable sampling).
    sample = jax.checkpoint(lambda x: jnp.floor(x) * 2.0)
    tile = jax.ShapeDtypeStruct((3, 5), jnp.float32)
    export.onnx_graph(lambda x: sample(x) + 1.0, [tile], 17)
    lowered = jax.export.export(jax.jit(lambda x: sample(x) + 1.0))(tile)
    assert lowered.out_avals[0].shape == (3, 5)
