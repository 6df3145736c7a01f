r"""Potsdam (RGB) -> Vaihingen (IRRG), 6 classes, SpectralMoE on DINOv3 ViT-L/16.

  python -m spectralmoe_jax.main --config configs/potsdam_vaihingen.py --workdir runs/potsdam_vaihingen \
      --config.data.root=/data/potsdam_vaihingen --config.model.vfm.checkpoint=/weights/dinov3_vitl16.pth \
      --config.model.depth.checkpoint=/weights/promptda_vitl.ckpt

Variants (config_lib.METHODS): `configs/potsdam_vaihingen.py:rein`, `:frozen`, `:no_moe`, `:no_dual_gating`,
`:no_depth`, `:no_cross_attention`.
"""

from spectralmoe_jax import config_lib
from spectralmoe_jax.data import benchmarks


def get_config(variant=None):
    config = config_lib.base_config(benchmarks.potsdam_vaihingen(), num_steps=13680)
    return config_lib.apply_method(config, config_lib.parse_variant(variant))
