"""The assembled segmentor: pyramid, trainable split, parameter counts, trained-part loading."""

import numpy as np
import pytest
import torch
from flax import nnx

from tests.conftest import relative_error
from tests.tiny import tiny_config, tiny_run
from spectralmoe_jax.build import build_segmentor
from spectralmoe_jax.models.segmentor import Segmentor, resize_bilinear, split_model
from spectralmoe_jax.run_config import parse
from spectralmoe_jax.summary import parameter_counts


@pytest.mark.parametrize("scale", [4.0, 2.0, 0.5])
def test_pyramid_resize_matches_torch_interpolate(scale):
    x = np.random.default_rng(0).normal(size=(2, 6, 10, 3)).astype(np.float32)
    ours = resize_bilinear(x, scale)
    ref = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2),
                                          scale_factor=scale, mode="bilinear", align_corners=False)
    assert relative_error(ours, ref.permute(0, 2, 3, 1).numpy()) < 1e-6


def adapter_trainable(variant):
    from configs import flair

    counts = parameter_counts(parse(flair.get_config(variant)).model)
    return sum(c["trainable"] for name, c in counts["modules"].items() if name.startswith("adapter"))


def test_adapter_parameter_counts_from_summary_match_the_paper():
    # Paper Table 3: SpectralMoE 5.74 M, REIN 2.99 M trainable adapter parameters (DINOv3 ViT-L).
    assert round(adapter_trainable(None) / 1e6, 2) == 5.74
    assert round(adapter_trainable("rein") / 1e6, 2) == 2.99


def test_only_adapter_and_head_are_trainable():
    counts = parameter_counts(tiny_run().model)
    for name, c in counts["modules"].items():
        frozen_part = name.split("/")[0] in ("vfm", "depth")
        assert c["trainable"] == (0 if frozen_part else c["total"]), name
    assert counts["trainable"] + counts["frozen"] == counts["total"]


def test_forward_shapes_and_routing_maps():
    run = tiny_run()
    model = Segmentor(run.model.segmentor(), rngs=nnx.Rngs(0))
    images = np.random.default_rng(0).normal(size=(2, 64, 96, 4)).astype(np.float32)
    forward = nnx.jit(lambda m, x: m(x, train=False))
    out = forward(model, images)
    layers = model.vfm.config.depth
    assert out["class_logits"].shape == (3, 2, 16, 13)
    assert out["mask_logits"].shape == (3, 2, 16, 16, 24)
    assert out["expert_v"].shape == (2, layers, 4, 6)
    assert int(out["expert_v"].max()) < model.adapter.config.num_experts
    # Without the adapter the model is the frozen-backbone baseline.
    frozen = Segmentor(tiny_run("frozen").model.segmentor(), rngs=nnx.Rngs(0))
    assert frozen.adapter is None and frozen.depth is None
    assert "expert_v" not in forward(frozen, images)


def test_trained_parts_round_trip_through_a_converted_folder(tmp_path):
    from spectralmoe_jax.conversion.load import write_converted
    from spectralmoe_jax.conversion.rules import flatten_state

    config = tiny_config()
    source = build_segmentor(parse(config).model, seed=1).model
    _, trained, _, _ = split_model(source)
    write_converted(str(tmp_path / "trained"),
                    {k: np.asarray(v) for k, v in flatten_state(trained).items()},
                    {"holds": "trained"})
    config.model.checkpoint = str(tmp_path / "trained")
    loaded = build_segmentor(parse(config).model, seed=2).model
    _, a, frozen_a, _ = split_model(source)
    _, b, frozen_b, _ = split_model(loaded)
    for x, y in zip(nnx.to_flat_state(a), nnx.to_flat_state(b)):
        assert x[0] == y[0]
        np.testing.assert_array_equal(np.asarray(x[1][...]), np.asarray(y[1][...]))
    # The frozen backbones keep their own initialisation (seed 2), untouched by the checkpoint.
    differs = [not np.array_equal(np.asarray(x[1][...]), np.asarray(y[1][...]))
               for x, y in zip(nnx.to_flat_state(frozen_a), nnx.to_flat_state(frozen_b))]
    assert any(differs)
