"""ViT checkpoint conversion: every naming scheme lands on the HF route's parameters, the
released resize / stem options equal their PyTorch originals, errors name the keys, Orbax
round-trips, and DOFA's ViT matches a PyTorch reference written from DOFA's code."""

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from spectralmoe_jax.conversion import load
from spectralmoe_jax.conversion.rules import ConversionError, check_params, flatten_state
from spectralmoe_jax.conversion.vit import convert_state_dict, detect_scheme
from spectralmoe_jax.models import resize
from spectralmoe_jax.models.vit import VisionTransformer, ViTConfig
from tests.conftest import relative_error
from tests.converted import load_vit
from tests.test_dofa_embedding import TorchDynamicMLPOFA
from tests.test_vit import (
    DEPTH, WIDTH, dinov2_config, dinov2_hf, dinov3_config, dinov3_hf, promptda_hf, randomize)


def numpy_state(model) -> dict:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def assert_same_params(got: dict, expected: dict):
    assert sorted(got) == sorted(expected)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


# --- state dicts with the original repositories' names, made from the HF tiny models ----------

def original_dinov2(hf_state: dict, prefix: str = "", chunked: bool = False) -> dict:
    """HF Dinov2 tensors under facebookresearch/dinov2 names (`DinoVisionTransformer`)."""
    out = {"cls_token": hf_state["embeddings.cls_token"],
           "pos_embed": hf_state["embeddings.position_embeddings"],
           "mask_token": hf_state["embeddings.mask_token"],
           "patch_embed.proj.weight": hf_state["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": hf_state["embeddings.patch_embeddings.projection.bias"],
           "norm.weight": hf_state["layernorm.weight"], "norm.bias": hf_state["layernorm.bias"]}
    if "embeddings.register_tokens" in hf_state:
        out["register_tokens"] = hf_state["embeddings.register_tokens"]
    for i in range(DEPTH):
        hf_layer = f"encoder.layer.{i}."
        block = f"blocks.0.{i}." if chunked else f"blocks.{i}."  # block_chunks=1 keeps index i
        for kind in ("weight", "bias"):
            out[block + f"attn.qkv.{kind}"] = np.concatenate(
                [hf_state[hf_layer + f"attention.{p}_proj.{kind}"] for p in "qkv"])
            out[block + f"attn.proj.{kind}"] = hf_state[hf_layer + f"attention.o_proj.{kind}"]
            for norm in ("norm1", "norm2"):
                out[block + f"{norm}.{kind}"] = hf_state[hf_layer + f"{norm}.{kind}"]
            if hf_layer + "mlp.gate_proj.weight" in hf_state:  # SwiGLUFFNFused: w12 = [w1; w2]
                out[block + f"mlp.w12.{kind}"] = np.concatenate(
                    [hf_state[hf_layer + f"mlp.{p}_proj.{kind}"] for p in ("gate", "up")])
                out[block + f"mlp.w3.{kind}"] = hf_state[hf_layer + f"mlp.down_proj.{kind}"]
            else:
                for fc in ("fc1", "fc2"):
                    out[block + f"mlp.{fc}.{kind}"] = hf_state[hf_layer + f"mlp.{fc}.{kind}"]
        out[block + "ls1.gamma"] = hf_state[hf_layer + "layer_scale1.lambda1"]
        out[block + "ls2.gamma"] = hf_state[hf_layer + "layer_scale2.lambda1"]
    return {prefix + k: v for k, v in out.items()}


def original_dinov3(hf_state: dict, rng) -> dict:
    """HF DINOv3 tensors under facebookresearch/dinov3 names, with a random key bias that the
    stored `bias_mask` must zero, as `LinearKMaskedBias` does."""
    head_dim = WIDTH // 4
    out = {"cls_token": hf_state["embeddings.cls_token"],
           "storage_tokens": hf_state["embeddings.register_tokens"],
           "mask_token": hf_state["embeddings.mask_token"][0],
           "patch_embed.proj.weight": hf_state["embeddings.patch_embeddings.weight"],
           "patch_embed.proj.bias": hf_state["embeddings.patch_embeddings.bias"],
           "rope_embed.periods": (100.0 ** (2 * torch.arange(head_dim // 4, dtype=torch.float32)
                                            / (head_dim // 2))).numpy(),
           "local_cls_norm.weight": np.ones(WIDTH, np.float32),
           "norm.weight": hf_state["norm.weight"], "norm.bias": hf_state["norm.bias"]}
    gated = "model.layer.0.mlp.gate_proj.weight" in hf_state
    mlp = {"w1": "gate_proj", "w2": "up_proj", "w3": "down_proj"} if gated else {
        "fc1": "up_proj", "fc2": "down_proj"}
    for i in range(DEPTH):
        hf_layer, block = f"model.layer.{i}.", f"blocks.{i}."
        attention = hf_layer + "attention."
        out[block + "attn.qkv.weight"] = np.concatenate(
            [hf_state[attention + f"{p}_proj.weight"] for p in "qkv"])
        out[block + "attn.qkv.bias"] = np.concatenate(
            [hf_state[attention + "q_proj.bias"], rng.normal(size=WIDTH).astype(np.float32),
             hf_state[attention + "v_proj.bias"]])
        out[block + "attn.qkv.bias_mask"] = np.repeat(np.float32([1, 0, 1]), WIDTH)
        for kind in ("weight", "bias"):
            out[block + f"attn.proj.{kind}"] = hf_state[attention + f"o_proj.{kind}"]
            for norm in ("norm1", "norm2"):
                out[block + f"{norm}.{kind}"] = hf_state[hf_layer + f"{norm}.{kind}"]
            for ours, theirs in mlp.items():
                out[block + f"mlp.{ours}.{kind}"] = hf_state[hf_layer + f"mlp.{theirs}.{kind}"]
        out[block + "ls1.gamma"] = hf_state[hf_layer + "layer_scale1.lambda1"]
        out[block + "ls2.gamma"] = hf_state[hf_layer + "layer_scale2.lambda1"]
    return out


def hub_dinov2(hf_state: dict) -> dict:
    """transformers 5 in-memory names -> the names stored in HF hub Dinov2 files."""
    out = {}
    for key, value in hf_state.items():
        for new, old in (("attention.q_proj", "attention.attention.query"),
                         ("attention.k_proj", "attention.attention.key"),
                         ("attention.v_proj", "attention.attention.value"),
                         ("attention.o_proj", "attention.output.dense"),
                         ("mlp.down_proj", "mlp.weights_out")):
            key = key.replace(new, old)
        if "mlp.up_proj" in key:
            continue
        if "mlp.gate_proj" in key:
            up = hf_state[key.replace("gate_proj", "up_proj")]
            key, value = key.replace("gate_proj", "weights_in"), np.concatenate([value, up])
        out[key] = value
    return out


# --- every naming scheme lands on the same parameters ------------------------------------------

@pytest.mark.parametrize("registers,swiglu,chunked", [(0, False, False), (2, False, True),
                                                      (0, True, False)])
def test_dinov2_original_and_hub_names_match_hf_route(registers, swiglu, chunked):
    hf_state = numpy_state(dinov2_hf(registers, swiglu=swiglu))
    config = dinov2_config(registers, swiglu=swiglu)
    expected = convert_state_dict(hf_state, config, "hf_dinov2")
    original = original_dinov2(hf_state, chunked=chunked)
    assert detect_scheme(original) == "dinov2"
    assert_same_params(convert_state_dict(original, config), expected)
    hub = hub_dinov2(hf_state)
    assert detect_scheme(hub) == "hf_dinov2"
    assert_same_params(convert_state_dict(hub, config), expected)


@pytest.mark.parametrize("swiglu", [False, True])
def test_dinov3_original_names_match_hf_route(swiglu, np_rng):
    hf_state = numpy_state(dinov3_hf(swiglu))
    config = dinov3_config(swiglu)
    assert detect_scheme(hf_state) == "hf_dinov3"
    expected = convert_state_dict(hf_state, config, "hf_dinov3")
    original = original_dinov3(hf_state, np_rng)
    assert detect_scheme(original) == "dinov3"
    assert_same_params(convert_state_dict(original, config), expected)
    # HF hub files name the blocks `layer.N.` (transformers 5 adds `model.` when loading).
    hub = {k.removeprefix("model."): v for k, v in hf_state.items()}
    assert_same_params(convert_state_dict(hub, config), expected)


def test_dinov3_rope_periods_are_checked(np_rng):
    hf_state = numpy_state(dinov3_hf())
    original = original_dinov3(hf_state, np_rng)
    config = dataclasses.replace(dinov3_config(), rope_base=1000.0)
    with pytest.raises(ConversionError, match="rope_embed.periods"):
        convert_state_dict(original, config)


def test_promptda_ckpt_file_matches_hf_backbone(tmp_path):
    hf_model = promptda_hf()
    hf_state = numpy_state(hf_model)
    config = dinov2_config(image_size=56, patch=14)
    assert detect_scheme(hf_state) == "promptda_hf"
    expected = convert_state_dict(hf_state, config, "promptda_hf")
    backbone = {k.removeprefix("backbone."): v for k, v in hf_state.items()
                if k.startswith("backbone.")}
    pipeline = original_dinov2(backbone, prefix="pipeline.pretrained.")
    pipeline["pipeline.depth_head.scratch.output_conv.weight"] = np.zeros((1, 8, 3, 3), np.float32)
    pipeline["pipeline._mean"] = np.zeros((1, 3, 1, 1), np.float32)
    path = tmp_path / "promptda_vitl.ckpt"
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in pipeline.items()},
                "epoch": 3}, path)
    model = load_vit(str(path), config)  # scheme 'auto' -> 'promptda'
    assert_same_params(flatten_state(nnx.state(model, nnx.Param)),
                       {k: np.asarray(v) for k, v in expected.items()})


# --- errors name what is wrong -----------------------------------------------------------------

def test_missing_unexpected_and_misshaped_keys_are_named():
    hf_state = numpy_state(dinov2_hf())
    config = dinov2_config()
    missing = {k: v for k, v in hf_state.items()
               if k != "embeddings.cls_token" and "layer_scale2" not in k}
    with pytest.raises(ConversionError, match=r"missing from the checkpoint: blocks/ls2/gamma, "
                                              r"cls_token"):
        load_vit(missing, config)
    model = load_vit(missing, config, allow_missing=(r"cls_token", r"blocks/ls2/.*"))
    assert model.cls_token.shape == (1, WIDTH)

    extra = dict(hf_state, **{"encoder.layer.0.adapter.weight": np.zeros(3, np.float32)})
    with pytest.raises(ConversionError, match=r"encoder\.layer\.0\.adapter\.weight"):
        load_vit(extra, config)
    load_vit(extra, config, allow_unexpected=(r"encoder\.layer\.\d+\.adapter\..*",))

    wrong = dict(hf_state)
    wrong["embeddings.position_embeddings"] = np.zeros((1, 10, WIDTH), np.float32)
    with pytest.raises(ConversionError, match=r"pos_embed: checkpoint \(10, 32\) vs model "
                                              r"\(17, 32\)"):
        load_vit(wrong, config)
    with pytest.raises(ConversionError, match="holds a dinov2 ViT, but the config is of family "
                                              "'dinov3'"):
        load_vit(hf_state, dinov3_config())


# --- the released converters' options against their PyTorch code ------------------------------

@pytest.mark.parametrize("n_in,n_out,antialias,offset", [
    (4, 9, False, None), (16, 7, False, None), (4, 9, True, None), (37, 32, True, None),
    (37, 32, False, 0.1), (5, 3, False, 0.1), (14, 16, False, None)])
def test_bicubic_matrix_matches_torch_interpolate(n_in, n_out, antialias, offset, np_rng):
    x = np_rng.normal(size=(2, 3, n_in, n_in)).astype(np.float32)
    if offset:
        kwargs = dict(scale_factor=((n_out + offset) / n_in,) * 2)
    else:
        kwargs = dict(size=(n_out, n_out))
    expected = F.interpolate(torch.from_numpy(x), mode="bicubic", align_corners=False,
                             antialias=antialias, **kwargs).numpy()
    factor = (n_out + offset) / n_in if offset else None
    matrix = resize.bicubic_matrix(n_in, n_out, scale_factor=factor, antialias=antialias)
    ours = np.einsum("ih,jw,bchw->bcij", matrix, matrix, x)
    assert relative_error(ours, expected) <= 1e-5


def released_patch_and_pos(weight, pos_embed, kernel, crop, in_channels):
    """convert_dinov2_depthmoe.py: cyclic stem, then bicubic kernel and position resize."""
    weight = torch.from_numpy(weight)
    new_weight = torch.zeros(weight.shape[0], in_channels, *weight.shape[2:])
    for i in range(in_channels):
        new_weight[:, i, :, :] = weight[:, i % 3, :, :]
    new_weight = F.interpolate(new_weight, size=(kernel, kernel), mode="bicubic",
                               align_corners=False)
    pos_embed = torch.from_numpy(pos_embed)
    pos_cls, pos_tokens = pos_embed[:, :1, :], pos_embed[:, 1:, :]
    size = int(pos_tokens.shape[-2] ** 0.5)
    grid = tuple(length // kernel for length in crop)
    resized = F.interpolate(pos_tokens.reshape(-1, size, size, pos_tokens.shape[-1])
                            .permute(0, 3, 1, 2), size=grid, mode="bicubic", align_corners=False)
    resized = resized.permute(0, 2, 3, 1).reshape(-1, np.prod(grid), pos_tokens.shape[-1])
    return new_weight.numpy(), torch.cat((pos_cls, resized), dim=1).numpy()


def test_released_kernel_position_and_stem_conversion():
    hf_state = numpy_state(dinov2_hf())  # patch 4, 4x4 table
    config = dataclasses.replace(dinov2_config(), patch_size=6, pos_grid=(5, 8), in_channels=5)
    params = convert_state_dict(hf_state, config, resize_patch=True, resize_pos=True,
                                stem="cyclic")
    weight, pos = released_patch_and_pos(
        hf_state["embeddings.patch_embeddings.projection.weight"],
        hf_state["embeddings.position_embeddings"], 6, (30, 48), 5)
    assert relative_error(params["patch_embed/kernel"], weight.transpose(2, 3, 1, 0)) <= 1e-6
    assert relative_error(params["pos_embed"], pos[0]) <= 1e-6
    load_vit(hf_state, config, resize_patch=True, resize_pos=True, stem="cyclic")


@pytest.mark.parametrize("in_channels", [1, 4, 7])
def test_timm_stem_adaptation(in_channels, np_rng):
    weight = np_rng.normal(size=(8, 3, 4, 4)).astype(np.float32)  # OIHW
    torch_weight = torch.from_numpy(weight)
    if in_channels == 1:  # timm adapt_input_conv
        expected = torch_weight.sum(dim=1, keepdim=True)
    else:
        repeat = int(math.ceil(in_channels / 3))
        expected = torch_weight.repeat(1, repeat, 1, 1)[:, :in_channels] * (3 / float(in_channels))
    ours = resize.adapt_stem_timm(weight.transpose(2, 3, 1, 0), in_channels)
    assert relative_error(ours, expected.numpy().transpose(2, 3, 1, 0)) <= 1e-6


# --- Orbax ---------------------------------------------------------------------------------------

def test_converted_folder_round_trip(tmp_path):
    hf_state = numpy_state(dinov3_hf())
    config = dinov3_config()
    params = convert_state_dict(hf_state, config, "hf_dinov3")
    load.write_converted(str(tmp_path / "vit"), params, {"holds": "vfm"})
    opened = load.open_checkpoint(str(tmp_path / "vit"))
    assert opened.kind == "orbax" and opened.holds == "vfm"
    assert_same_params(opened.state, params)
    other = nnx.eval_shape(
        lambda: VisionTransformer(dataclasses.replace(config, depth=1), rngs=nnx.Rngs(0)))
    with pytest.raises(ConversionError, match=r"blocks/attn/qkv/kernel: checkpoint \(2, 32, 96\) "
                                              r"vs model \(1, 32, 96\)"):
        check_params(opened.state, flatten_state(nnx.state(other)))


def test_convert_mode_writes_the_vfm_a_run_loads(tmp_path, np_rng):
    """facebookresearch dinov3 .pth -> `--mode convert` folder == the HF route's parameters
    (with the run's 4-band cyclic stem), and a run configured with the folder loads them."""
    from spectralmoe_jax.build import build_segmentor
    from spectralmoe_jax.conversion.convert import convert_checkpoint
    from spectralmoe_jax.run_config import parse
    from tests.tiny import tiny_config

    hf_state = numpy_state(dinov3_hf())
    config = dinov3_config()
    path = tmp_path / "dinov3_tiny.pth"
    torch.save({k: torch.from_numpy(v) for k, v in original_dinov3(hf_state, np_rng).items()},
               path)
    run_config = tiny_config()
    run_config.model.vfm.preset = "dinov3_vits16"
    run_config.model.vfm.overrides.update(dict(
        patch_size=config.patch_size, width=config.width, depth=config.depth,
        num_heads=config.num_heads, mlp_dim=config.mlp_dim,
        num_register_tokens=config.num_register_tokens))
    run = parse(run_config)
    convert_checkpoint(run, str(path), str(tmp_path / "converted"))
    expected = convert_state_dict(hf_state, dataclasses.replace(config, in_channels=4),
                                  "hf_dinov3", stem="cyclic")
    opened = load.open_checkpoint(str(tmp_path / "converted"))
    assert_same_params(opened.state, expected)
    run_config.model.vfm.checkpoint = str(tmp_path / "converted")
    model = build_segmentor(parse(run_config).model).model
    assert_same_params({k: np.asarray(v) for k, v in
                        flatten_state(nnx.state(model.vfm, nnx.Param)).items()}, expected)


# --- DOFA: the whole ViT against a PyTorch reference written from DOFA's code --------------------

WV_PLANES, PATCH = 32, 16


def mae_sincos_table(dim, grid_size):
    """DOFA pos_embed.py `get_2d_sincos_pos_embed(dim, grid_size, cls_token=True)`."""
    def one_d(d, pos):
        omega = np.arange(d // 2, dtype=float) / (d / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(np.arange(grid_size, dtype=np.float32),
                       np.arange(grid_size, dtype=np.float32))  # w goes first
    grid = np.stack(grid, axis=0).reshape(2, 1, grid_size, grid_size)
    table = np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros((1, dim)), table], axis=0).astype(np.float32)


class TimmBlock(torch.nn.Module):
    """timm `Block(dim, heads, 4.0, qkv_bias=True, norm_layer=LayerNorm(eps=1e-6))`."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1 = torch.nn.LayerNorm(dim, eps=1e-6)
        self.attn = torch.nn.Module()
        self.attn.qkv = torch.nn.Linear(dim, 3 * dim)
        self.attn.proj = torch.nn.Linear(dim, dim)
        self.norm2 = torch.nn.LayerNorm(dim, eps=1e-6)
        self.mlp = torch.nn.Module()
        self.mlp.fc1 = torch.nn.Linear(dim, 4 * dim)
        self.mlp.fc2 = torch.nn.Linear(4 * dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.attn.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5).softmax(dim=-1)
        x = x + self.attn.proj((attn @ v).transpose(1, 2).reshape(b, n, c))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class TorchDOFA(torch.nn.Module):
    """SpectralMoE's `DOFAVisionTransformer.forward_features`, returning every block's tokens."""

    def __init__(self, table):
        super().__init__()
        self.patch_embed = TorchDynamicMLPOFA(WV_PLANES, PATCH, WIDTH)
        self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, WIDTH))
        self.pos_embed = torch.nn.Parameter(torch.tensor(table)[None], requires_grad=False)
        self.blocks = torch.nn.ModuleList([TimmBlock(WIDTH, 4) for _ in range(DEPTH)])
        self.fc_norm = torch.nn.LayerNorm(WIDTH, eps=1e-6)

    def forward(self, x, waves):
        x = self.patch_embed(x, waves).flatten(2).transpose(1, 2)
        x = x + self.pos_embed[:, 1:, :]
        cls = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat((cls.expand(x.shape[0], -1, -1), x), dim=1)
        outs = []
        for block in self.blocks:
            x = block(x)
            outs.append(x)
        return outs


@pytest.mark.parametrize("position,height,width", [("sincos", 64, 64), ("learned", 64, 48)])
def test_dofa_vit_matches_reference(position, height, width, np_rng):
    grid = ((height + 2 - PATCH) // PATCH + 1, (width + 2 - PATCH) // PATCH + 1)
    table = (mae_sincos_table(WIDTH, grid[0]) if position == "sincos"
             else np_rng.normal(size=(1 + grid[0] * grid[1], WIDTH)).astype(np.float32))
    torch.manual_seed(0)
    reference = randomize(TorchDOFA(table), seed=11)
    with torch.no_grad():
        reference.pos_embed.copy_(torch.tensor(table)[None])  # fixed, not randomised
    config = ViTConfig(family="dofa", patch_size=PATCH, width=WIDTH, depth=DEPTH, num_heads=4,
                       mlp_dim=4 * WIDTH, position=position, pos_grid=grid, layerscale=False,
                       dofa_wv_planes=WV_PLANES)
    state = numpy_state(reference)
    assert detect_scheme(state) == "dofa"
    model = load_vit(state, config)
    images = np_rng.normal(size=(2, height, width, 5)).astype(np.float32)
    waves = np.float32([0.49, 0.56, 0.665, 0.83, 1.61])
    with torch.no_grad():
        expected = reference(torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(waves))
    out = nnx.jit(lambda m, x, w: m(x, wavelengths=w))(model, jnp.asarray(images),
                                                        jnp.asarray(waves))
    assert out.grid == grid
    errors = [relative_error(out.layers[i], expected[i][:, 1:].numpy()) for i in range(DEPTH)]
    errors.append(relative_error(out.tokens, expected[-1].numpy()))
    assert max(errors) <= 1e-5, errors
