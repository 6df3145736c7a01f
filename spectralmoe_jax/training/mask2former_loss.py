"""Mask2Former training loss with static shapes: matching, class CE, point-sampled BCE + dice.

Follows the released training (mmseg `Mask2FormerHead` -> mmdet `Mask2FormerHead.loss_by_feat`;
the same numbers as HF `Mask2FormerLoss`), for every decoder layer's prediction (deep
supervision) and every image, vmapped:
  1. match queries to the image's targets on `num_points` uniform points (`matcher.py`);
  2. class cross-entropy over all queries, unmatched ones labelled no-object (class K), class
     weights 1 and `no_object_weight`, averaged by the sum of the weights over the batch;
  3. for each matched pair, `num_points` points chosen by uncertainty (PointRend): the
     `importance_sample_ratio` most uncertain (smallest |logit|) of `oversample_ratio * num_points`
     uniform points, plus uniform ones; sigmoid BCE (mean over points) and dice (eps 1) there,
     summed over pairs and divided by the number of target masks in the batch (at least 1).
The batch here is the global batch. mmdet divides each GPU's sums by the mean over GPUs of the
mask count and DDP averages the gradients, i.e. divides by the global count, as here; its class
CE is a weighted mean per GPU, averaged over GPUs, where here it is one weighted mean over the
global batch (equal when the GPUs' no-object shares are equal).
Targets are one per class (`semantic_to_targets`), padded to all K classes with a `valid` flag,
so every shape is static and the step stays one XLA program.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

from spectralmoe_jax.training.matcher import hungarian_matching, matcher_costs
from spectralmoe_jax.training.point_sampling import point_sample


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Weights and point sampling of the released config (SPEC 1.3); the matcher uses the same
    weights."""
    class_weight: float = 2.0  # weight of the class cross-entropy
    mask_weight: float = 5.0  # weight of the mask sigmoid cross-entropy
    dice_weight: float = 5.0  # weight of the mask dice loss
    no_object_weight: float = 0.1  # class weight of "no object" in the cross-entropy
    num_points: int = 12544  # points sampled per mask for the mask losses
    oversample_ratio: float = 3.0  # candidate points per sampled point
    importance_sample_ratio: float = 0.75  # share of points taken where the mask is uncertain

    @property
    def num_oversampled(self) -> int:
        return int(self.num_points * self.oversample_ratio)

    @property
    def num_importance(self) -> int:
        return int(self.importance_sample_ratio * self.num_points)


def semantic_to_targets(label: jax.Array, num_classes: int, ignore_index: int = 255) -> dict:
    """Semantic label map `[B, H, W]` -> one target per class, static-shaped.

    Returns `labels [B, K] int32` (= arange K), `masks [B, K, H, W] bool` (pixels of the class)
    and `valid [B, K] bool` (the class occurs in the image). As in mmseg's
    `_seg_data_to_instance_data`, ignore pixels belong to no mask: they are negatives of every
    target in the point-sampled mask losses. Values outside [0, K) are treated like ignore.
    """
    if label.ndim != 3:
        raise ValueError(f"semantic_to_targets: label must be [B, H, W], got {label.shape}")
    if 0 <= ignore_index < num_classes:
        raise ValueError(f"semantic_to_targets: ignore_index {ignore_index} is a class id "
                         f"(num_classes {num_classes})")
    classes = jnp.arange(num_classes, dtype=jnp.int32)
    masks = label[:, None, :, :] == classes[None, :, None, None]
    return {
        "labels": jnp.broadcast_to(classes, (label.shape[0], num_classes)),
        "masks": masks,
        "valid": masks.any(axis=(2, 3)),
    }


def sample_point_draws(rng: jax.Array, num_layers: int, batch_size: int, num_targets: int,
                       config: LossConfig) -> dict:
    """All uniform point draws of one loss evaluation, (x, y) in [0, 1).

    `matcher_coords [L, B, P, 2]` (shared by an image's queries and targets), and per target
    slot `oversampled_coords [L, B, T, P * oversample, 2]` and `random_coords
    [L, B, T, P - P_importance, 2]` (the pair matched to that target uses them).
    """
    k_match, k_over, k_rand = jax.random.split(rng, 3)
    lbt = (num_layers, batch_size, num_targets)
    return {
        "matcher_coords": _uniform(k_match, (num_layers, batch_size, config.num_points, 2)),
        "oversampled_coords": _uniform(k_over, (*lbt, config.num_oversampled, 2)),
        "random_coords": _uniform(k_rand, (*lbt, config.num_points - config.num_importance, 2)),
    }


