r"""OpenEarthMap cross-continent (RGB; 8 classes), SpectralMoE on DINOv3 ViT-L/16 with 3 experts.

  python -m spectralmoe_jax.main --config configs/openearthmap.py --workdir runs/openearthmap \
      --config.data.root=/data/openearthmap --config.model.vfm.checkpoint=/weights/dinov3_vitl16.pth \
      --config.model.depth.checkpoint=/weights/promptda_vitl.ckpt

Variants (config_lib.METHODS): `configs/openearthmap.py:rein`, `:frozen`, `:no_moe`, `:no_dual_gating`,
`:no_depth`, `:no_cross_attention`.
"""

from spectralmoe_jax import config_lib
from spectralmoe_jax.data import benchmarks


def get_config(variant=None):
    config = config_lib.base_config(benchmarks.openearthmap(), num_steps=20500)
    config.model.adapter.num_experts = 3
    return config_lib.apply_method(config, config_lib.parse_variant(variant))
