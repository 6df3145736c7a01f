"""ViT family parity against HF transformers, block by block, on non-square inputs (float32)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers as hf
from flax import nnx

from tests.converted import load_vit
from spectralmoe_jax.models.vit import (
    VisionTransformer, ViTConfig, interpolate_pos_embed, vit_config)
from tests.conftest import relative_error

WIDTH, DEPTH, HEADS = 32, 2, 4


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random values everywhere (norm gains near 1), so no swapped tensor hides behind an init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            gain = "norm" in name and name.endswith("weight")
            p.copy_(1.0 + 0.1 * noise if gain else 0.3 * noise)
    return model.eval()


def dinov2_hf(registers: int = 0, image_size: int = 16, patch: int = 4, swiglu: bool = False):
    kwargs = dict(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                  patch_size=patch, image_size=image_size, mlp_ratio=2, use_swiglu_ffn=swiglu)
    if registers:
        model = hf.Dinov2WithRegistersModel(
            hf.Dinov2WithRegistersConfig(num_register_tokens=registers, **kwargs))
    else:
        model = hf.Dinov2Model(hf.Dinov2Config(**kwargs))
    return randomize(model, seed=registers + image_size + swiglu)


def dinov2_config(registers: int = 0, image_size: int = 16, patch: int = 4,
                  swiglu: bool = False) -> ViTConfig:
    grid = image_size // patch
    mlp_dim = (int(2 * WIDTH * 2 / 3) + 7) // 8 * 8 if swiglu else 2 * WIDTH
    return ViTConfig(family="dinov2", patch_size=patch, width=WIDTH, depth=DEPTH, num_heads=HEADS,
                     mlp_dim=mlp_dim, ffn="swiglu" if swiglu else "mlp",
                     num_register_tokens=registers, pos_grid=(grid, grid),
                     pos_interp_offset=0.0, pos_interp_antialias=bool(registers))


def dinov3_hf(swiglu: bool = False):
    config = hf.DINOv3ViTConfig(
        hidden_size=WIDTH, intermediate_size=48, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
        patch_size=4, num_register_tokens=2, use_gated_mlp=swiglu,
        hidden_act="silu" if swiglu else "gelu")
    return randomize(hf.DINOv3ViTModel(config), seed=3 + swiglu)


def dinov3_config(swiglu: bool = False) -> ViTConfig:
    return ViTConfig(family="dinov3", patch_size=4, width=WIDTH, depth=DEPTH, num_heads=HEADS,
                     mlp_dim=48, ffn="swiglu" if swiglu else "mlp", num_register_tokens=2,
                     position="rope", norm_eps=1e-5, mask_k_bias=True)


def promptda_hf():
    backbone = dict(model_type="dinov2", hidden_size=WIDTH, num_hidden_layers=DEPTH,
                    num_attention_heads=HEADS, patch_size=14, image_size=56, mlp_ratio=2,
                    out_indices=[1, 2], reshape_hidden_states=False)
    config = hf.PromptDepthAnythingConfig(
        backbone_config=backbone, reassemble_hidden_size=WIDTH, neck_hidden_sizes=[8, 16],
        reassemble_factors=[2, 1], fusion_hidden_size=8, head_hidden_size=8, patch_size=14)
    return randomize(hf.PromptDepthAnythingForDepthEstimation(config), seed=7)


def hf_states(model, images: np.ndarray, **kwargs):
    """(hidden states after every block, final normed states or None) from HF."""
    with torch.no_grad():
        out = model(torch.from_numpy(images).permute(0, 3, 1, 2), output_hidden_states=True,
                    **kwargs)
    hidden = [h.numpy() for h in out.hidden_states[1:]]  # [0] is the embedding output
    last = getattr(out, "last_hidden_state", None)
    return hidden, None if last is None else last.numpy()


def ours_from(hf_model, config: ViTConfig, scheme: str) -> VisionTransformer:
    return load_vit({k: v.numpy() for k, v in hf_model.state_dict().items()}, config, scheme)


@nnx.jit
def forward(model, images):
    return model(images)


def images_of(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(2, height, width, 3)).astype(np.float32)


def check_blocks(out, hidden, last):
    """Every block's patch tokens, the last block's tokens and the final norm against HF."""
    errors = [relative_error(out.layers[i], hidden[i][:, out.num_prefix:])
              for i in range(len(hidden))]
    errors.append(relative_error(out.tokens, hidden[-1]))
    if last is not None:
        errors.append(relative_error(out.normed, last))
    assert max(errors) <= 1e-5, errors
    return max(errors)


# (registers, table size in pixels): upsampling 4x4 -> 8x12 and downsampling 16x16 -> 8x12.
@pytest.mark.parametrize("registers,image_size", [(0, 16), (0, 64), (2, 16), (2, 64)])
def test_dinov2_every_block_matches_hf(registers, image_size):
    reference = dinov2_hf(registers, image_size)
    config = dinov2_config(registers, image_size)
    images = images_of(32, 48)
    out = forward(ours_from(reference, config, "hf_dinov2"), jnp.asarray(images))
    assert out.grid == (8, 12) and out.num_prefix == 1 + registers
    assert out.layers.shape == (DEPTH, 2, 96, WIDTH)
    check_blocks(out, *hf_states(reference, images))


def test_dinov2_swiglu_matches_hf():
    reference = dinov2_hf(swiglu=True)
    images = images_of(32, 48, seed=1)
    out = forward(ours_from(reference, dinov2_config(swiglu=True), "hf_dinov2"),
                  jnp.asarray(images))
    check_blocks(out, *hf_states(reference, images))


@pytest.mark.parametrize("swiglu", [False, True])
def test_dinov3_every_block_matches_hf(swiglu):
    reference = dinov3_hf(swiglu)
    images = images_of(32, 48, seed=2)
    out = forward(ours_from(reference, dinov3_config(swiglu), "hf_dinov3"), jnp.asarray(images))
    assert out.num_prefix == 3
    check_blocks(out, *hf_states(reference, images))


def test_promptda_backbone_matches_hf():
    reference = promptda_hf()
    config = dinov2_config(image_size=56, patch=14)
    images = images_of(28, 42, seed=3)
    out = forward(ours_from(reference, config, "promptda_hf"), jnp.asarray(images))
    assert out.grid == (2, 3)
    hidden, _ = hf_states(reference.backbone, images)
    check_blocks(out, hidden, None)


def test_square_input_at_table_size_skips_interpolation():
    # 16x16 pixels at patch 4 is the 4x4 table: used as stored, whatever the offset says.
    reference = dinov2_hf()
    config = dataclasses.replace(dinov2_config(), pos_interp_offset=0.1)
    images = images_of(16, 16, seed=4)
    out = forward(ours_from(reference, config, "hf_dinov2"), jnp.asarray(images))
    check_blocks(out, *hf_states(reference, images))


@pytest.mark.parametrize("offset,antialias", [(0.1, False), (0.0, True)])
def test_position_interpolation_matches_facebookresearch_dinov2(offset, antialias, np_rng):
    """`interpolate_pos_encoding` of facebookresearch/dinov2: scale factor (h0 + offset) / M
    without registers, output size with antialias for the register models; 16x16 -> 8x12."""
    table = np_rng.normal(size=(256, WIDTH)).astype(np.float32)
    grid = torch.from_numpy(table).reshape(1, 16, 16, WIDTH).permute(0, 3, 1, 2)
    kwargs = (dict(scale_factor=((8 + offset) / 16, (12 + offset) / 16)) if offset
              else dict(size=(8, 12)))
    expected = F.interpolate(grid, mode="bicubic", antialias=antialias, **kwargs)
    expected = expected.permute(0, 2, 3, 1).reshape(96, WIDTH).numpy()
    ours = interpolate_pos_embed(jnp.asarray(table), (16, 16), (8, 12), offset=offset,
                                 antialias=antialias)
    assert relative_error(ours, expected) <= 1e-5


def test_additive_hook_matches_torch_forward_hooks():
    """hook(i, patches) = (patches + delta_i, mean(patches)) against the same edit made by
    torch forward hooks on HF's layers; prefix tokens must pass unchanged."""
    reference = dinov3_hf()
    model = ours_from(reference, dinov3_config(), "hf_dinov3")
    images = images_of(32, 48, seed=5)
    deltas = np.random.default_rng(6).normal(size=(DEPTH, 96, WIDTH)).astype(np.float32)
    prefix = 3
    seen = []

    def torch_hook(index):
        def edit(module, inputs, output):
            seen.append(output[:, prefix:].mean().item())
            output = output.clone()
            output[:, prefix:] += torch.from_numpy(deltas[index])
            return output
        return edit

    handles = [layer.register_forward_hook(torch_hook(i))
               for i, layer in enumerate(reference.model.layer)]
    try:
        hidden, last = hf_states(reference, images)
    finally:
        for handle in handles:
            handle.remove()

    def hook(index, patches):
        return patches + jnp.asarray(deltas)[index], jnp.mean(patches)

    out = nnx.jit(lambda m, x: m(x, hook=hook))(model, jnp.asarray(images))
    check_blocks(out, hidden, last)
    np.testing.assert_allclose(np.asarray(out.hook_aux), seen, rtol=1e-5, atol=1e-6)
    # The hook did something: without it the outputs differ.
    plain = forward(model, jnp.asarray(images))
    assert relative_error(plain.layers[-1], hidden[-1][:, prefix:]) > 1e-2


