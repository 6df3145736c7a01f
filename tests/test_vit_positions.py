"""Position tables at input sizes other than the table's, resized as the weights' origin does.

DINOv2 weights come with two namings, each run by its own code: HF transformers (`Dinov2Model`,
`Dinov2WithRegistersModel`) and facebookresearch/dinov2 (re-stated below from
`dinov2/models/vision_transformer.py`). The two resize the 37 x 37 table differently off 518 px
(SPEC 5.2), so each naming must select its own resize. The tiny models keep the real table
(37 x 37 at patch 14, 518 px native) and shrink width and depth instead.
"""

import functools
import logging
import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers as hf
from flax import nnx

from spectralmoe_jax.conversion.rules import load_into_module
from spectralmoe_jax.conversion.vit import (
    apply_implied_settings, config_for_checkpoint, convert_state_dict, implied_settings)
from spectralmoe_jax.models.vit import VisionTransformer, ViTConfig, vit_config
from tests.conftest import relative_error
from tests.test_vit import DEPTH, HEADS, WIDTH, randomize
from tests.test_vit_conversion import numpy_state, original_dinov2

PATCH, NATIVE = 14, 518  # DINOv2's 37 x 37 table
# Down, up (448 -> 32 x 32 from 37 x 37 is a down-sampling too, by less), native, non-square.
SIZES = [(224, 224), (448, 448), (518, 518), (280, 420)]
TINY = dict(width=WIDTH, depth=DEPTH, num_heads=HEADS, mlp_dim=2 * WIDTH)


# --- references ----------------------------------------------------------------------------------

@functools.cache
def hf_dinov2(registers: int):
    kwargs = dict(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                  patch_size=PATCH, image_size=NATIVE, mlp_ratio=2)
    if registers:
        model = hf.Dinov2WithRegistersModel(
            hf.Dinov2WithRegistersConfig(num_register_tokens=registers, **kwargs))
    else:
        model = hf.Dinov2Model(hf.Dinov2Config(**kwargs))
    return randomize(model, seed=20 + registers)


