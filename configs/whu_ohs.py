r"""WHU-OHS cross-region hyperspectral (32 bands, 0.466-0.940 um, 7 classes), SpectralMoE on
DOFA ViT-L/16; released batch 1 x 4.

  python -m spectralmoe_jax.main --config configs/whu_ohs.py --workdir runs/whu_ohs \
      --config.data.root=/data/whu_ohs --config.model.vfm.checkpoint=/weights/dofa_vitl16.pth \
      --config.model.depth.checkpoint=/weights/promptda_vitl.ckpt

Method variants (config_lib.METHODS, docs/methods.md): `configs/whu_ohs.py:lora`,
`:adaptformer`, `:vpt`, `:set`, `:fada`, `:rein`, `:depthforge`, `:frozen`, and Table 4's
`:no_moe`, `:no_dual_gating`, `:no_depth`, `:no_cross_attention`; all of Table 3 trained and
evaluated alike, one table: `--mode compare` (`--config.compare.methods=...`).
"""

from spectralmoe_jax import config_lib


def get_config(variant=None):
    return config_lib.benchmark_config("whu_ohs", variant, num_steps=10945, vfm="dofa_vitl16", batch_size=4)
