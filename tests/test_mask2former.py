"""Float32 parity of the Mask2Former head with HF transformers' PyTorch modules, weights converted
by `conversion/mask2former.py` from a tiny random `Mask2FormerForUniversalSegmentation`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import Mask2FormerConfig as HFMask2FormerConfig
from transformers import Mask2FormerForUniversalSegmentation, SwinConfig

from spectralmoe_jax.conversion.mask2former import load_head
from spectralmoe_jax.models.mask2former import Mask2FormerConfig, Mask2FormerHead
from tests.conftest import jaxpr_equations, relative_error

IMAGE = (64, 96)  # Swin levels 16x24, 8x12, 4x6, 2x3: non-square, 6 tokens at the coarsest
CHANNELS = (16, 32, 64, 128)
TOL = 1e-5


def build_hf_model(seed: int = 0, decoder_layers: int = 4) -> Mask2FormerForUniversalSegmentation:
    torch.manual_seed(seed)
    backbone = SwinConfig(
        image_size=IMAGE,
        embed_dim=CHANNELS[0],
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 2, 2],
        window_size=2,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = HFMask2FormerConfig(
        backbone_config=backbone,
        feature_size=64,
        mask_feature_size=64,
        hidden_dim=64,
        encoder_feedforward_dim=96,
        dim_feedforward=80,
        encoder_layers=2,
        decoder_layers=decoder_layers,  # HF counts the prediction before the first layer: 4 is 3
        num_attention_heads=4,
        num_queries=8,
        num_labels=5,
    )
    model = Mask2FormerForUniversalSegmentation(config).eval()
    with torch.no_grad():  # move off the zero / identity initialisations (offsets, norms)
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def our_config(**overrides) -> Mask2FormerConfig:
    tiny = dict(
        in_channels=CHANNELS,
        num_classes=5,
        hidden_dim=64,
        num_queries=8,
        encoder_layers=2,
        encoder_heads=4,
        encoder_ffn_dim=96,
        decoder_layers=3,
        decoder_heads=4,
        decoder_ffn_dim=80,
    )
    return Mask2FormerConfig(**{**tiny, **overrides})


def numpy_state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def nhwc(x: torch.Tensor) -> jnp.ndarray:
    return jnp.asarray(x.detach().permute(0, 2, 3, 1).numpy())


def hf_decoder_outputs(model, multi_scale, mask_features):
    """Per-layer class logits [L+1, B, Q, K+1] and mask logits [L+1, B, Q, h, w] of HF."""
    out = model.model.transformer_module(multi_scale, mask_features, output_hidden_states=True)
    classes = torch.stack(
        [model.class_predictor(h.transpose(0, 1)) for h in out.intermediate_hidden_states]
    )
    return classes.numpy(), torch.stack(out.masks_queries_logits).numpy()


@pytest.fixture(scope="module")
def reference():
    model = build_hf_model()
    pixels = torch.randn(2, 3, *IMAGE)
    with torch.no_grad():
        features = model.model.pixel_level_module.encoder(pixels).feature_maps
        pixel_out = model.model.pixel_level_module.decoder(features)
        classes, masks = hf_decoder_outputs(
            model, pixel_out.multi_scale_features, pixel_out.mask_features
        )
        full = model(pixels, output_auxiliary_logits=True)
    return {
        "model": model,
        "features": [nhwc(f) for f in features],
        "mask_features": pixel_out.mask_features,
        "multi_scale": pixel_out.multi_scale_features,
        "classes": classes,
        "masks": masks,
        "full_classes": full.class_queries_logits.numpy(),
        "full_masks": full.masks_queries_logits.numpy(),
        "full_aux_masks": np.stack(
            [a["masks_queries_logits"].numpy() for a in full.auxiliary_logits]
        ),
    }


def abstract_head(config: Mask2FormerConfig) -> Mask2FormerHead:
    """The head's structure without running its initialisers (every parameter gets loaded)."""
    return nnx.eval_shape(lambda: Mask2FormerHead(config, rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def head(reference):
    head = abstract_head(our_config())
    load_head(head, numpy_state_dict(reference["model"]))
    return head


@nnx.jit
def run_pixel_decoder(head, features):
    return head.pixel_decoder(features)


@nnx.jit
def run_transformer_decoder(head, multi_scale, mask_features, query_embedding):
    return head.transformer_decoder(multi_scale, mask_features, query_embedding)


def test_pixel_decoder_matches_hf(reference, head):
    mask_features, multi_scale = run_pixel_decoder(head, reference["features"])
    assert relative_error(mask_features, nhwc(reference["mask_features"])) <= TOL
    assert [m.shape[1:3] for m in multi_scale] == [(2, 3), (4, 6), (8, 12)]  # coarsest first
    for ours, theirs in zip(multi_scale, reference["multi_scale"]):
        assert relative_error(ours, nhwc(theirs)) <= TOL


def test_transformer_decoder_matches_hf_per_layer(reference, head):
    multi_scale = [nhwc(m) for m in reference["multi_scale"]]
    # The learned position passed explicitly shares one compilation with the next test.
    learned = head.transformer_decoder.query_pos[...]
    classes, masks = run_transformer_decoder(
        head, multi_scale, nhwc(reference["mask_features"]), learned
    )
    assert classes.shape == (4, 2, 8, 6) and masks.shape == (4, 2, 8, 16, 24)
    for layer in range(4):  # before the first layer and after each of the 3
        assert relative_error(classes[layer], reference["classes"][layer]) <= TOL, layer
        assert relative_error(masks[layer], reference["masks"][layer]) <= TOL, layer
    # The masked attention is exercised: queries attend to part of a level, not all or nothing.
    logits = torch.nn.functional.interpolate(
        torch.from_numpy(reference["masks"][0]), size=(2, 3), mode="bilinear", align_corners=False
    )
    assert 0.1 < (logits.sigmoid() < 0.5).float().mean() < 0.9


def test_head_end_to_end_matches_hf(reference, head):
    out = nnx.jit(lambda h, f: h(f))(head, reference["features"])
    assert out["class_logits"].shape == (4, 2, 8, 6)
    assert out["mask_logits"].shape == (4, 2, 8, IMAGE[0] // 4, IMAGE[1] // 4)
    assert relative_error(out["class_logits"][-1], reference["full_classes"]) <= TOL
    assert relative_error(out["mask_logits"][-1], reference["full_masks"]) <= TOL
    assert relative_error(out["mask_logits"][:-1], reference["full_aux_masks"]) <= TOL


def test_query_embedding_replaces_learned_position(reference, head):
    """The adapter's embedding acts exactly as HF with `queries_embedder` set to it; REIN's
    `replace_query_feat` as HF with `queries_features` set to Linear(embedding)."""
    model = reference["model"]
    rng = np.random.default_rng(1)
    embedding = rng.normal(size=(8, 64)).astype(np.float32)
    proj_w = (0.1 * rng.normal(size=(64, 64))).astype(np.float32)
    proj_b = (0.1 * rng.normal(size=(64,))).astype(np.float32)
    module = model.model.transformer_module
    saved = (module.queries_embedder.weight.clone(), module.queries_features.weight.clone())
    try:
        with torch.no_grad():
            module.queries_embedder.weight.copy_(torch.from_numpy(embedding))
            expected_pos = hf_decoder_outputs(
                model, reference["multi_scale"], reference["mask_features"]
            )
            module.queries_features.weight.copy_(torch.from_numpy(embedding @ proj_w.T + proj_b))
            expected_rein = hf_decoder_outputs(
                model, reference["multi_scale"], reference["mask_features"]
            )
    finally:
        with torch.no_grad():
            module.queries_embedder.weight.copy_(saved[0])
            module.queries_features.weight.copy_(saved[1])

    multi_scale = [nhwc(m) for m in reference["multi_scale"]]
    mask_features = nhwc(reference["mask_features"])
    classes, masks = run_transformer_decoder(
        head, multi_scale, mask_features, jnp.asarray(embedding)
    )
    assert relative_error(classes, expected_pos[0]) <= TOL
    assert relative_error(masks, expected_pos[1]) <= TOL

    rein = abstract_head(our_config(learn_query_position=False, replace_query_feat=True))
    params = nnx.to_pure_dict(nnx.state(head, nnx.Param))
    del params["transformer_decoder"]["query_pos"], params["transformer_decoder"]["query_feat"]
    params["transformer_decoder"]["query_feat_proj"] = {"kernel": proj_w.T, "bias": proj_b}
    nnx.update(rein, jax.tree.map(jnp.asarray, params))
    batched = jnp.broadcast_to(jnp.asarray(embedding), (2, 8, 64))  # [B, Q, D] is accepted too
    classes, masks = run_transformer_decoder(rein, multi_scale, mask_features, batched)
    assert relative_error(classes, expected_rein[0]) <= TOL
    assert relative_error(masks, expected_rein[1]) <= TOL
    with pytest.raises(ValueError, match="query_embedding"):
        nnx.eval_shape(lambda m: m.transformer_decoder(multi_scale, mask_features, None), rein)


def test_bad_features_are_named(head, reference):
    features = list(reference["features"])
    with pytest.raises(ValueError, match="channels"):
        head.pixel_decoder(features[1:])
    with pytest.raises(ValueError, match=r"query_embedding must be \(8, 64\)"):
        nnx.eval_shape(lambda m: m(features, query_embedding=jnp.zeros((7, 64))), head)


@pytest.mark.parametrize("layers", [6, 4])
def test_decoder_rounds_follow_checkpoint_order(layers):
    """Scanned rounds of three: checkpoint layer i runs in round i // 3 at level i % 3; with 4
    layers the last one runs after the scan."""
    model = build_hf_model(decoder_layers=layers + 1)  # HF counts one more than it builds
    with torch.no_grad():
        features = model.model.pixel_level_module.encoder(torch.randn(1, 3, *IMAGE)).feature_maps
        pixel_out = model.model.pixel_level_module.decoder(features)
        expected = hf_decoder_outputs(
            model, pixel_out.multi_scale_features, pixel_out.mask_features
        )
    head = abstract_head(our_config(decoder_layers=layers))
    load_head(head, numpy_state_dict(model))
    classes, masks = run_transformer_decoder(
        head,
        [nhwc(m) for m in pixel_out.multi_scale_features],
        nhwc(pixel_out.mask_features),
        head.transformer_decoder.query_pos[...],
    )
    assert classes.shape == (layers + 1, 1, 8, 6) and masks.shape == (layers + 1, 1, 8, 16, 24)
    for layer in range(layers + 1):
        assert relative_error(classes[layer], expected[0][layer]) <= TOL, layer
        assert relative_error(masks[layer], expected[1][layer]) <= TOL, layer


def test_layers_are_scanned():
    """The traced head holds one encoder layer and one decoder round, whatever the depth."""

    def trace(config):
        graphdef, state = nnx.split(abstract_head(config))
        features = [
            jax.ShapeDtypeStruct((1, IMAGE[0] // s, IMAGE[1] // s, ch), jnp.float32)
            for s, ch in zip((4, 8, 16, 32), CHANNELS)
        ]
        jaxpr = jax.make_jaxpr(lambda s, f: nnx.merge(graphdef, s)(f))(state, features).jaxpr
        equations = list(jaxpr_equations(jaxpr))
        scans = [e.params["length"] for e in equations if e.primitive.name == "scan"]
        return scans, len(equations)

    shallow = trace(our_config(encoder_layers=2, decoder_layers=3))
    deep = trace(our_config(encoder_layers=6, decoder_layers=9))
    assert shallow[0] == [2, 1] and deep[0] == [6, 3]  # encoder layers, decoder rounds
    assert shallow[1] == deep[1]
    # Layers past the last full round run after the scan.
    assert trace(our_config(encoder_layers=2, decoder_layers=4))[0] == [2, 1]
    with pytest.raises(ValueError, match="decoder_layers must be at least 1"):
        our_config(decoder_layers=0)
