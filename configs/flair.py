r"""FLAIR cross-region, SpectralMoE on DINOv3 ViT-L/16 (R, G, B, NIR; 12 classes; 77,140 iterations).

  python -m spectralmoe_jax.main --config configs/flair.py --workdir runs/flair \
      --config.data.root=/data/FLAIR \
      --config.model.vfm.checkpoint=/weights/dinov3_vitl16.pth \
      --config.model.depth.checkpoint=/weights/promptda_vitl.ckpt

Variants: `configs/flair.py:rein`, `:frozen`, `:no_moe`, `:no_dual_gating`, `:no_depth`,
`:no_cross_attention` (config_lib.METHODS).
"""

from spectralmoe_jax import config_lib
from spectralmoe_jax.data import benchmarks


def get_config(variant=None):
    config = config_lib.base_config(benchmarks.flair(), num_steps=77140)
    return config_lib.apply_method(config, config_lib.parse_variant(variant))
