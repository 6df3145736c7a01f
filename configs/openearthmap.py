r"""OpenEarthMap cross-continent (RGB; 8 classes), SpectralMoE on DINOv3 ViT-L/16 with 3 experts.

  python -m spectralmoe_jax.main --config configs/openearthmap.py --workdir runs/openearthmap \
      --config.data.root=/data/openearthmap --config.model.vfm.checkpoint=/weights/dinov3_vitl16.pth \
      --config.model.depth.checkpoint=/weights/promptda_vitl.ckpt

Method variants (config_lib.METHODS, docs/methods.md): `configs/openearthmap.py:lora`,
`:adaptformer`, `:vpt`, `:set`, `:fada`, `:rein`, `:depthforge`, `:frozen`, and Table 4's
`:no_moe`, `:no_dual_gating`, `:no_depth`, `:no_cross_attention`; all of Table 3 trained and
evaluated alike, one table: `--mode compare` (`--config.compare.methods=...`).
"""

from spectralmoe_jax import config_lib


def get_config(variant=None):
    return config_lib.benchmark_config("openearthmap", variant, num_steps=20500, num_experts=3)
