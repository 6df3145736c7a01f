"""DOFA against torchgeo's `torchgeo.models.dofa.DOFA`, the way most DOFA users load its weights.

torchgeo's module names are those of zhu-xlab/DOFA (`patch_embed.weight_generator.*`,
`blocks.N.*`, `fc_norm` or `norm`), so the 'dofa' scheme converts them. One model takes any bands:
the same random weights are run on 5 and 32 bands, two wavelength sets each.
"""

import functools

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from torchgeo.models.dofa import DOFA

from spectralmoe_jax.conversion.rules import ConversionError, load_into_module
from spectralmoe_jax.conversion.vit import config_for_checkpoint, convert_state_dict, detect_scheme
from spectralmoe_jax.models.vit import VisionTransformer, vit_config
from tests.conftest import relative_error
from tests.test_vit import randomize

WIDTH, DEPTH, HEADS, PATCH = 32, 2, 4, 16
IMAGE = 64  # torchgeo's table: (64 // 16) ** 2 patches; padding 1 keeps the 4 x 4 grid
BANDS = {
    "sentinel2_5": [0.49, 0.56, 0.665, 0.842, 1.61],
    "other_5": [0.443, 0.705, 0.74, 0.783, 2.19],
    "whu_ohs_32": np.linspace(0.466, 0.940, 32).tolist(),
    "vnir_swir_32": np.linspace(0.40, 2.50, 32).tolist(),
}


@functools.cache
def torchgeo_dofa(global_pool: bool = True, img_size: int = IMAGE):
    torch.manual_seed(0)
    model = DOFA(img_size=img_size, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH,
                 num_heads=HEADS, num_classes=10, global_pool=global_pool)
    return randomize(model, seed=50)  # the position table too (torchgeo leaves it zero)


def state_of(model) -> dict:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def ours_for(state: dict, config, **options) -> VisionTransformer:
    config = config_for_checkpoint(state, config)
    model = nnx.eval_shape(lambda: VisionTransformer(config, rngs=nnx.Rngs(0)))
    load_into_module(model, convert_state_dict(state, config, **options))
    return model


def config_for(grid: int, **overrides):
    return vit_config("dofa_vitl16", width=WIDTH, depth=DEPTH, num_heads=HEADS,
                      mlp_dim=4 * WIDTH, pos_grid=(grid, grid), **overrides)


def reference_outputs(model, images: np.ndarray, wavelengths):
    """(every block's tokens, `forward_features`) of torchgeo's DOFA."""
    blocks = []
    handles = [block.register_forward_hook(lambda m, i, out: blocks.append(out.numpy()))
               for block in model.blocks]
    try:
        with torch.no_grad():
            features = model.forward_features(torch.from_numpy(images).permute(0, 3, 1, 2),
                                              list(wavelengths)).numpy()
    finally:
        for handle in handles:
            handle.remove()
    return blocks, features


@nnx.jit
def forward(model, images, wavelengths):
    out = model(images, wavelengths=wavelengths)
    return out.layers, out.tokens, out.normed


def compare(ours, reference, images, wavelengths, *, global_pool=True) -> dict:
    layers, tokens, normed = forward(ours, jnp.asarray(images), jnp.asarray(wavelengths,
                                                                            jnp.float32))
    blocks, features = reference_outputs(reference, images, wavelengths)
    errors = {f"block{i}": relative_error(layers[i], blocks[i][:, 1:]) for i in range(DEPTH)}
    errors["tokens"] = relative_error(tokens, blocks[-1])
    if global_pool:  # fc_norm of the mean patch token (ours: the converted final norm)
        errors["features"] = relative_error(ours.norm(tokens[:, 1:].mean(axis=1)), features)
    else:  # norm(x)[:, 0]
        errors["features"] = relative_error(normed[:, 0], features)
    return errors


def images_of(bands: int, size: int = IMAGE) -> np.ndarray:
    return np.random.default_rng(bands + size).normal(size=(2, size, size, bands)).astype(
        np.float32)


@pytest.mark.parametrize("bands", list(BANDS))
def test_matches_torchgeo_dofa(bands):
    reference = torchgeo_dofa()
    state = state_of(reference)
    assert detect_scheme(state) == "dofa"
    ours = ours_for(state, config_for(IMAGE // PATCH, final_norm=True))
    wavelengths = BANDS[bands]
    errors = compare(ours, reference, images_of(len(wavelengths)), wavelengths)
    assert max(errors.values()) <= 1e-5, errors


def test_norm_naming_without_global_pool():
    reference = torchgeo_dofa(global_pool=False)
    ours = ours_for(state_of(reference), config_for(IMAGE // PATCH, final_norm=True))
    wavelengths = BANDS["sentinel2_5"]
    errors = compare(ours, reference, images_of(5), wavelengths, global_pool=False)
    assert max(errors.values()) <= 1e-5, errors


def test_pretrained_files_without_final_norm_load_into_the_preset():
    """torchgeo's pretrained DOFA files carry neither `fc_norm` nor `norm` (it allows them
    missing), and the released SpectralMoE DOFA has none: the preset has no final norm and drops
    one a file does carry."""
    state = state_of(torchgeo_dofa())
    bare = {k: v for k, v in state.items() if not k.startswith("fc_norm.")}
    config = config_for(IMAGE // PATCH)
    assert not config.final_norm
    for source in (bare, state):
        ours = ours_for(source, config)
        assert ours.norm is None
    with pytest.raises(ConversionError, match="missing from the checkpoint: norm/bias, "
                                              "norm/scale"):
        ours_for(bare, config_for(IMAGE // PATCH, final_norm=True))


def released_table(table: np.ndarray, grid: int) -> np.ndarray:
    """`interpolate_pos_embed_` of the released tools/convert_models/convert_dofa_depthmoe.py."""
    pos = torch.from_numpy(table)
    cls, tokens = pos[:, :1], pos[:, 1:]
    side = int(tokens.shape[-2] ** 0.5)
    resized = F.interpolate(tokens.reshape(-1, side, side, WIDTH).permute(0, 3, 1, 2),
                            size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat((cls, resized.permute(0, 2, 3, 1).reshape(1, -1, WIDTH)), dim=1).numpy()


def test_other_size_as_the_released_converter_resizes_the_table():
    """At 96 px (6 x 6 patches) torchgeo's DOFA needs a 6 x 6 table; the released SpectralMoE
    converter makes it by bicubic resizing. Ours gets the same from the 4 x 4 file both ways:
    resized on conversion (pos_grid 6 x 6) or at run time (pos_grid 4 x 4, as the file)."""
    native = state_of(torchgeo_dofa())
    reference = torchgeo_dofa(img_size=96)
    converted = dict(native, pos_embed=released_table(native["pos_embed"], 6))
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in converted.items()})
    wavelengths = BANDS["whu_ohs_32"]
    images = images_of(32, 96)
    for ours in (ours_for(native, config_for(6, final_norm=True), resize_pos=True),
                 ours_for(native, config_for(4, final_norm=True))):
        errors = compare(ours, reference, images, wavelengths)
        assert max(errors.values()) <= 1e-5, (ours.config.pos_grid, errors)
