"""Confusion matrices and mIoU / mAcc / aAcc against a hand-worked example and against
mmseg's `intersect_and_union` written out in PyTorch."""

import csv
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from spectralmoe_jax.evaluation import evaluator, metrics
from tests.conftest import relative_error


def mmseg_metrics(pred, label, num_classes, ignore_index=255):
    """mmseg 1.x IoUMetric: intersect_and_union + total_area_to_metrics + nanmean, in percent."""
    pred, label = torch.as_tensor(pred).flatten(), torch.as_tensor(label).flatten()
    mask = label != ignore_index
    pred, label = pred[mask].float(), label[mask].float()
    intersect = pred[pred == label]
    hist = functools.partial(torch.histc, bins=num_classes, min=0, max=num_classes - 1)
    area_intersect, area_pred, area_label = hist(intersect), hist(pred), hist(label)
    union = area_pred + area_label - area_intersect
    iou = (area_intersect / union).numpy()
    acc = (area_intersect / area_label).numpy()
    return {"IoU": 100 * iou, "Acc": 100 * acc, "mIoU": 100 * np.nanmean(iou),
            "mAcc": 100 * np.nanmean(acc),
            "aAcc": 100 * float(area_intersect.sum() / area_label.sum())}


def test_hand_computed_example():
    label = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [2, 2, 0]])
    # Pairs (ground truth, prediction): (0,0) (0,1) (1,1) (1,2) (2,2); (255,0) is ignored.
    expected = np.array([[1, 1, 0],
                         [0, 1, 1],
                         [0, 0, 1]])
    conf = jax.jit(functools.partial(metrics.confusion_matrix, num_classes=3))(pred, label)
    np.testing.assert_array_equal(conf, expected)
    assert conf.dtype == jnp.int32
    acc = metrics.ConfusionAccumulator(3)
    acc.update(pred, label)
    np.testing.assert_array_equal(acc.overall(), expected)

    res = metrics.segmentation_metrics(expected)
    # IoU_k = TP / (GT_k + P_k - TP): 1/(2+1-1), 1/(2+2-1), 1/(1+2-1); Acc_k = TP / GT_k.
    np.testing.assert_allclose(res["IoU"], [50, 100 / 3, 50])
    np.testing.assert_allclose(res["Acc"], [50, 50, 100])
    assert res["mIoU"] == pytest.approx(100 * (1 / 2 + 1 / 3 + 1 / 2) / 3)
    assert res["mAcc"] == pytest.approx(100 * 2 / 3)
    assert res["aAcc"] == pytest.approx(100 * 3 / 5)


def test_absent_classes_and_false_positives():
    # Class 3 never appears: undefined IoU and Acc, excluded. Class 2 is predicted but absent
    # from the ground truth: IoU 0 counts in mIoU, its Acc is undefined and left out of mAcc.
    label = np.array([0, 0, 1, 1, 1, 255])
    pred = np.array([0, 2, 1, 1, 0, 3])
    res = metrics.segmentation_metrics(
        np.asarray(metrics.confusion_matrix(pred, label, num_classes=4)))
    assert math.isnan(res["IoU"][3]) and math.isnan(res["Acc"][3]) and math.isnan(res["Acc"][2])
    assert res["IoU"][2] == 0
    np.testing.assert_allclose(res["IoU"][:2], [100 / 3, 200 / 3])
    assert res["mIoU"] == pytest.approx((100 / 3 + 200 / 3 + 0) / 3)
    assert res["mAcc"] == pytest.approx((50 + 200 / 3) / 2)
    reference = mmseg_metrics(pred, label, 4)
    for key in ("mIoU", "mAcc", "aAcc"):
        assert res[key] == pytest.approx(reference[key])
    np.testing.assert_allclose(res["IoU"], reference["IoU"], equal_nan=True)


def test_matches_mmseg_on_random_maps(np_rng):
    k = 7
    label = np_rng.integers(0, k, (3, 40, 50))
    pred = np.where(np_rng.random(label.shape) < 0.6, label, np_rng.integers(0, k, label.shape))
    label[np_rng.random(label.shape) < 0.1] = 255
    label[label == 5] = 1  # class 5 absent from the ground truth, still predicted
    pred[pred == 6] = 0
    label[label == 6] = 0  # class 6 absent from both
    conf = jnp.zeros((k, k), jnp.int32)
    update = jax.jit(metrics.confusion_update)
    for i in range(3):  # accumulated image by image on the device
        conf = update(conf, pred[i], label[i])
    res = metrics.segmentation_metrics(np.asarray(conf))
    reference = mmseg_metrics(pred, label, k)
    for key in ("IoU", "Acc"):
        np.testing.assert_allclose(res[key], reference[key], rtol=1e-5, equal_nan=True)
    for key in ("mIoU", "mAcc", "aAcc"):
        assert relative_error(res[key], reference[key]) < 1e-6


