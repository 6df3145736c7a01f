"""The smallest full-architecture config (the demo's random backbones, shrunk), on the bundled
FLAIR #2 tiles: for engine tests."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from configs import demo  # noqa: E402

WIDTH = 32


def tiny_config(variant=None, *, crop=64, batch_size=2, num_steps=4):
    config = demo.get_config(",".join(["random", *([variant] if variant else [])]))
    config.data.crop_size = (crop, crop)
    config.data.augment.short_edges = (crop, crop + 16)
    config.data.augment.max_size = 4 * crop
    vit = dict(width=WIDTH, depth=2, num_heads=2, mlp_dim=2 * WIDTH)
    config.model.vfm.overrides.update(vit)
    config.model.depth.overrides.update(vit)
    config.model.adapter.update(dict(num_experts=3, rank=2, num_tokens=16, num_queries=16,
                                     query_dim=WIDTH, lora_rank=2, adaptformer_bottleneck=8,
                                     vpt_tokens=4, sample_group_train=batch_size))
    config.model.decoder.update(dict(
        hidden_dim=WIDTH, num_queries=16, encoder_layers=1, encoder_heads=2, encoder_ffn_dim=WIDTH,
        decoder_layers=2, decoder_heads=2, decoder_ffn_dim=WIDTH, num_groups=4))
    config.model.feature_layers = (0, 1, 1, 1)
    config.loss.num_points = 64
    config.train.update(dict(batch_size=batch_size, num_steps=num_steps, log_every=1,
                             checkpoint_every=2, eval_every=0, tensorboard=False))
    config.eval.batch_size = 1
    return config


def tiny_run(variant=None, **kwargs):
    """`tiny_config` parsed: the typed `RunConfig` the package's functions take."""
    from spectralmoe_jax.run_config import parse

    return parse(tiny_config(variant, **kwargs))


def tiny_training(workdir, variant=None, **kwargs):
    """The tiny run's `Training` in `workdir`, as `--mode train` starts it."""
    from spectralmoe_jax.modes import start_training

    return start_training(tiny_run(variant, **kwargs), str(workdir))
