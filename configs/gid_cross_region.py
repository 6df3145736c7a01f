r"""GID cross-region (CGS: disjoint GF-2 regions; NIR, R, G, B; 24 classes), SpectralMoE on
DINOv3 ViT-L/16.

  python -m spectralmoe_jax.main --config configs/gid_cross_region.py --workdir runs/gid_cross_region \
      --config.data.root=/data/gid_cross_region --config.model.vfm.checkpoint=/weights/dinov3_vitl16.pth \
      --config.model.depth.checkpoint=/weights/promptda_vitl.ckpt

Method variants (config_lib.METHODS, docs/methods.md): `configs/gid_cross_region.py:lora`,
`:adaptformer`, `:vpt`, `:set`, `:fada`, `:rein`, `:depthforge`, `:frozen`, and Table 4's
`:no_moe`, `:no_dual_gating`, `:no_depth`, `:no_cross_attention`; all of Table 3 trained and
evaluated alike, one table: `--mode compare` (`--config.compare.methods=...`).
"""

from spectralmoe_jax import config_lib


def get_config(variant=None):
    return config_lib.benchmark_config("gid_cross_region", variant, num_steps=66160)
