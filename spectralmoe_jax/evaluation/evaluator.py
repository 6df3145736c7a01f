"""The evaluation loop: inference over examples, confusion matrices per domain, kept samples.

Model-agnostic: `infer_fn(images [1, H, W, C]) -> scores [1, H, W, K]` is any of
`inference.whole_inference` / `slide_inference` bound to a model's `predict_fn` and jitted.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from spectralmoe_jax.evaluation.metrics import OVERALL, ConfusionAccumulator, confusion_matrix


@dataclasses.dataclass
class Evaluation:
    confusion: ConfusionAccumulator
    samples: list[dict]  # {'image', 'label', 'pred', 'name', 'domain'} NumPy, for the report

    def results(self) -> dict[str, dict]:
        return self.confusion.results()


@functools.lru_cache(maxsize=8)
def _count_fn(num_classes: int, ignore_index: int):
    """jitted (scores [1, H, W, K], label [H, W], keep) -> (confusion [K, K], uint8 prediction
    or None); one per class set, so a second evaluation compiles nothing new."""

    @functools.partial(jax.jit, static_argnames="keep")
    def count(scores, label, keep):
        if scores.shape[-1] != num_classes:
            raise ValueError(f"infer_fn returned {scores.shape[-1]} class scores, "
                             f"num_classes is {num_classes}")
        pred = jnp.argmax(scores[0], axis=-1)
        conf = confusion_matrix(pred, label, num_classes=num_classes, ignore_index=ignore_index)
        return conf, (pred.astype(jnp.uint8) if keep else None)

    return count


def evaluate(infer_fn: Callable[[jax.Array], jax.Array], examples: Iterable[dict], *,
             num_classes: int, ignore_index: int = 255, mean: Sequence[float] | None = None,
             std: Sequence[float] | None = None, samples_per_domain: int = 0,
             progress: bool = False) -> Evaluation:
    """Runs `infer_fn` on every example and counts confusion matrices per example 'domain'.

    Examples are dicts {'image': [H, W, C], 'label': [H, W] int, 'name', 'domain'} (a data
    source's items); images are normalised here with (image - mean) / std when mean and std
    are given. Examples without 'domain' count under 'overall'. The argmax and the confusion
    matrix are computed on the device; only [K, K] counts come back per example. The first
    `samples_per_domain` examples of each domain are kept (input, label, prediction).
    """
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    shift = None if mean is None else np.asarray(mean, np.float32)
    scale = None if std is None else np.asarray(std, np.float32)
    confusion = ConfusionAccumulator(num_classes, ignore_index)
    samples, kept, pending = [], {}, []

    def flush():
        for conf, domain in jax.device_get(pending):
            confusion.add(conf, domain)
        pending.clear()

    count = _count_fn(num_classes, ignore_index)

    for example in tqdm(examples, disable=not progress, unit="image", desc="evaluate"):
        for key in ("image", "label"):
            if key not in example:
                raise KeyError(f"example {example.get('name', '?')!r} has no {key!r} key")
        image = np.asarray(example["image"], np.float32)
        label = np.asarray(example["label"])
        if image.ndim != 3 or label.shape != image.shape[:2]:
            raise ValueError(f"example {example.get('name', '?')!r}: image {image.shape} must be "
                             f"[H, W, C] and label {label.shape} [H, W]")
        domain = str(example.get("domain", OVERALL))
        keep = kept.get(domain, 0) < samples_per_domain
        normalised = image if shift is None else (image - shift) / scale
        conf, pred = count(infer_fn(normalised[None]), label, keep)
        pending.append((conf, domain))
        if len(pending) >= 16:  # fetch in groups: the device runs ahead of the host
            flush()
        if keep:
            kept[domain] = kept.get(domain, 0) + 1
            samples.append({"image": image, "label": label, "pred": np.asarray(pred),
                            "name": str(example.get("name", "")), "domain": domain})
    flush()
    if not confusion.matrices:
        raise ValueError("no examples to evaluate")
    return Evaluation(confusion, samples)