def test_ignore_and_invalid_labels():
    label = np.array([0, 1, 255, 7, -1])
    pred = np.array([0, 0, 1, 1, 1])
    # Inside jit, labels outside 0..K-1 count as ignored, like the ignore index.
    np.testing.assert_array_equal(metrics.confusion_matrix(pred, label, num_classes=2),
                                  [[1, 0], [1, 0]])
    acc = metrics.ConfusionAccumulator(2)
    with pytest.raises(ValueError, match=r"label values \[-1, 7\]"):
        acc.update(pred, label)
    with pytest.raises(ValueError, match="prediction values"):
        acc.update(np.array([0, 2]), np.array([0, 1]))
    with pytest.raises(ValueError, match="is a class index"):
        metrics.ConfusionAccumulator(3, ignore_index=1)


def test_domains_table_record_and_files(tmp_path, np_rng):
    acc = metrics.ConfusionAccumulator(3)
    per_domain = {}
    for domain in ("D004_2021", "D006_2020"):
        label = np_rng.integers(0, 3, (20, 20))
        pred = np_rng.integers(0, 3, (20, 20))
        acc.update(pred, label, domain)
        per_domain[domain] = (pred, label)
    results = acc.results()
    assert list(results) == ["D004_2021", "D006_2020", "overall"]
    all_pred = np.concatenate([p for p, _ in per_domain.values()])
    all_label = np.concatenate([lab for _, lab in per_domain.values()])
    assert results["overall"]["mIoU"] == pytest.approx(
        mmseg_metrics(all_pred, all_label, 3)["mIoU"])
    for domain, (pred, label) in per_domain.items():
        assert results[domain]["mIoU"] == pytest.approx(mmseg_metrics(pred, label, 3)["mIoU"])

    names = ["road", "tree", "water"]
    table = metrics.format_table(results, names)
    assert f"{results['D006_2020']['IoU'][1]:.2f}" in table and "mIoU" in table
    record = metrics.metrics_record(results, names)
    assert record["mIoU"] == pytest.approx(results["overall"]["mIoU"])
    assert record["D004_2021/IoU/water"] == pytest.approx(results["D004_2021"]["IoU"][2])
    json.dumps(record)

    npy, csv_path = metrics.save_confusion(acc.overall(), str(tmp_path / "conf"), names)
    np.testing.assert_array_equal(np.load(npy), acc.overall())
    with open(csv_path) as f:
        rows = list(csv.reader(f))
    assert rows[0][1:] == names and rows[2][0] == "tree"
    np.testing.assert_array_equal(np.array([r[1:] for r in rows[1:]], int), acc.overall())


def test_evaluate_per_domain(np_rng):
    k, c = 4, 3
    w = np_rng.normal(size=(c, k)).astype(np.float32)
    mean, std = np.array([10.0, 20.0, 30.0]), np.array([2.0, 4.0, 5.0])
    infer = jax.jit(lambda x: jnp.einsum("bhwc,ck->bhwk", x, w))
    examples = []
    for i in range(5):
        image = (mean + std * np_rng.normal(size=(12 + i, 9, c))).astype(np.float32)
        label = np_rng.integers(0, k, image.shape[:2])
        label[0, :3] = 255
        examples.append({"image": image, "label": label, "name": f"img{i}",
                         "domain": "A" if i < 3 else "B"})
    ev = evaluator.evaluate(infer, examples, num_classes=k, mean=mean, std=std,
                            samples_per_domain=2)
    for domain, chosen in (("A", examples[:3]), ("B", examples[3:])):
        expected = np.zeros((k, k), np.int64)
        for ex in chosen:
            pred = np.argmax(((ex["image"] - mean) / std) @ w, axis=-1)
            keep = ex["label"] != 255
            np.add.at(expected, (ex["label"][keep], pred[keep]), 1)
        np.testing.assert_array_equal(ev.confusion.matrices[domain], expected)
    assert [s["name"] for s in ev.samples] == ["img0", "img1", "img3", "img4"]
    assert ev.samples[0]["pred"].shape == (12, 9)
    assert set(ev.results()) == {"A", "B", "overall"}
