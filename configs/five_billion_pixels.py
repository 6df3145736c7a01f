r"""Five-Billion-Pixels / GID cross-sensor (GF-2 -> GF-1, PlanetScope, Sentinel-2; NIR,R,G,B; 24 classes), SpectralMoE on DINOv3 ViT-L/16.

  python -m spectralmoe_jax.main --config configs/five_billion_pixels.py --workdir runs/five_billion_pixels \
      --config.data.root=/data/five_billion_pixels --config.model.vfm.checkpoint=/weights/dinov3_vitl16.pth \
      --config.model.depth.checkpoint=/weights/promptda_vitl.ckpt

Variants (config_lib.METHODS): `configs/five_billion_pixels.py:rein`, `:frozen`, `:no_moe`, `:no_dual_gating`,
`:no_depth`, `:no_cross_attention`.
"""

from spectralmoe_jax import config_lib
from spectralmoe_jax.data import benchmarks


def get_config(variant=None):
    config = config_lib.base_config(benchmarks.five_billion_pixels(), num_steps=78760)
    return config_lib.apply_method(config, config_lib.parse_variant(variant))
