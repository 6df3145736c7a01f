"""CLIP, SAM, EVA02, DINOv3 7B and Depth-Anything-V2 against their PyTorch references (HF, timm,
open_clip, segment-anything; a re-statement of the released CLIP wrapper's embedding), block by
block, float32, at the references' native grid and at other (non-square) input sizes, converted
by our converter from each reference's own key names."""

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np
import open_clip
import pytest
import segment_anything.modeling.image_encoder as sam_encoder
import timm
import torch
import torch.nn.functional as F
import transformers as hf
from flax import nnx

from spectralmoe_jax.conversion.rules import ConversionError, load_into_module
from spectralmoe_jax.conversion.vit import convert_state_dict, detect_scheme, implied_settings
from spectralmoe_jax.models.vit import VisionTransformer, ViTConfig, vit_config
from tests.conftest import relative_error
from tests.test_vit import randomize

WIDTH, HEADS = 32, 4


def numpy_state(model) -> dict:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def build(config: ViTConfig, state: dict, scheme: str = "auto", **options) -> VisionTransformer:
    model = nnx.eval_shape(lambda: VisionTransformer(config, rngs=nnx.Rngs(0)))
    load_into_module(model, convert_state_dict(state, config, scheme, **options))
    return model


@nnx.jit
def forward(model, images):
    return model(images)


def images_of(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(2, height, width, 3)).astype(np.float32)


def nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2)


def block_outputs(blocks, run) -> list[np.ndarray]:
    """The output of every module in `blocks` during `run()`, as [B, tokens, D] arrays."""
    seen = []
    handles = [b.register_forward_hook(lambda m, i, o: seen.append(o.detach())) for b in blocks]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return [o.reshape(o.shape[0], -1, o.shape[-1]).numpy() for o in seen]


def check_layers(out, hidden, *, tokens_last=True) -> float:
    """Every block's patch tokens (and the last block's full tokens) against the reference."""
    errors = [relative_error(out.layers[i], hidden[i][:, out.num_prefix:])
              for i in range(len(hidden))]
    if tokens_last:
        errors.append(relative_error(out.tokens, hidden[-1]))
    assert max(errors) <= 1e-5, errors
    return max(errors)


# --- CLIP ------------------------------------------------------------------------------------

def clip_config(**overrides) -> ViTConfig:
    """The clip_vitl14 preset at tiny width; patch 4 on a 4 x 4 table (16 px)."""
    tiny = dict(width=WIDTH, depth=2, num_heads=HEADS, mlp_dim=64, patch_size=4, pos_grid=(4, 4))
    return vit_config("clip_vitl14", **(tiny | overrides))


def hf_clip():
    config = hf.CLIPVisionConfig(hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=HEADS, image_size=16, patch_size=4)
    return randomize(hf.CLIPVisionModel(config), seed=11)


# HF's form of CLIP: the class embedding once, bicubic interpolation of the table.
HF_CLIP = dict(cls_embed_twice=False, pos_interp="bicubic")


