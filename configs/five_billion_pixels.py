r"""Five-Billion-Pixels / GID cross-sensor (GF-2 -> GF-1, PlanetScope, Sentinel-2; NIR, R, G, B;
24 classes), SpectralMoE on DINOv3 ViT-L/16.

  python -m spectralmoe_jax.main --config configs/five_billion_pixels.py --workdir runs/five_billion_pixels \
      --config.data.root=/data/five_billion_pixels --config.model.vfm.checkpoint=/weights/dinov3_vitl16.pth \
      --config.model.depth.checkpoint=/weights/promptda_vitl.ckpt

Method variants (config_lib.METHODS, docs/methods.md): `configs/five_billion_pixels.py:lora`,
`:adaptformer`, `:vpt`, `:set`, `:fada`, `:rein`, `:depthforge`, `:frozen`, and Table 4's
`:no_moe`, `:no_dual_gating`, `:no_depth`, `:no_cross_attention`; all of Table 3 trained and
evaluated alike, one table: `--mode compare` (`--config.compare.methods=...`).
"""

from spectralmoe_jax import config_lib


def get_config(variant=None):
    return config_lib.benchmark_config("five_billion_pixels", variant, num_steps=78760)