def test_bfloat16_compute_stays_close_to_float32_reference():
    reference = dinov3_hf()
    config = dataclasses.replace(dinov3_config(), dtype="bfloat16")
    images = images_of(32, 48, seed=8)
    out = forward(ours_from(reference, config, "hf_dinov3"), jnp.asarray(images))
    hidden, last = hf_states(reference, images)
    assert out.tokens.dtype == jnp.float32  # the residual stream stays float32
    assert relative_error(out.tokens, hidden[-1]) < 3e-2


def test_blocks_are_stacked_and_scanned():
    config = vit_config("dinov3_vitl16", depth=3, width=64, num_heads=4, mlp_dim=128)
    model = nnx.eval_shape(lambda: VisionTransformer(config, rngs=nnx.Rngs(0)))
    assert model.blocks.attn.qkv.kernel.shape == (3, 64, 192)
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x).tokens)(
        state, jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
    assert "scan" in str(jaxpr)


def test_presets_and_input_checks():
    # The position-table resize is left to the weights' origin (tests/test_vit_positions.py).
    for name in ("dinov2_vitl14", "dinov2_vitl14_reg", "promptda_vitl16", "dofa_vitl16"):
        config = vit_config(name)
        assert (config.pos_interp_offset, config.pos_interp_antialias) == (None, None), name
    assert vit_config("dofa_vitl16").position == "learned"
    assert vit_config("dinov3_vith16plus").ffn == "swiglu"
    with pytest.raises(ValueError, match="unknown ViT preset 'vit_huge'"):
        vit_config("vit_huge")
    model = nnx.eval_shape(lambda: VisionTransformer(dinov2_config(), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="4 channels, the model expects 3"):
        model(jnp.zeros((1, 16, 16, 4)))
    with pytest.raises(ValueError, match="ffn='gelu'"):
        nnx.eval_shape(lambda: VisionTransformer(ViTConfig(ffn="gelu"), rngs=nnx.Rngs(0)))


def test_gradient_reaches_the_hook_through_scanned_remat_blocks():
    """d sum(last patch tokens) / d delta: exactly the batch size (2) for the delta added after
    the last block (the hook is applied last, once per image), non-zero through the blocks for
    the earlier ones, and the same whatever the blocks' remat policy."""
    images = jnp.asarray(images_of(32, 48, seed=9))

    def gradients(remat):
        model = ours_from(dinov3_hf(), dataclasses.replace(dinov3_config(), remat=remat),
                          "hf_dinov3")

        def loss(deltas):
            out = model(images, hook=lambda i, patches: (patches + deltas[i], None))
            return out.layers[-1].sum()

        return np.asarray(jax.jit(jax.grad(loss))(jnp.zeros((DEPTH, 96, WIDTH))))

    grads = gradients("none")
    for remat in ("full", "dots"):
        np.testing.assert_allclose(gradients(remat), grads, rtol=1e-5, atol=1e-6 * abs(grads).max())
    np.testing.assert_array_equal(grads[-1], np.full((96, WIDTH), 2.0))
    assert np.all(np.isfinite(grads[0])) and np.abs(grads[0]).max() > 0
