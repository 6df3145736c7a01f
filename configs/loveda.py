r"""LoveDA rural -> urban (RGB; 7 classes), SpectralMoE on DINOv3 ViT-L/16 with 3 experts.

  python -m spectralmoe_jax.main --config configs/loveda.py --workdir runs/loveda \
      --config.data.root=/data/loveda --config.model.vfm.checkpoint=/weights/dinov3_vitl16.pth \
      --config.model.depth.checkpoint=/weights/promptda_vitl.ckpt

Method variants (config_lib.METHODS, docs/methods.md): `configs/loveda.py:lora`,
`:adaptformer`, `:vpt`, `:set`, `:fada`, `:rein`, `:depthforge`, `:frozen`, and Table 4's
`:no_moe`, `:no_dual_gating`, `:no_depth`, `:no_cross_attention`; all of Table 3 trained and
evaluated alike, one table: `--mode compare` (`--config.compare.methods=...`).
"""

from spectralmoe_jax import config_lib


def get_config(variant=None):
    return config_lib.benchmark_config("loveda", variant, num_steps=23580, num_experts=3)
