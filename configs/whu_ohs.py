r"""WHU-OHS cross-region hyperspectral (32 bands, 0.466-0.940 um), SpectralMoE on DOFA ViT-L/16.

  python -m spectralmoe_jax.main --config configs/whu_ohs.py --workdir runs/whu_ohs \
      --config.data.root=/data/whu_ohs --config.model.vfm.checkpoint=/weights/dofa_vitl16.pth \
      --config.model.depth.checkpoint=/weights/promptda_vitl.ckpt

Variants (config_lib.METHODS): `configs/whu_ohs.py:rein`, `:frozen`, `:no_moe`, `:no_dual_gating`,
`:no_depth`, `:no_cross_attention`.
"""

from spectralmoe_jax import config_lib
from spectralmoe_jax.data import benchmarks


def get_config(variant=None):
    config = config_lib.base_config(benchmarks.whu_ohs(), num_steps=10945, vfm="dofa_vitl16")
    config.train.batch_size = 4  # released: bs1x4
    return config_lib.apply_method(config, config_lib.parse_variant(variant))
