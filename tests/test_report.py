"""Visual reports from the bundled FLAIR #2 tiles, with a fake prediction (the label shifted)."""

import base64
import csv
import glob
import html
import io
import json
import os
import re

import numpy as np
import pytest
import rasterio
from PIL import Image

from spectralmoe_jax.evaluation import report, visualize
from spectralmoe_jax.evaluation.metrics import CONVENTIONS, ConfusionAccumulator

FLAIR = os.path.join(os.path.dirname(__file__), "..", "spectralmoe_jax", "demo_data", "flair2")
NAMES = ["building", "pervious surface", "impervious surface", "bare soil", "water",
         "coniferous", "deciduous", "brushwood", "vineyard", "herbaceous vegetation",
         "agricultural land", "plowed land", "other"]


def load_tiles():
    """(stem, domain, image [512, 512, 5] uint8, label [512, 512]) per tile; FLAIR codes
    1..12 -> 0..11, 13..19 -> 12 ('other')."""
    tiles = []
    for path in sorted(glob.glob(os.path.join(FLAIR, "*_aerial.tif"))):
        stem = os.path.basename(path)[:-len("_aerial.tif")]
        with rasterio.open(path) as src:
            image = np.moveaxis(src.read(), 0, -1)
        with rasterio.open(path.replace("_aerial", "_mask")) as src:
            label = np.minimum(src.read(1).astype(np.int64), 13) - 1
        tiles.append((stem, stem[:9], image, label))
    return tiles


def iou_reference(pairs, k):
    """mIoU (%) from pixel sets, classes present in ground truth or prediction."""
    ious = []
    for c in range(k):
        inter = sum(((p == c) & (lab == c)).sum() for p, lab in pairs)
        union = sum(((p == c) | (lab == c)).sum() for p, lab in pairs)
        if union:
            ious.append(inter / union)
    return 100 * np.mean(ious)


def test_false_colour_composites():
    _, _, image, _ = load_tiles()[0]
    rgb = visualize.percentile_stretch(image, bands=(0, 1, 2))
    nirrg = visualize.percentile_stretch(image, bands=(3, 0, 1))
    assert rgb.dtype == np.uint8 and rgb.shape == (512, 512, 3)
    for composite, bands in ((rgb, (0, 1, 2)), (nirrg, (3, 0, 1))):
        for channel, band in enumerate(bands):
            values = image[..., band].astype(np.float64)
            low, high = np.percentile(values, [2, 98])
            # At most ~2% of the pixels at or below the 2nd percentile saturate at each end.
            assert (composite[..., channel] == 0).mean() == pytest.approx(
                (values <= low).mean(), abs=1e-9)
            assert (composite[..., channel] == 255).mean() <= (values >= high).mean() + 1e-9
            inside = (values > low) & (values < high)
            expected = np.round((values[inside] - low) / (high - low) * 255)
            np.testing.assert_array_equal(composite[..., channel][inside], expected)
    assert not np.array_equal(rgb, nirrg)


def test_colorize_error_map_and_routing_grid(np_rng):
    palette = visualize.default_palette(6)
    assert len({tuple(c) for c in palette}) == 6
    label = np_rng.integers(0, 6, (8, 9))
    label[0, 0] = 255
    colours = visualize.colorize(label, palette)
    np.testing.assert_array_equal(colours[1:], palette[label[1:]])
    assert tuple(colours[0, 0]) == visualize.IGNORE_COLOR
    pred = label.copy()
    pred[2, 3] = (pred[2, 3] + 1) % 6
    errors = visualize.error_map(pred, label)
    assert tuple(errors[2, 3]) == visualize.ERROR_COLORS["wrong"]
    assert tuple(errors[0, 0]) == visualize.ERROR_COLORS["ignored"]
    assert tuple(errors[5, 5]) == visualize.ERROR_COLORS["correct"]

    experts = np_rng.integers(0, 4, (5, 6, 7))  # 5 layers of a 6 x 7 patch grid
    grid = visualize.routing_grid(experts, 4, scale=3, columns=3)
    assert grid.ndim == 3 and grid.shape[0] > 2 * (14 + 18) + 3 * 4 + 4 * 16  # maps, legend
    # The first map, below its caption: each patch a 3x3 block of its expert's colour.
    first = grid[4 + 14:4 + 14 + 18, 4:4 + 21]
    np.testing.assert_array_equal(first[::3, ::3], visualize.default_palette(4)[experts[0]])
    # The legend below: expert e's swatch in its colour.
    legend = grid[2 * (14 + 18) + 3 * 4:]
    for e in range(4):
        assert tuple(legend[4 + e * 16 + 6, 10]) == tuple(visualize.default_palette(4)[e])
    with pytest.raises(ValueError, match="expert indices"):
        visualize.routing_grid(experts, 3)


def test_report_from_flair_tiles(tmp_path, np_rng):
    tiles = load_tiles()
    k = len(NAMES)
    palette = visualize.default_palette(k)
    confusion = ConfusionAccumulator(k)
    panels, pairs = [], []
    for stem, domain, image, label in tiles:
        label = label.copy()
        label[:8] = 255  # a strip of ignored pixels
        pred = np.roll(np.where(label == 255, 0, label), 9, axis=1)  # the fake prediction
        confusion.update(pred, label, domain)
        keep = label != 255
        pairs.append((pred[keep], label[keep]))
        if domain == "D004_2021":
            for bands in ((0, 1, 2), (3, 0, 1)):
                panels.append((f"{stem} bands {bands}", visualize.prediction_panel(
                    image, label, pred, palette, bands=bands, name=stem)))
    routing = [("expert_v", visualize.routing_grid(np_rng.integers(0, 6, (4, 32, 32)), 6))]

    path = report.write_report(str(tmp_path / "eval"), confusion, class_names=NAMES,
                               palette=palette, panels=panels, routing=routing,
                               title="FLAIR demo", notes="fake prediction: label shifted")
    page = open(path).read()
    overall = iou_reference(pairs, k)
    d004 = iou_reference([p for t, p in zip(tiles, pairs) if t[1] == "D004_2021"], k)
    assert f"{overall:.2f}" in page and f"{d004:.2f}" in page
    assert html.escape(CONVENTIONS) in page
    for domain in ("D004_2021", "D055_2018", "overall"):
        assert domain in page
    images = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    assert len(images) == len(panels) + 1 == 5
    decoded = Image.open(io.BytesIO(base64.b64decode(images[0])))
    assert decoded.size[0] > 4 * 512 and decoded.size[1] > 512
    assert len(os.listdir(tmp_path / "eval" / "images")) == 5

    record = json.load(open(tmp_path / "eval" / "metrics.json"))
    assert record["mIoU"] == pytest.approx(overall)
    assert record["D004_2021/mIoU"] == pytest.approx(d004)
    conf = np.load(tmp_path / "eval" / "confusion_overall.npy")
    expected = np.zeros((k, k), np.int64)
    for pred, label in pairs:
        np.add.at(expected, (label, pred), 1)
    np.testing.assert_array_equal(conf, expected)
    with open(tmp_path / "eval" / "confusion_d004_2021.csv") as f:
        assert next(csv.reader(f))[1:] == NAMES