def _uniform(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    # Drawn flat: XLA's compile time of the partitionable threefry grows steeply with the rank.
    return jax.random.uniform(key, (math.prod(shape),)).reshape(shape)


def match_queries(class_logits: jax.Array, mask_logits: jax.Array, targets: dict,
                  point_coords: jax.Array, config: LossConfig) -> jax.Array:
    """Query index `[T] int32` matched to each target of one image (no gradient)."""
    class_logits, mask_logits = lax.stop_gradient((class_logits, mask_logits))
    cost = matcher_costs(class_logits, mask_logits, targets, point_coords,
                         class_weight=config.class_weight, mask_weight=config.mask_weight,
                         dice_weight=config.dice_weight)
    return hungarian_matching(cost, targets["valid"])[0]


def _importance_coords(logits: jax.Array, oversampled: jax.Array, uniform: jax.Array,
                       num_importance: int) -> jax.Array:
    """PointRend's `get_uncertain_point_coords_with_randomness` for one mask -> `[P, 2]`."""
    uncertainty = -jnp.abs(point_sample(logits, oversampled))
    _, index = lax.top_k(uncertainty, num_importance)
    return jnp.concatenate([oversampled[index], uniform], axis=0)


def _image_terms(class_logits: jax.Array, mask_logits: jax.Array, targets: dict, draws: dict,
                 config: LossConfig) -> dict:
    """One decoder layer on one image -> un-normalised sums of the loss terms."""
    valid = targets["valid"]
    num_queries, num_classes = class_logits.shape[0], class_logits.shape[1] - 1
    query_index = match_queries(class_logits, mask_logits, targets, draws["matcher_coords"],
                                config)

    # Class CE: matched queries take their target's class, the rest no-object (class K).
    target_class = jnp.full(num_queries, num_classes, jnp.int32).at[
        jnp.where(valid, query_index, num_queries)].set(targets["labels"], mode="drop")
    log_probs = jax.nn.log_softmax(class_logits.astype(jnp.float32), axis=-1)
    ce = -jnp.take_along_axis(log_probs, target_class[:, None], axis=-1)[:, 0]
    weight = jnp.where(target_class == num_classes, config.no_object_weight, 1.0)

    # Mask BCE and dice on uncertainty-sampled points of each matched pair.
    pred = mask_logits[query_index].astype(jnp.float32)  # [T, h, w]
    coords = jax.vmap(_importance_coords, in_axes=(0, 0, 0, None))(
        lax.stop_gradient(pred), draws["oversampled_coords"], draws["random_coords"],
        config.num_importance)
    point_logits = jax.vmap(point_sample)(pred, coords)  # [T, P]
    point_labels = jax.vmap(point_sample)(targets["masks"], coords)
    # BCE with logits: softplus(x) - t x, what BCEWithLogitsLoss computes.
    bce = jnp.mean(jax.nn.softplus(point_logits) - point_labels * point_logits, axis=-1)
    probs = jax.nn.sigmoid(point_logits)
    dice = 1.0 - (2.0 * jnp.sum(probs * point_labels, -1) + 1.0) / (
        jnp.sum(probs, -1) + jnp.sum(point_labels, -1) + 1.0)
    return {
        "ce": jnp.sum(weight * ce),
        "ce_weight": jnp.sum(weight),
        "mask": jnp.sum(jnp.where(valid, bce, 0.0)),
        "dice": jnp.sum(jnp.where(valid, dice, 0.0)),
    }


def mask2former_loss(outputs: dict, targets: dict, rng: jax.Array | None,
                     config: LossConfig = LossConfig(), *,
                     draws: dict | None = None) -> tuple[jax.Array, dict]:
    """Deep-supervised Mask2Former loss.

    Args:
      outputs: `class_logits [L + 1, B, Q, K + 1]`, `mask_logits [L + 1, B, Q, h, w]`.
      targets: `labels [B, T]`, `masks [B, T, H, W]`, `valid [B, T]` (`semantic_to_targets`).
      rng: key for the point draws; unused when `draws` is given.
      config: weights and point sampling.
      draws: the uniform draws of `sample_point_draws`, to reproduce a reference exactly.

    Returns:
      `loss`: sum over layers of class_weight * CE + mask_weight * BCE + dice_weight * dice.
      `metrics`: unweighted `loss_cross_entropy`, `loss_mask`, `loss_dice` per layer `[L + 1]`
      (HF's names) and `num_masks`, the normaliser of the mask terms.
    """
    class_logits, mask_logits = outputs["class_logits"], outputs["mask_logits"]
    if (class_logits.ndim != 4 or mask_logits.ndim != 5
            or class_logits.shape[:3] != mask_logits.shape[:3]):
        raise ValueError("mask2former_loss: expected class_logits [L+1, B, Q, K+1] and mask_logits "
                         f"[L+1, B, Q, h, w], got {class_logits.shape} and {mask_logits.shape}")
    num_layers, batch_size, num_queries = class_logits.shape[:3]
    masks = targets["masks"]
    num_targets = masks.shape[1]
    if (masks.ndim != 4 or masks.shape[0] != batch_size
            or targets["labels"].shape != (batch_size, num_targets)
            or targets["valid"].shape != (batch_size, num_targets)):
        raise ValueError("mask2former_loss: expected targets labels/valid [B, T] and masks "
                         f"[B, T, H, W] with B={batch_size}, got "
                         f"{ {k: v.shape for k, v in targets.items()} }")
    if num_targets > num_queries:
        raise ValueError(f"mask2former_loss: {num_targets} targets > {num_queries} queries")
    if draws is None:
        if rng is None:
            raise ValueError("mask2former_loss: pass rng (or the draws themselves)")
        draws = sample_point_draws(rng, num_layers, batch_size, num_targets, config)

    per_image = jax.vmap(lambda c, m, t, d: _image_terms(c, m, t, d, config))
    terms = jax.vmap(per_image, in_axes=(0, 0, None, 0))(class_logits, mask_logits, targets,
                                                         draws)  # each [L + 1, B]
    num_masks = jnp.maximum(jnp.sum(targets["valid"]).astype(jnp.float32), 1.0)
    metrics = {
        "loss_cross_entropy": terms["ce"].sum(1) / terms["ce_weight"].sum(1),
        "loss_mask": terms["mask"].sum(1) / num_masks,
        "loss_dice": terms["dice"].sum(1) / num_masks,
        "num_masks": num_masks,
    }
    loss = jnp.sum(config.class_weight * metrics["loss_cross_entropy"]
                   + config.mask_weight * metrics["loss_mask"]
                   + config.dice_weight * metrics["loss_dice"])
    return loss, metrics
