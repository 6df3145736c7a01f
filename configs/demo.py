r"""The demo: SpectralMoE at tiny width on the six bundled FLAIR #2 tiles, on a CPU.

  python -m spectralmoe_jax.main --config configs/demo.py --workdir runs/demo --mode demo

Trains on four French regions (D055, D051, D074, D006) and evaluates on the unseen D004. The
architecture is the full one (DINOv3-style ViT with RoPE and storage tokens, a PromptDA-style
depth ViT, the dual-gated SpectralMoE adapter after every block, the Mask2Former decoder with
its Hungarian-matched losses) at tiny width, randomly initialised: no weights can be downloaded,
so the frozen backbones are random and only the adapter and decoder learn. Variants as in every
benchmark config, e.g. `configs/demo.py:frozen` for the baseline without adapter.
"""

from spectralmoe_jax import config_lib
from spectralmoe_jax.data import benchmarks

WIDTH = 64
BLOCKS = 4
TINY_VIT = dict(width=WIDTH, depth=BLOCKS, num_heads=4, mlp_dim=2 * WIDTH)
QUERIES = 16


def get_config(variant=None):
    data = benchmarks.flair2_demo()
    data.crop_size = (256, 256)
    config = config_lib.base_config(data, num_steps=120)
    config.model.dtype = "float32"
    config.model.vfm.overrides.update(TINY_VIT)
    config.model.depth = config_lib.depth_config(bands=data.rgb_bands, preset="promptda_vitl16",
                                                 **TINY_VIT)
    config.model.adapter.update(dict(num_experts=4, rank=4, num_tokens=QUERIES,
                                     num_queries=QUERIES, query_dim=WIDTH, lora_rank=4,
                                     adaptformer_bottleneck=16, vpt_tokens=8))
    config.model.decoder.update(dict(
        hidden_dim=WIDTH, num_queries=QUERIES, encoder_layers=2, encoder_heads=4,
        encoder_ffn_dim=2 * WIDTH, decoder_layers=3, decoder_heads=4, decoder_ffn_dim=2 * WIDTH,
        num_groups=8))
    config.model.feature_layers = tuple(range(BLOCKS))
    config.loss.num_points = 2048
    config.train.update(dict(batch_size=4, learning_rate=1e-3, log_every=25,
                             checkpoint_every=100, eval_every=0))
    return config_lib.apply_method(config, config_lib.parse_variant(variant))
