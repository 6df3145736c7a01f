"""Semantic segmentation metrics from a confusion matrix, with mmseg's conventions.

The confusion matrix `conf[k, j]` counts pixels of ground-truth class k predicted as class j
(rows: ground truth, columns: prediction). From it, per class k:

  IoU_k = conf[k, k] / (sum_j conf[k, j] + sum_j conf[j, k] - conf[k, k])
  Acc_k = conf[k, k] / sum_j conf[k, j]          (recall of class k)
  aAcc  = trace(conf) / sum(conf)                  (overall pixel accuracy)

as mmseg's `IoUMetric` (`intersect_and_union`, `total_area_to_metrics`). See `CONVENTIONS` for
which pixels and classes count; all reported values are percentages, as in mmseg and the paper.
"""

from __future__ import annotations

import collections
import csv
import math
import os
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

OVERALL = "overall"

CONVENTIONS = (
    "Pixels whose ground truth is the ignore index (255) are excluded everywhere: they count "
    "neither as ground truth nor as prediction. Ground-truth values outside 0..K-1 other than "
    "the ignore index are an error on the host path and are treated as ignored inside jitted "
    "code. A class absent from both the ground truth and the prediction of the evaluated set has "
    "an undefined IoU (0/0, shown as nan) and is left out of mIoU; a class predicted but absent "
    "from the ground truth has IoU 0 and counts. Accuracy (recall) of a class absent from the "
    "ground truth is undefined and left out of mAcc. mIoU and mAcc are unweighted means over the "
    "remaining classes (mmseg's nanmean); aAcc is the fraction of all counted pixels predicted "
    "correctly. A domain's metrics come from that domain's summed confusion matrix; 'overall' "
    "sums the matrices of all evaluated domains (pixel-weighted, not the mean of domain mIoUs). "
    "Values are percentages."
)