@pytest.mark.parametrize("size", [(16, 16), (32, 48)])
def test_clip_matches_hf_clip_vision_model(size):
    reference = hf_clip()
    state = numpy_state(reference)
    assert detect_scheme(state) == "hf_clip"
    model = build(clip_config(**HF_CLIP), state)
    images = images_of(*size, seed=1)
    with torch.no_grad():
        out_ref = reference(nchw(images), output_hidden_states=True, interpolate_pos_encoding=True)
    out = forward(model, jnp.asarray(images))
    assert out.grid == (size[0] // 4, size[1] // 4) and out.num_prefix == 1
    hidden = [h.numpy() for h in out_ref.hidden_states]
    # hidden_states[0] is the embedding after ln_pre: our tokens before the first block.
    embedded, _ = model.embed(jnp.asarray(images))
    assert relative_error(embedded, hidden[0]) <= 1e-5
    check_layers(out, hidden[1:])
    # HF applies post_layernorm to the pooled class token only.
    assert relative_error(out.normed[:, 0], out_ref.pooler_output.numpy()) <= 1e-5


def open_clip_visual():
    model = open_clip.transformer.VisionTransformer(
        image_size=16, patch_size=4, width=WIDTH, layers=2, heads=HEADS, mlp_ratio=2.0,
        output_dim=8, act_layer=open_clip.transformer.QuickGELU)
    return randomize(model, seed=12)


def test_clip_matches_open_clip_and_full_checkpoints_keep_the_visual_tower():
    reference = open_clip_visual()
    state = numpy_state(reference)
    assert detect_scheme(state) == "clip"
    model = build(clip_config(cls_embed_twice=False), state)
    images = images_of(16, 16, seed=2)
    hidden = block_outputs(reference.transformer.resblocks,
                           lambda: reference(nchw(images)))
    out = forward(model, jnp.asarray(images))
    check_layers(out, hidden)
    with torch.no_grad():  # ln_post on every token, as open_clip before pooling
        post = reference.ln_post(torch.from_numpy(hidden[-1])).numpy()
    assert relative_error(out.normed, post) <= 1e-5

    # An OpenAI / open_clip CLIP checkpoint: the tower under `visual.`, beside the text model.
    full = {f"visual.{k}": v for k, v in state.items()}
    full.update({"token_embedding.weight": np.zeros((5, 8), np.float32),
                 "transformer.resblocks.0.ln_1.weight": np.ones(8, np.float32),
                 "logit_scale": np.zeros((), np.float32)})
    assert detect_scheme(full) == "clip"
    ours = convert_state_dict(state, clip_config())
    for key, value in convert_state_dict(full, clip_config()).items():
        np.testing.assert_array_equal(value, ours[key], err_msg=key)


def released_clip_embed(model, images: torch.Tensor, spatial_size: int) -> torch.Tensor:
    """The embedding of the released SpectralMoE `clip.py` (`CLIPVisionTransformer.forward`),
    restated: the class embedding is added to the token and to the cls position row, and the
    spatial table is resized bilinearly to the patch grid on every call; then ln_pre."""
    x = model.conv1(images)
    b, c, h, w = x.shape
    x = x.reshape(b, c, -1).permute(0, 2, 1)
    cls = model.class_embedding + torch.zeros(b, 1, c)
    x = torch.cat([cls, x], dim=1)
    pos = model.positional_embedding
    cls_pos = pos[0, :] + model.class_embedding
    spatial = F.interpolate(pos[1:].reshape(1, spatial_size, spatial_size, c).permute(0, 3, 1, 2),
                            size=(h, w), mode="bilinear")
    spatial = spatial.reshape(1, c, h * w).permute(0, 2, 1)
    x = x + torch.cat([cls_pos.reshape(1, 1, c), spatial], dim=1)
    return model.ln_pre(x)


@pytest.mark.parametrize("size", [(16, 16), (32, 48), (24, 24)])
def test_clip_matches_the_released_wrapper(size):
    """The preset's defaults (class embedding twice, bilinear table) are the released wrapper's;
    its blocks are open_clip's `ResidualAttentionBlock` under the same names."""
    reference = open_clip_visual()
    model = build(clip_config(), numpy_state(reference))
    images = images_of(*size, seed=3)

    def run():
        x = released_clip_embed(reference, nchw(images), spatial_size=4)
        reference.transformer(x)

    hidden = block_outputs(reference.transformer.resblocks, run)
    check_layers(forward(model, jnp.asarray(images)), hidden)


def test_clip_table_resized_at_load_as_the_released_init_weights(np_rng):
    """`init_weights` resizes the stored table bilinearly to input_resolution // patch_size."""
    state = numpy_state(open_clip_visual())
    config = clip_config(pos_grid=(6, 6))
    table = convert_state_dict(state, config, resize_pos=True)["pos_embed"]
    stored = torch.from_numpy(state["positional_embedding"])
    spatial = F.interpolate(stored[1:].reshape(1, 4, 4, WIDTH).permute(0, 3, 1, 2),
                            size=(6, 6), mode="bilinear")
    expected = torch.cat([stored[:1], spatial.reshape(WIDTH, 36).permute(1, 0)]).numpy()
    assert table.shape == (37, WIDTH)
    assert relative_error(table, expected) <= 1e-6


# --- SAM -------------------------------------------------------------------------------------

# 4 blocks, global attention in blocks 1 and 3, 3 x 3 windows on a 16 x 16 table (64 px): the
# 16-token rows are padded to 18, as SAM-H pads 64 to 70.
SAM_TINY = dict(width=WIDTH, depth=4, num_heads=HEADS, mlp_dim=64, patch_size=4,
                pos_grid=(16, 16), window_size=3, global_blocks=(1, 3))


def sam_config(**overrides) -> ViTConfig:
    return vit_config("sam_vith16", **(SAM_TINY | overrides))


def hf_sam():
    config = hf.SamVisionConfig(hidden_size=WIDTH, num_hidden_layers=4,
                                num_attention_heads=HEADS, image_size=64, patch_size=4,
                                window_size=3, global_attn_indexes=[1, 3], mlp_dim=64,
                                output_channels=16)
    return randomize(hf.SamVisionModel(config), seed=13)


def segment_anything_encoder(image_size: int = 64):
    model = sam_encoder.ImageEncoderViT(
        img_size=image_size, patch_size=4, embed_dim=WIDTH, depth=4, num_heads=HEADS,
        mlp_ratio=2.0, out_chans=16, qkv_bias=True, use_rel_pos=True, window_size=3,
        global_attn_indexes=(1, 3), norm_layer=lambda d: torch.nn.LayerNorm(d, eps=1e-6))
    return randomize(model, seed=14)


def test_sam_matches_hf_sam_vision_encoder():
    reference = hf_sam()
    state = numpy_state(reference)
    assert detect_scheme(state) == "hf_sam"
    model = build(sam_config(), state)
    assert model.blocks.attn.rel_pos_h.shape == (2, 5, WIDTH // HEADS)  # 2 windowed, 2 * 3 - 1
    assert model.global_blocks.attn.rel_pos_h.shape == (2, 31, WIDTH // HEADS)
    images = images_of(64, 64, seed=4)
    with torch.no_grad():
        hidden = reference(nchw(images), output_hidden_states=True).hidden_states
    out = forward(model, jnp.asarray(images))
    assert out.num_prefix == 0 and out.grid == (16, 16)
    check_layers(out, [h.reshape(2, 256, WIDTH).numpy() for h in hidden[1:]])


def test_sam_matches_segment_anything_and_its_full_checkpoint():
    reference = segment_anything_encoder()
    state = numpy_state(reference)
    assert detect_scheme(state) == "sam"
    model = build(sam_config(), state)
    images = images_of(64, 64, seed=5)
    hidden = block_outputs(reference.blocks, lambda: reference(nchw(images)))
    check_layers(forward(model, jnp.asarray(images)), hidden)
    # A SAM checkpoint (`sam_vit_h_4b8939.pth`): the encoder under `image_encoder.`.
    full = {f"image_encoder.{k}": v for k, v in state.items()}
    full["prompt_encoder.point_embeddings.0.weight"] = np.zeros((1, 16), np.float32)
    full["mask_decoder.iou_token.weight"] = np.zeros((1, 16), np.float32)
    ours = convert_state_dict(state, sam_config())
    converted = convert_state_dict(full, sam_config())
    assert sorted(converted) == sorted(ours)


@pytest.mark.parametrize("size", [(40, 56), (32, 32)])
def test_sam_at_other_sizes_matches_timm(size):
    """timm's `VisionTransformerSAM` resizes the table (bicubic, antialias) and the global
    blocks' relative tables (linear) to the grid; windows pad 10 x 14 to 12 x 15."""
    reference = timm.models.vision_transformer_sam.VisionTransformerSAM(
        img_size=64, patch_size=4, embed_dim=WIDTH, depth=4, num_heads=HEADS, mlp_ratio=2.0,
        use_rel_pos=True, window_size=3, global_attn_indexes=(1, 3), neck_chans=16,
        num_classes=0, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6))
    reference = randomize(reference, seed=15)
    state = numpy_state(reference)
    assert detect_scheme(state) == "sam"
    model = build(sam_config(), state)
    images = images_of(*size, seed=6)
    hidden = block_outputs(reference.blocks, lambda: reference.forward_features(nchw(images)))
    out = forward(model, jnp.asarray(images))
    assert out.grid == (size[0] // 4, size[1] // 4)
    check_layers(out, hidden)


def test_sam_table_resized_at_load_matches_segment_anything_at_that_size():
    """Conversion-time resizing (resize_pos) to a 10 x 10 grid: the table bicubic, the global
    blocks' relative tables linearly to 19 rows. Reference: segment-anything given the resized
    table, its 31-row relative tables resized by `get_rel_pos` at run time."""
    reference = segment_anything_encoder()
    config = sam_config(pos_grid=(10, 10))
    params = convert_state_dict(numpy_state(reference), config, resize_pos=True)
    assert params["global_blocks/attn/rel_pos_h"].shape == (2, 19, WIDTH // HEADS)
    table = params["pos_embed"].reshape(1, 10, 10, WIDTH)
    expected = F.interpolate(reference.pos_embed.detach().permute(0, 3, 1, 2), size=(10, 10),
                             mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    assert relative_error(table, expected.numpy()) <= 1e-5
    reference.pos_embed = torch.nn.Parameter(torch.from_numpy(table))
    model = nnx.eval_shape(lambda: VisionTransformer(config, rngs=nnx.Rngs(0)))
    load_into_module(model, params)
    images = images_of(40, 40, seed=7)
    hidden = block_outputs(reference.blocks, lambda: reference(nchw(images)))
    check_layers(forward(model, jnp.asarray(images)), hidden)


def test_sam_layout_errors_are_clear():
    with pytest.raises(ValueError, match=r"global_blocks \(1, 2\) must close equal groups"):
        VisionTransformer(sam_config(global_blocks=(1, 2)), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="cls_token=False"):
        VisionTransformer(sam_config(cls_token=True), rngs=nnx.Rngs(0))


# --- EVA02 -----------------------------------------------------------------------------------

def timm_eva02(image_size: int = 56):
    """timm `eva02_large_patch14_224` at tiny width: RoPE referenced to the 4 x 4 grid."""
    model = timm.create_model("eva02_large_patch14_224", pretrained=False, embed_dim=WIDTH,
                              depth=2, num_heads=HEADS, img_size=image_size, num_classes=0,
                              ref_feat_shape=(4, 4), dynamic_img_size=True)
    return randomize(model, seed=16)


def eva02_config(**overrides) -> ViTConfig:
    tiny = dict(width=WIDTH, depth=2, num_heads=HEADS, mlp_dim=85, pos_grid=(4, 4),
                rope_ref_grid=(4, 4))
    return vit_config("eva02_vitl14", **(tiny | overrides))


@pytest.mark.parametrize("size", [(56, 56), (42, 70), (84, 84)])
def test_eva02_matches_timm(size):
    reference = timm_eva02()
    state = numpy_state(reference)
    assert detect_scheme(state) == "eva02"
    model = build(eva02_config(), state)
    images = images_of(*size, seed=8)
    hidden = block_outputs(reference.blocks, lambda: reference.forward_features(nchw(images)))
    out = forward(model, jnp.asarray(images))
    assert out.num_prefix == 1 and out.grid == (size[0] // 14, size[1] // 14)
    check_layers(out, hidden)


def released_eva_rope(head_dim: int, pt_seq_len: int, ft_seq_len: int):
    """`VisionRotaryEmbeddingFast` of the released `eva_02.py`, restated: its two buffers."""
    dim = head_dim // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    t = torch.arange(ft_seq_len) / ft_seq_len * pt_seq_len
    freqs = torch.einsum("..., f -> ... f", t, freqs).repeat_interleave(2, dim=-1)
    n = freqs.shape[0]
    freqs = torch.cat([freqs[:, None, :].expand(n, n, dim), freqs[None, :, :].expand(n, n, dim)],
                      dim=-1)
    return freqs.cos().reshape(-1, head_dim).numpy(), freqs.sin().reshape(-1, head_dim).numpy()


def released_eva_names(timm_state: dict, grid: int) -> dict:
    """timm tensors under the released `eva_02.py` (EVA02's) names, with its RoPE buffers."""
    renames = (("mlp.fc1_g", "mlp.w1"), ("mlp.fc1_x", "mlp.w2"), ("mlp.norm", "mlp.ffn_ln"),
               ("mlp.fc2", "mlp.w3"), ("attn.q_proj.bias", "attn.q_bias"),
               ("attn.v_proj.bias", "attn.v_bias"))
    out = {}
    for key, value in timm_state.items():
        for old, new in renames:
            key = key.replace(old, new)
        out[key] = value
    cos, sin = released_eva_rope(WIDTH // HEADS, pt_seq_len=4, ft_seq_len=grid)
    for prefix in ("rope.", "blocks.0.attn.rope.", "blocks.1.attn.rope."):
        out[prefix + "freqs_cos"], out[prefix + "freqs_sin"] = cos, sin
    out["norm.weight"] = np.ones(WIDTH, np.float32)  # the MIM model's final norm: unused
    out["norm.bias"] = np.zeros(WIDTH, np.float32)
    return out


def test_eva02_released_names_and_rope_buffers_land_on_the_timm_route():
    state = numpy_state(timm_eva02())
    config = eva02_config()
    expected = convert_state_dict(state, config)
    released = released_eva_names(state, grid=8)  # buffers of a model built for 8 x 8
    assert detect_scheme(released) == "eva02"
    converted = convert_state_dict(released, config)
    assert sorted(converted) == sorted(expected)
    for key in expected:
        np.testing.assert_array_equal(converted[key], expected[key], err_msg=key)
    wrong = dataclasses.replace(config, rope_ref_grid=(8, 8))
    with pytest.raises(ConversionError, match=r"rope\.freqs_cos"):
        convert_state_dict(released, wrong)


# --- DINOv3 7B -------------------------------------------------------------------------------

def dinov3_7b_hf():
    """HF DINOv3 in the `vit_7b` layout of facebookresearch/dinov3 (hub `dinov3_vit7b16`):
    SwiGLU, no qkv bias, projection and MLP biases, LayerScale, 4 storage tokens, eps 1e-5."""
    config = hf.DINOv3ViTConfig(
        hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2, num_attention_heads=HEADS,
        patch_size=4, num_register_tokens=4, use_gated_mlp=True, hidden_act="silu",
        query_bias=False, key_bias=False, value_bias=False, proj_bias=True, mlp_bias=True,
        layer_norm_eps=1e-5)
    return randomize(hf.DINOv3ViTModel(config), seed=17)


def test_dinov3_7b_preset_matches_facebookresearch_vit_7b_settings():
    config = vit_config("dinov3_vit7b16")
    # vit_7b: embed 4096, depth 40, 32 heads, ffn_ratio 3 with 'swiglu64' (int(3 * 4096 * 2/3)
    # aligned to 64 = 8192), qkv_bias False, layernormbf16 (eps 1e-5), 4 storage tokens,
    # LayerScale, mask_k_bias, RoPE base 100.
    assert (config.width, config.depth, config.num_heads, config.mlp_dim) == (4096, 40, 32, 8192)
    assert (config.ffn, config.qkv_bias, config.norm_eps, config.num_register_tokens) == (
        "swiglu", False, 1e-5, 4)
    assert config.layerscale and config.rope_kind == "dinov3" and config.rope_base == 100.0


@pytest.mark.parametrize("size", [(32, 32), (32, 48)])
def test_dinov3_7b_layout_matches_hf_at_tiny_width(size):
    reference = dinov3_7b_hf()
    state = numpy_state(reference)
    config = vit_config("dinov3_vit7b16", width=WIDTH, depth=2, num_heads=HEADS, mlp_dim=64,
                        patch_size=4)
    model = build(config, state, "hf_dinov3")
    assert "bias" not in nnx.to_pure_dict(nnx.state(model.blocks.attn.qkv))
    images = images_of(*size, seed=9)
    with torch.no_grad():
        out_ref = reference(nchw(images), output_hidden_states=True)
    out = forward(model, jnp.asarray(images))
    assert out.num_prefix == 5
    check_layers(out, [h.numpy() for h in out_ref.hidden_states[1:]])
    assert relative_error(out.normed, out_ref.last_hidden_state.numpy()) <= 1e-5

    # facebookresearch/dinov3 names: a bias-free qkv has no `bias_mask` buffer.
    original = {"cls_token": state["embeddings.cls_token"],
                "storage_tokens": state["embeddings.register_tokens"],
                "patch_embed.proj.weight": state["embeddings.patch_embeddings.weight"],
                "patch_embed.proj.bias": state["embeddings.patch_embeddings.bias"],
                "norm.weight": state["norm.weight"], "norm.bias": state["norm.bias"],
                "local_cls_norm.weight": np.ones(WIDTH, np.float32),
                "local_cls_norm.bias": np.zeros(WIDTH, np.float32)}
    for i in range(2):
        hf_layer, block = f"model.layer.{i}.", f"blocks.{i}."
        original[block + "attn.qkv.weight"] = np.concatenate(
            [state[hf_layer + f"attention.{p}_proj.weight"] for p in "qkv"])
        for kind in ("weight", "bias"):
            original[block + f"attn.proj.{kind}"] = state[hf_layer + f"attention.o_proj.{kind}"]
            for norm in ("norm1", "norm2"):
                original[block + f"{norm}.{kind}"] = state[hf_layer + f"{norm}.{kind}"]
            for ours, theirs in (("w1", "gate_proj"), ("w2", "up_proj"), ("w3", "down_proj")):
                original[block + f"mlp.{ours}.{kind}"] = state[hf_layer + f"mlp.{theirs}.{kind}"]
        original[block + "ls1.gamma"] = state[hf_layer + "layer_scale1.lambda1"]
        original[block + "ls2.gamma"] = state[hf_layer + "layer_scale2.lambda1"]
    expected = convert_state_dict(state, config, "hf_dinov3")
    converted = convert_state_dict(original, config)
    assert sorted(converted) == sorted(expected)
    for key in expected:
        np.testing.assert_array_equal(converted[key], expected[key], err_msg=key)


# --- Depth-Anything-V2 -----------------------------------------------------------------------

def hf_depth_anything_v2():
    backbone = dict(model_type="dinov2", hidden_size=WIDTH, num_hidden_layers=2,
                    num_attention_heads=HEADS, patch_size=14, image_size=56, mlp_ratio=2,
                    out_indices=[1, 2], reshape_hidden_states=False)
    config = hf.DepthAnythingConfig(
        backbone_config=backbone, reassemble_hidden_size=WIDTH, neck_hidden_sizes=[8, 16],
        reassemble_factors=[2, 1], fusion_hidden_size=8, head_hidden_size=8, patch_size=14,
        depth_estimation_type="relative")
    return randomize(hf.DepthAnythingForDepthEstimation(config), seed=18)


def depth_anything_config(**overrides) -> ViTConfig:
    # HF's Dinov2Backbone interpolates without DINOv2's 0.1 offset (SPEC 5.2).
    return vit_config("depth_anything_v2_vitl14", width=WIDTH, depth=2, num_heads=HEADS,
                      mlp_dim=64, pos_grid=(4, 4), **(dict(pos_interp_offset=0.0) | overrides))


@pytest.mark.parametrize("size", [(56, 56), (28, 42)])
def test_depth_anything_v2_encoder_matches_hf(size):
    reference = hf_depth_anything_v2()
    state = numpy_state(reference)
    assert detect_scheme(state) == "promptda_hf"
    model = build(depth_anything_config(), state)
    images = images_of(*size, seed=10)
    with torch.no_grad():
        hidden = reference.backbone(nchw(images), output_hidden_states=True).hidden_states
    check_layers(forward(model, jnp.asarray(images)), [h.numpy() for h in hidden[1:]])


def test_depth_anything_v2_pth_names_land_on_the_hf_route():
    """`depth_anything_v2_vitl.pth`: the DINOv2 encoder under `pretrained.`, the DPT head under
    `depth_head.` (dropped)."""
    from tests.test_vit_conversion import original_dinov2

    state = numpy_state(hf_depth_anything_v2())
    config = dataclasses.replace(depth_anything_config(), pos_interp_offset=0.1)
    expected = convert_state_dict(state, config, "promptda_hf")
    backbone = {k.removeprefix("backbone."): v for k, v in state.items()
                if k.startswith("backbone.")}
    pth = original_dinov2(backbone, prefix="pretrained.")
    pth["depth_head.scratch.output_conv2.0.weight"] = np.zeros((8, 8, 3, 3), np.float32)
    assert detect_scheme(pth) == "promptda"
    converted = convert_state_dict(pth, config)
    assert sorted(converted) == sorted(expected)
    for key in expected:
        np.testing.assert_array_equal(converted[key], expected[key], err_msg=key)
    # Depth-Anything-V2's `dinov2.py` resizes with the 0.1 offset, as its naming implies.
    preset = vit_config("depth_anything_v2_vitl14")
    assert implied_settings("promptda", preset) == {"pos_interp_offset": 0.1,
                                                    "pos_interp_antialias": False}
    assert vit_config("depth_anything_v2_vitl16").pos_grid == (32, 32)
