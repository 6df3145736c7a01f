"""Mask2Former loss vs HF `Mask2FormerLoss` (same random draws), targets, deep supervision."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Mask2FormerConfig
from transformers.models.mask2former import modeling_mask2former as hf

from spectralmoe_jax.training.mask2former_loss import (
    LossConfig,
    mask2former_loss,
    sample_point_draws,
    semantic_to_targets,
)
from tests.conftest import relative_error

NUM_CLASSES = 5
PRESENT = [[0, 2, 4], [1, 3], []]  # the last image is all ignore: no targets


def _problem(np_rng, num_layers=3, num_queries=8):
    """Label maps [3, 64, 96] with ignore pixels and random decoder outputs at 16 x 24."""
    labels = []
    for classes in PRESENT:
        label = np.full((64, 96), 255, np.int32)
        if classes:
            label = np.asarray(classes, np.int32)[np_rng.integers(0, len(classes), size=(64, 96))]
            label[:, :10] = 255
        labels.append(label)
    label = np.stack(labels)
    batch = len(PRESENT)
    outputs = {
        "class_logits": (
            2 * np_rng.normal(size=(num_layers, batch, num_queries, NUM_CLASSES + 1))
        ).astype(np.float32),
        "mask_logits": (3 * np_rng.normal(size=(num_layers, batch, num_queries, 16, 24))).astype(
            np.float32
        ),
    }
    return label, outputs


def test_semantic_to_targets():
    label = np.array(
        [
            [[0, 0, 2, 255], [0, 2, 2, 255], [7, 2, 255, 255]],
            [[255, 255, 255, 255], [255, 255, 255, 255], [255, 255, 255, 1]],
        ],
        np.int32,
    )
    targets = jax.jit(semantic_to_targets, static_argnums=1)(jnp.asarray(label), 4)
    np.testing.assert_array_equal(targets["labels"], np.tile(np.arange(4), (2, 1)))
    np.testing.assert_array_equal(
        targets["valid"], [[True, False, True, False], [False, True, False, False]]
    )
    masks = np.asarray(targets["masks"])
    assert masks.shape == (2, 4, 3, 4) and masks.dtype == bool
    for b in range(2):
        for k in range(4):
            np.testing.assert_array_equal(masks[b, k], label[b] == k)
    # Ignore pixels (and the out-of-range 7) belong to no target.
    for b in range(2):
        assert not masks[b][:, label[b] == 255].any()
    assert not masks[0, :, 2, 0].any()
    with pytest.raises(ValueError, match="label must be"):
        semantic_to_targets(jnp.zeros((3, 4), jnp.int32), 4)


@functools.partial(jax.jit, static_argnums=3)
def _loss_and_grad(outputs, targets, draws, config):
    loss_fn = lambda o: mask2former_loss(o, targets, None, config, draws=draws)
    return jax.value_and_grad(loss_fn, has_aux=True)(outputs)


def _hf_order(matchings, present):
    """Our target slot (= class id) of each row HF's loss_masks sees: images in order, matched
    pairs sorted by query (the order `linear_sum_assignment` returns)."""
    return [
        (b, present[b][j]) for b, (_, targets) in enumerate(matchings) for j in targets.tolist()
    ]


def _replay(queue):
    """A stand-in for `torch.rand` returning the queued draws, checking their shapes."""

    def rand(*size, **kwargs):
        draw = queue.pop(0)
        assert tuple(draw.shape) == size, (tuple(draw.shape), size)
        return draw

    return rand


def test_loss_parity_with_hf(np_rng, monkeypatch):
    config = LossConfig()
    label, outputs = _problem(np_rng)
    num_layers, batch = outputs["class_logits"].shape[:2]
    targets = semantic_to_targets(jnp.asarray(label), NUM_CLASSES)
    draws = jax.tree.map(
        np.asarray, sample_point_draws(jax.random.key(0), num_layers, batch, NUM_CLASSES, config)
    )

    (loss, metrics), grads = _loss_and_grad(outputs, targets, draws, config)

    # HF: the final layer is the main prediction, layers 0..L-1 the auxiliary ones, in this order.
    mask_labels = [
        torch.from_numpy(label[b] == np.asarray(c, np.int32)[:, None, None]).float()
        for b, c in enumerate(PRESENT)
    ]
    class_labels = [torch.tensor(c, dtype=torch.int64) for c in PRESENT]
    queue = []
    monkeypatch.setattr(torch, "rand", _replay(queue))
    hf_config = Mask2FormerConfig(num_labels=NUM_CLASSES, train_num_points=config.num_points)
    criterion = hf.Mask2FormerLoss(hf_config, weight_dict={})
    layer_order = [num_layers - 1] + list(range(num_layers - 1))
    matchings = {}
    for layer in layer_order:
        queue.extend(torch.tensor(draws["matcher_coords"][layer, b])[None] for b in range(batch))
        matchings[layer] = criterion.matcher(
            torch.from_numpy(outputs["mask_logits"][layer]),
            torch.from_numpy(outputs["class_logits"][layer]),
            mask_labels,
            class_labels,
        )
    for layer in layer_order:
        queue.extend(torch.tensor(draws["matcher_coords"][layer, b])[None] for b in range(batch))
        rows = _hf_order(matchings[layer], PRESENT)
        for key in ("oversampled_coords", "random_coords"):
            queue.append(torch.from_numpy(np.stack([draws[key][layer, b, t] for b, t in rows])))
    logits = {k: torch.from_numpy(v).requires_grad_() for k, v in outputs.items()}
    auxiliary = [
        {
            "masks_queries_logits": logits["mask_logits"][i],
            "class_queries_logits": logits["class_logits"][i],
        }
        for i in range(num_layers - 1)
    ]
    losses = criterion(
        logits["mask_logits"][-1],
        logits["class_logits"][-1],
        mask_labels,
        class_labels,
        auxiliary_predictions=auxiliary,
    )
    assert not queue, "HF drew a different number of random tensors"
    weights = {
        "loss_cross_entropy": config.class_weight,
        "loss_mask": config.mask_weight,
        "loss_dice": config.dice_weight,
    }
    hf_total = sum(
        weights[k.rsplit("_", 1)[0] if k[-1].isdigit() else k] * v for k, v in losses.items()
    )
    hf_total.backward()

    for name in weights:
        reference = [losses[f"{name}_{i}"].item() for i in range(num_layers - 1)]
        reference.append(losses[name].item())
        err = relative_error(metrics[name], reference)
        print(f"{name}: relative error {err:.2e}")
        assert err < 1e-5, name
    assert float(metrics["num_masks"]) == 5.0
    assert relative_error(loss, hf_total.item()) < 1e-5
    for key, value in logits.items():
        err = relative_error(grads[key], value.grad.numpy())
        print(f"d loss / d {key}: relative error {err:.2e}")
        assert err < 1e-5, key


def test_deep_supervision_sums_layers(np_rng):
    config = LossConfig()
    label, outputs = _problem(np_rng)
    num_layers, batch = outputs["class_logits"].shape[:2]
    targets = semantic_to_targets(jnp.asarray(label), NUM_CLASSES)
    draws = sample_point_draws(jax.random.key(1), num_layers, batch, NUM_CLASSES, config)
    (loss, metrics), grads = _loss_and_grad(outputs, targets, draws, config)
    layer = lambda tree, i: jax.tree.map(lambda x: x[i:i + 1], tree)
    per_layer = [_loss_and_grad(layer(outputs, i), targets, layer(draws, i), config)
                 for i in range(num_layers)]

    np.testing.assert_allclose(loss, sum(float(l) for (l, _), _ in per_layer), rtol=1e-6)
    for name in ("loss_cross_entropy", "loss_mask", "loss_dice"):
        np.testing.assert_allclose(metrics[name], [float(m[name][0]) for (_, m), _ in per_layer],
                                   rtol=1e-6)
    for key in outputs:
        assert relative_error(grads[key], np.concatenate([g[key] for _, g in per_layer])) < 1e-5
    # The layers differ, so the sum is not one layer counted several times.
    assert len({round(float(l), 6) for (l, _), _ in per_layer}) == num_layers
    with pytest.raises(ValueError, match="pass rng"):
        mask2former_loss(outputs, targets, None, config)