def confusion_matrix(pred: jax.Array, label: jax.Array, *, num_classes: int,
                     ignore_index: int = 255) -> jax.Array:
    """int32 [K, K] counts (rows: label, columns: prediction); jittable, any matching shapes.

    Pixels with the ignore index, a label outside [0, K) or a prediction outside [0, K) are not
    counted. int32 holds up to 2**31 pixels per call: accumulate totals on the host in int64.
    """
    if pred.shape != label.shape:
        raise ValueError(f"prediction shape {pred.shape} != label shape {label.shape}")
    pred = jnp.asarray(pred, jnp.int32).reshape(-1)
    label = jnp.asarray(label, jnp.int32).reshape(-1)
    valid = ((label != ignore_index) & (label >= 0) & (label < num_classes)
             & (pred >= 0) & (pred < num_classes))
    # Out-of-range segment ids are dropped by segment_sum: invalid pixels go to id K*K.
    index = jnp.where(valid, label * num_classes + pred, num_classes * num_classes)
    counts = jax.ops.segment_sum(jnp.ones_like(index), index,
                                 num_segments=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def confusion_update(conf: jax.Array, pred: jax.Array, label: jax.Array, *,
                     ignore_index: int = 255) -> jax.Array:
    """`conf + confusion_matrix(pred, label)`, with K taken from `conf` [K, K]; jittable."""
    num_classes = conf.shape[0]
    if conf.shape != (num_classes, num_classes):
        raise ValueError(f"confusion matrix must be square [K, K], got {conf.shape}")
    update = confusion_matrix(pred, label, num_classes=num_classes, ignore_index=ignore_index)
    return conf + update.astype(conf.dtype)


class ConfusionAccumulator:
    """Host-side int64 confusion matrices per domain; `overall()` is their sum."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} is a class index (K={num_classes})")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrices: dict[str, np.ndarray] = collections.OrderedDict()

    def add(self, conf, domain: str = OVERALL) -> None:
        """Adds a [K, K] matrix (e.g. from the jitted `confusion_matrix`) to `domain`."""
        conf = np.asarray(jax.device_get(conf), dtype=np.int64)
        k = self.num_classes
        if conf.shape != (k, k):
            raise ValueError(f"confusion matrix for domain {domain!r} has shape {conf.shape}, "
                             f"expected ({k}, {k})")
        if domain not in self.matrices:
            self.matrices[domain] = np.zeros((k, k), np.int64)
        self.matrices[domain] += conf

    def update(self, pred, label, domain: str = OVERALL) -> None:
        """Counts a prediction / label pair (NumPy, any matching shapes) into `domain`."""
        pred = np.asarray(pred).reshape(-1).astype(np.int64)
        label = np.asarray(label).reshape(-1).astype(np.int64)
        if pred.shape != label.shape:
            raise ValueError(f"prediction has {pred.size} pixels, label {label.size}")
        k = self.num_classes
        keep = label != self.ignore_index
        pred, label = pred[keep], label[keep]
        for name, values in (("label", label), ("prediction", pred)):
            bad = (values < 0) | (values >= k)
            if bad.any():
                raise ValueError(f"{name} values {np.unique(values[bad])[:10].tolist()} are "
                                 f"outside 0..{k - 1} and not the ignore index "
                                 f"{self.ignore_index} (domain {domain!r})")
        self.add(np.bincount(label * k + pred, minlength=k * k).reshape(k, k), domain)

    def overall(self) -> np.ndarray:
        total = np.zeros((self.num_classes, self.num_classes), np.int64)
        for conf in self.matrices.values():
            total += conf
        return total

    def results(self) -> dict[str, dict]:
        """{domain: segmentation_metrics(...)} for each domain, then OVERALL."""
        out = {d: segmentation_metrics(c) for d, c in self.matrices.items() if d != OVERALL}
        out[OVERALL] = segmentation_metrics(self.overall())
        return out


def segmentation_metrics(conf) -> dict:
    """Per-class IoU / Acc (NaN where undefined) and mIoU, mAcc, aAcc, in percent."""
    conf = np.asarray(conf, dtype=np.float64)
    intersect = np.diag(conf)
    area_label = conf.sum(axis=1)
    area_pred = conf.sum(axis=0)
    union = area_label + area_pred - intersect
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, intersect / union, np.nan)
        acc = np.where(area_label > 0, intersect / area_label, np.nan)
    total = conf.sum()
    return {
        "IoU": 100.0 * iou,
        "Acc": 100.0 * acc,
        "mIoU": 100.0 * _nanmean(iou),
        "mAcc": 100.0 * _nanmean(acc),
        "aAcc": 100.0 * intersect.sum() / total if total > 0 else math.nan,
        "pixels": area_label.astype(np.int64),
    }


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else math.nan


def class_names_or_default(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    if class_names is None:
        return [f"class_{k}" for k in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
    return list(class_names)


def format_table(results: Mapping[str, dict], class_names: Sequence[str] | None = None) -> str:
    """Text table: one row per class with IoU / Acc per domain, then mIoU, mAcc, aAcc rows."""
    domains = list(results)
    num_classes = len(next(iter(results.values()))["IoU"])
    names = class_names_or_default(class_names, num_classes)
    header = ["class"] + [f"{d} {m}" for d in domains for m in ("IoU", "Acc")]
    rows = [[name] + [_fmt(results[d][m][k]) for d in domains for m in ("IoU", "Acc")]
            for k, name in enumerate(names)]
    for summary in ("mIoU", "mAcc", "aAcc"):
        rows.append([summary] + [cell for d in domains for cell in (_fmt(results[d][summary]), "")])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths))) for row in [header] + rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(names) + 2, "-" * len(lines[0]))
    return "\n".join(lines)


def _fmt(value) -> str:
    return "nan" if value is None or math.isnan(value) else f"{value:.2f}"


def metrics_record(results: Mapping[str, dict],
                   class_names: Sequence[str] | None = None) -> dict[str, float | None]:
    """Flat dict for metrics.jsonl: overall values unprefixed ('mIoU', 'IoU/building'), per
    domain prefixed ('D004_2021/mIoU'). Undefined values are None (JSON null)."""
    record = {}
    for domain, res in results.items():
        prefix = "" if domain == OVERALL else f"{domain}/"
        names = class_names_or_default(class_names, len(res["IoU"]))
        for key in ("mIoU", "mAcc", "aAcc"):
            record[prefix + key] = _json_float(res[key])
        for name, iou, acc in zip(names, res["IoU"], res["Acc"]):
            record[f"{prefix}IoU/{name}"] = _json_float(iou)
            record[f"{prefix}Acc/{name}"] = _json_float(acc)
    return record


def _json_float(value) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def save_confusion(conf, path_stem: str,
                   class_names: Sequence[str] | None = None) -> tuple[str, str]:
    """Writes `<path_stem>.npy` (int64 [K, K]) and `<path_stem>.csv` (labelled rows: ground
    truth, columns: prediction). Returns both paths."""
    conf = np.asarray(conf, dtype=np.int64)
    names = class_names_or_default(class_names, conf.shape[0])
    os.makedirs(os.path.dirname(os.path.abspath(path_stem)), exist_ok=True)
    np.save(path_stem + ".npy", conf)
    with open(path_stem + ".csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ground_truth \\ prediction"] + names)
        for name, row in zip(names, conf):
            writer.writerow([name] + row.tolist())
    return path_stem + ".npy", path_stem + ".csv"