class FacebookDinoV2(torch.nn.Module):
    """facebookresearch/dinov2 `DinoVisionTransformer` (mlp FFN, LayerScale, no chunks), its
    `interpolate_pos_encoding` and `prepare_tokens_with_masks` as written there; state dict
    names as its `.pth` files."""

    def __init__(self, registers: int, interpolate_offset: float, interpolate_antialias: bool):
        super().__init__()
        self.interpolate_offset = interpolate_offset
        self.interpolate_antialias = interpolate_antialias
        self.patch_size = PATCH
        grid = NATIVE // PATCH
        self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, WIDTH))
        self.pos_embed = torch.nn.Parameter(torch.zeros(1, 1 + grid * grid, WIDTH))
        self.register_tokens = (torch.nn.Parameter(torch.zeros(1, registers, WIDTH))
                                if registers else None)
        self.mask_token = torch.nn.Parameter(torch.zeros(1, WIDTH))
        self.patch_embed = torch.nn.Module()
        self.patch_embed.proj = torch.nn.Conv2d(3, WIDTH, PATCH, stride=PATCH)
        self.blocks = torch.nn.ModuleList([self._block() for _ in range(DEPTH)])
        self.norm = torch.nn.LayerNorm(WIDTH, eps=1e-6)

    @staticmethod
    def _block():
        block = torch.nn.Module()
        block.norm1 = torch.nn.LayerNorm(WIDTH, eps=1e-6)
        block.norm2 = torch.nn.LayerNorm(WIDTH, eps=1e-6)
        block.attn = torch.nn.Module()
        block.attn.qkv = torch.nn.Linear(WIDTH, 3 * WIDTH)
        block.attn.proj = torch.nn.Linear(WIDTH, WIDTH)
        block.mlp = torch.nn.Module()
        block.mlp.fc1 = torch.nn.Linear(WIDTH, 2 * WIDTH)
        block.mlp.fc2 = torch.nn.Linear(2 * WIDTH, WIDTH)
        for name in ("ls1", "ls2"):
            setattr(block, name, torch.nn.Module())
            getattr(block, name).gamma = torch.nn.Parameter(torch.ones(WIDTH))
        return block

    def interpolate_pos_encoding(self, x, w, h):
        npatch = x.shape[1] - 1
        N = self.pos_embed.shape[1] - 1
        if npatch == N and w == h:
            return self.pos_embed
        pos_embed = self.pos_embed.float()
        class_pos_embed, patch_pos_embed = pos_embed[:, 0], pos_embed[:, 1:]
        dim = x.shape[-1]
        w0, h0 = w // self.patch_size, h // self.patch_size
        M = int(math.sqrt(N))
        kwargs = {}
        if self.interpolate_offset:
            kwargs["scale_factor"] = (float(w0 + self.interpolate_offset) / M,
                                      float(h0 + self.interpolate_offset) / M)
        else:
            kwargs["size"] = (w0, h0)
        patch_pos_embed = F.interpolate(
            patch_pos_embed.reshape(1, M, M, dim).permute(0, 3, 1, 2), mode="bicubic",
            antialias=self.interpolate_antialias, **kwargs)
        assert (w0, h0) == patch_pos_embed.shape[-2:]
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
        return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)

    def forward(self, x):
        _, _, w, h = x.shape  # (sic: the original names H as w)
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, w, h)
        if self.register_tokens is not None:
            x = torch.cat((x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]),
                          dim=1)
        for block in self.blocks:
            b, n, c = x.shape
            qkv = block.attn.qkv(block.norm1(x)).reshape(b, n, 3, HEADS, c // HEADS)
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            attn = ((q * (c // HEADS) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
            x = x + block.ls1.gamma * block.attn.proj((attn @ v).transpose(1, 2).reshape(b, n, c))
            x = x + block.ls2.gamma * block.mlp.fc2(F.gelu(block.mlp.fc1(block.norm2(x))))
        return self.norm(x)


def facebook_dinov2(state: dict, registers: int, **interpolation):
    model = FacebookDinoV2(registers, **interpolation)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    return model.eval()


# The hub's constructors (dinov2/hub/backbones.py): `dinov2_vit*14` and `dinov2_vit*14_reg`.
HUB = {0: dict(interpolate_offset=0.1, interpolate_antialias=False),
       4: dict(interpolate_offset=0.0, interpolate_antialias=True)}


def torch_last_hidden(model, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.from_numpy(images).permute(0, 3, 1, 2))
    return getattr(out, "last_hidden_state", out).numpy()


# --- ours, through the loading path --------------------------------------------------------------

def ours_for(state: dict, config: ViTConfig, prefix: str = "") -> VisionTransformer:
    """The settings the naming implies, then the converted weights in a shape-only module."""
    config = config_for_checkpoint(state, config, prefix=prefix)
    model = nnx.eval_shape(lambda: VisionTransformer(config, rngs=nnx.Rngs(0)))
    load_into_module(model, convert_state_dict(state, config, prefix=prefix))
    return model


@nnx.jit
def forward(model, images):
    out = model(images)
    return out.tokens, out.normed


def images_of(height: int, width: int) -> np.ndarray:
    return np.random.default_rng(height + width).normal(size=(1, height, width, 3)).astype(
        np.float32)


def preset(registers: int) -> ViTConfig:
    return vit_config("dinov2_vits14_reg" if registers else "dinov2_vits14", **TINY)


# --- DINOv2: both namings, with and without registers ---------------------------------------------

@pytest.fixture(scope="module", params=[0, 4], ids=["plain", "registers"])
def dinov2_pair(request):
    """(registers, HF model, our model from its HF names, facebookresearch re-statement, our
    model from the facebookresearch names): one set of random weights."""
    registers = request.param
    reference = hf_dinov2(registers)
    hf_state = numpy_state(reference)
    fb_state = original_dinov2(hf_state)
    return (registers, reference, ours_for(hf_state, preset(registers)),
            facebook_dinov2(fb_state, registers, **HUB[registers]),
            ours_for(fb_state, preset(registers)))


@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_dinov2_both_namings_match_their_code(dinov2_pair, size):
    registers, hf_model, ours_hf, fb_model, ours_fb = dinov2_pair
    images = images_of(*size)
    hf_expected, fb_expected = (torch_last_hidden(m, images) for m in (hf_model, fb_model))
    errors = {"hf": relative_error(forward(ours_hf, jnp.asarray(images))[1], hf_expected),
              "facebookresearch": relative_error(forward(ours_fb, jnp.asarray(images))[1],
                                                 fb_expected)}
    assert max(errors.values()) <= 1e-5, errors
    # What makes the test able to fail: without registers the two codes disagree off 518 px.
    gap = relative_error(fb_expected, hf_expected)
    if registers or size == (NATIVE, NATIVE):
        assert gap <= 1e-5, gap
    else:
        assert gap > 1e-3, gap


def test_non_square_image_with_the_tables_grid_is_still_resampled(dinov2_pair):
    """525 x 518 px gives the table's 37 x 37 grid, but the image is not square, so both codes
    resample the table: the identity for HF's output size, not for offset 0.1."""
    registers, hf_model, ours_hf, fb_model, ours_fb = dinov2_pair
    images = images_of(525, 518)
    hf_expected, fb_expected = (torch_last_hidden(m, images) for m in (hf_model, fb_model))
    errors = [relative_error(forward(ours_hf, jnp.asarray(images))[1], hf_expected),
              relative_error(forward(ours_fb, jnp.asarray(images))[1], fb_expected)]
    assert max(errors) <= 1e-5, errors
    gap = relative_error(fb_expected, hf_expected)
    assert gap <= 1e-5 if registers else gap > 1e-3, gap


def test_implied_settings_follow_the_weights_origin():
    plain, reg = preset(0), preset(4)
    expected = {
        ("dinov2", plain): (0.1, False), ("dinov2", reg): (0.0, True),
        ("hf_dinov2", plain): (0.0, False), ("hf_dinov2", reg): (0.0, True),
        ("promptda", plain): (0.1, False), ("promptda_hf", plain): (0.0, False),
        ("dofa", vit_config("dofa_vitl16", position="learned")): (0.0, False)}
    for (scheme, config), (offset, antialias) in expected.items():
        assert implied_settings(scheme, config) == {
            "pos_interp_offset": offset, "pos_interp_antialias": antialias}, scheme
    assert implied_settings("hf_dinov3", vit_config("dinov3_vitl16")) == {}
    assert implied_settings("dofa", vit_config("dofa_vitl16", position="sincos")) == {}


def test_an_explicit_setting_wins_and_is_logged(caplog):
    implied = implied_settings("dinov2", preset(0))
    explicit = vit_config("dinov2_vits14", pos_interp_offset=0.0)
    with caplog.at_level(logging.INFO):
        config = apply_implied_settings(explicit, implied, origin="test weights")
    assert (config.pos_interp_offset, config.pos_interp_antialias) == (0.0, False)
    [record] = [r for r in caplog.records if "test weights" in r.getMessage()]
    assert "pos_interp_antialias=False" in record.getMessage()
    assert "kept as configured: pos_interp_offset=0.0 (the weights imply 0.1)" in (
        record.getMessage())


# --- DINOv3 (RoPE: no table) and PromptDA off their native sizes -----------------------------------

@pytest.mark.parametrize("size", [(448, 448), (272, 416)])
def test_dinov3_off_native_size_matches_hf(size):
    reference = randomize(hf.DINOv3ViTModel(hf.DINOv3ViTConfig(
        hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=DEPTH,
        num_attention_heads=HEADS, patch_size=16, num_register_tokens=4, image_size=224)),
        seed=30)
    ours = ours_for(numpy_state(reference), vit_config("dinov3_vits16", **TINY))
    images = images_of(*size)
    error = relative_error(forward(ours, jnp.asarray(images))[1],
                           torch_last_hidden(reference, images))
    assert error <= 1e-5, error


@functools.cache
def hf_promptda():
    backbone = dict(model_type="dinov2", hidden_size=WIDTH, num_hidden_layers=DEPTH,
                    num_attention_heads=HEADS, patch_size=PATCH, image_size=NATIVE, mlp_ratio=2,
                    out_indices=[1, 2], reshape_hidden_states=False)
    config = hf.PromptDepthAnythingConfig(
        backbone_config=backbone, reassemble_hidden_size=WIDTH, neck_hidden_sizes=[8, 16],
        reassemble_factors=[2, 1], fusion_hidden_size=8, head_hidden_size=8, patch_size=PATCH)
    return randomize(hf.PromptDepthAnythingForDepthEstimation(config), seed=40)


def promptda_tokens(reference, images):
    with torch.no_grad():
        out = reference.backbone(torch.from_numpy(images).permute(0, 3, 1, 2),
                                 output_hidden_states=True)
    return out.hidden_states[-1].numpy()  # the backbone's last block, before any norm


@pytest.mark.parametrize("size", [(224, 224), (280, 420)])
def test_promptda_off_native_size_both_namings(size):
    """HF's PromptDepthAnything backbone resizes as HF does; PromptDA's own `.ckpt` runs its
    copy of facebookresearch/dinov2 (offset 0.1), re-stated by `FacebookDinoV2`."""
    reference = hf_promptda()
    hf_state = numpy_state(reference)
    config = vit_config("promptda_vitl14", **TINY)
    images = images_of(*size)
    ours = ours_for(hf_state, config)
    assert ours.config.pos_interp_offset == 0.0
    error = relative_error(forward(ours, jnp.asarray(images))[0],
                           promptda_tokens(reference, images))
    assert error <= 1e-5, error

    backbone = {k.removeprefix("backbone."): v for k, v in hf_state.items()
                if k.startswith("backbone.")}
    ckpt = original_dinov2(backbone, prefix="pipeline.pretrained.")
    ckpt["pipeline.depth_head.scratch.output_conv.weight"] = np.zeros((1, 8, 3, 3), np.float32)
    ours = ours_for(ckpt, config)
    assert ours.config.pos_interp_offset == 0.1
    fb_state = {k.removeprefix("pipeline.pretrained."): v for k, v in ckpt.items()
                if k.startswith("pipeline.pretrained.")}
    torchhub = facebook_dinov2(fb_state, 0, interpolate_offset=0.1, interpolate_antialias=False)
    error = relative_error(forward(ours, jnp.asarray(images))[1],
                           torch_last_hidden(torchhub, images))
    assert error <= 1e-5, error


# --- end to end: the segmentor's backbones take the settings of their files ------------------------

def test_segmentor_backbones_follow_their_files(tmp_path):
    from spectralmoe_jax.build import build_segmentor
    from spectralmoe_jax.run_config import parse
    from tests.tiny import tiny_config

    dinov2 = hf_dinov2(0)
    fb_state = original_dinov2(numpy_state(dinov2))
    vfm_path, depth_path = tmp_path / "dinov2_vits14_pretrain.pth", tmp_path / "promptda.pth"
    torch.save({k: torch.from_numpy(v) for k, v in fb_state.items()}, vfm_path)
    promptda = hf_promptda()
    torch.save(promptda.state_dict(), depth_path)

    config = tiny_config()
    config.model.vfm.preset = "dinov2_vits14"
    config.model.vfm.overrides.update(dict(TINY, in_channels=3))
    config.model.vfm.checkpoint = str(vfm_path)
    config.model.depth.preset = "promptda_vitl14"
    config.model.depth.overrides.update(TINY)
    config.model.depth.checkpoint = str(depth_path)
    model = build_segmentor(parse(config).model).model
    vfm, depth = model.vfm.config, model.depth.config
    assert (vfm.pos_interp_offset, vfm.pos_interp_antialias) == (0.1, False)
    assert (depth.pos_interp_offset, depth.pos_interp_antialias) == (0.0, False)

    images = images_of(280, 420)
    fb_model = facebook_dinov2(fb_state, 0, **HUB[0])
    assert relative_error(forward(model.vfm, jnp.asarray(images))[1],
                          torch_last_hidden(fb_model, images)) <= 1e-5
    assert relative_error(forward(model.depth, jnp.asarray(images))[0],
                          promptda_tokens(promptda, images)) <= 1e-5

    # Converted once, the folder records what the file implies, and builds the same VFM.
    from spectralmoe_jax.conversion.convert import convert_checkpoint

    convert_checkpoint(parse(config), str(vfm_path), str(tmp_path / "converted"))
    config.model.vfm.checkpoint = str(tmp_path / "converted")
    converted = build_segmentor(parse(config).model).model.vfm
    assert (converted.config.pos_interp_offset, converted.config.pos_interp_antialias) == (0.1, False)
    assert relative_error(forward(converted, jnp.asarray(images))[1],
                          torch_last_hidden(fb_model, images)) <= 1e-5

    # Set in the config, the resize stays as set whatever the file's naming.
    config.model.vfm.checkpoint = str(vfm_path)
    config.model.vfm.overrides.pos_interp_offset = 0.0
    explicit = build_segmentor(parse(config).model).model.vfm
    assert explicit.config.pos_interp_offset == 0.0
    assert relative_error(forward(explicit, jnp.asarray(images))[1],
                          torch_last_hidden(dinov2, images)) <= 1e-5
