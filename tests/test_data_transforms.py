"""Augmentations against independent references: PyTorch resizing, colorsys, NumPy formulas,
mmseg's RandomCrop loop written out; image/label alignment under every augmentation."""
import colorsys

import ml_collections
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spectralmoe_jax.data import transforms as T
from spectralmoe_jax.data.spec import PhotometricSpec, dataset_spec
from tests.conftest import relative_error
from tests.test_data_sources import data_config


# --- resizing ---------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(37, 29), (80, 130), (51, 51)])
def test_bilinear_resize_matches_torch(size):
    image = np.random.default_rng(0).random((51, 64, 5)).astype(np.float32) * 255
    ours = T.resize_bilinear(image, size)
    reference = F.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None], size=size,
                              mode="bilinear", align_corners=False, antialias=False)
    reference = reference[0].permute(1, 2, 0).numpy()
    assert ours.shape == reference.shape
    # PyTorch computes source coordinates in float32, we in float64: ~1e-6 apart.
    assert relative_error(ours, reference) < 1e-5


@pytest.mark.parametrize("size", [(37, 29), (80, 130)])
def test_nearest_resize_matches_torch_nearest_exact(size):
    label = np.random.default_rng(1).integers(0, 20, (51, 64)).astype(np.int32)
    ours = T.resize_nearest(label, size)
    reference = F.interpolate(torch.from_numpy(label)[None, None].float(), size=size,
                              mode="nearest-exact")[0, 0].numpy().astype(np.int32)
    np.testing.assert_array_equal(ours, reference)


def test_window_resize_with_flip_equals_resize_crop_flip():
    image = np.random.default_rng(2).random((40, 50, 3)).astype(np.float32)
    full = T.resize_bilinear(image, (61, 77))
    window = T.resize_window(np.moveaxis(image, -1, 0), (61, 77), (5, 45), (13, 70), flip=True)
    np.testing.assert_allclose(np.moveaxis(window, 0, -1), full[5:45, 13:70][:, ::-1],
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape, short_edge, max_size", [
    ((512, 512), 307, 1024), ((512, 512), 614, 1024), ((300, 700), 614, 1024),
    ((1024, 1024), 256, 1024), ((900, 400), 1024, 1024), ((512, 700), 409, None)])
def test_short_edge_size_follows_resize_shortest_edge(shape, short_edge, max_size):
    height, width = shape
    new_h, new_w = T.short_edge_size(height, width, short_edge, max_size)
    # The short edge reaches its target unless the long edge would pass max_size; then the
    # long edge is max_size. The aspect ratio is kept to within rounding.
    if max_size is None or short_edge * max(shape) / min(shape) <= max_size:
        assert min(new_h, new_w) == short_edge
    else:
        assert max(new_h, new_w) == max_size
    assert abs(new_h / new_w - height / width) <= 1.0 / min(new_h, new_w)


def mmseg_random_crop(label, crop, cat_max_ratio, ignore, rng):
    """mmseg RandomCrop.crop_bbox, written out with np.unique as in mmseg."""
    def draw():
        return (int(rng.integers(max(label.shape[0] - crop[0], 0) + 1)),
                int(rng.integers(max(label.shape[1] - crop[1], 0) + 1)))
    y, x = draw()
    for _ in range(10):
        labels, counts = np.unique(label[y:y + crop[0], x:x + crop[1]], return_counts=True)
        counts = counts[labels != ignore]
        if len(counts) > 1 and np.max(counts) / np.sum(counts) < cat_max_ratio:
            break
        y, x = draw()
    return y, x


def test_random_crop_follows_mmseg_cat_max_ratio():
    label = np.zeros((100, 100), np.int32)
    label[:, 90:] = 1                    # a small class: few crops hold enough of it
    label[:5] = 255
    hits = 0
    for seed in range(40):
        ours = T.sample_crop(label, (20, 20), 0.75, 255, np.random.default_rng(seed))
        reference = mmseg_random_crop(label, (20, 20), 0.75, 255, np.random.default_rng(seed))
        assert ours == reference
        hits += ours[1] >= 76
    assert 5 < hits < 40                 # both outcomes occur: the retry loop is exercised


# --- alignment ----------------------------------------------------------------------------------

def block_label(y, x):
    return ((y // 16) * 7 + (x // 16) * 3) % 5


@pytest.mark.parametrize("photometric", [False, True])
def test_image_and_label_stay_aligned_under_every_augmentation(photometric):
    """Two bands carry each pixel's source row and column; the label is a function of the
    source position. After resize, crop, flip (and photometric jitter of the other bands),
    the label at every pixel must be the label of the position the image bands point to."""
    height, width = 96, 112
    y, x = np.mgrid[:height, :width]
    image = np.stack([y, x, y * 0 + 100, x * 0 + 50, y * 0 + 200], -1).astype(np.float32)
    config = data_config("/unused", bands=(0, 1, 2, 3, 4),
                         band_names=("row", "col", "R", "G", "B"), num_classes=5, size=80,
                         rgb_bands=(2, 3, 4),
                         augment=dict(short_edges=(60, 80, 96, 130, 170), max_size=200,
                                      cat_max_ratio=0.75, flip_prob=0.5,
                                      photometric=dict(enabled=photometric, bands=(2, 3, 4))))
    transform = T.TrainTransform(dataset_spec(config))
    element = {"image": image, "label": block_label(y, x).astype(np.int32)}
    seen_flips, seen_scales = set(), set()
    for seed in range(24):
        out = transform(element, np.random.default_rng(seed))
        out_image, out_label = out["image"], out["label"]
        assert out_image.shape == (80, 80, 5) and out_label.shape == (80, 80)
        padded = out_label == 255
        np.testing.assert_array_equal(out_image[padded], 0.0)
        rows, cols = out_image[..., 0][~padded], out_image[..., 1][~padded]
        # Nearest-neighbour labels take the source pixel whose centre is nearest; where the
        # output centre falls exactly between two source pixels either one is right.
        labels = out_label[~padded]
        matches = np.zeros(labels.shape, bool)
        for dy in (-1e-3, 1e-3):
            for dx in (-1e-3, 1e-3):
                source_y = np.floor(rows + 0.5 + dy).astype(int)
                source_x = np.floor(cols + 0.5 + dx).astype(int)
                matches |= labels == block_label(source_y, source_x)
        assert matches.all()
        row_step = np.diff(out_image[~padded[:, 0], 0, 0])     # source row down column 0
        col_step = np.diff(out_image[0, ~padded[0], 1])        # source column along row 0
        assert (row_step > 0).all() and ((col_step > 0).all() or (col_step < 0).all())
        seen_flips.add(bool(col_step[0] < 0))
        seen_scales.add(round(float(np.median(row_step)), 3))   # source pixels per pixel
    assert seen_flips == {True, False}
    assert min(seen_scales) < 1 < max(seen_scales) and len(seen_scales) >= 4


# --- photometric distortion ---------------------------------------------------------------------

def test_hsv_conversion_matches_colorsys():
    rgb = np.random.default_rng(5).random((9, 11, 3)).astype(np.float32) * 255
    rgb[0, 0] = 0.0
    rgb[0, 1] = 77.0                     # grey: zero saturation
    hue, saturation, value = T.rgb_to_hsv(*np.moveaxis(rgb, -1, 0))
    reference = np.array([colorsys.rgb_to_hsv(*px) for px in rgb.reshape(-1, 3) / 255.0])
    np.testing.assert_allclose(hue.ravel() / 6.0, reference[:, 0], atol=1e-6)
    np.testing.assert_allclose(saturation.ravel(), reference[:, 1], atol=1e-6)
    np.testing.assert_allclose(value.ravel() / 255.0, reference[:, 2], atol=1e-6)
    back = np.moveaxis(T.hsv_to_rgb(hue, saturation, value), 0, -1)
    assert relative_error(back, rgb) < 1e-6


def reference_photometric(image, params, bands, rgb_bands, low=0.0, high=255.0):
    """mmseg PhotoMetricDistortion on float values: NumPy for brightness and contrast,
    colorsys (per pixel, in [0, 1]) for saturation and hue."""
    out = image.astype(np.float64).copy()

    def linear(alpha, beta):
        out[..., bands] = np.clip(out[..., bands] * alpha + beta, low, high)

    if params.brightness is not None:
        linear(1.0, params.brightness)
    if params.contrast is not None and params.contrast_first:
        linear(params.contrast, 0.0)
    if params.saturation is not None or params.hue is not None:
        rgb = out[..., list(rgb_bands)].reshape(-1, 3) / high
        result = []
        for r, g, b in rgb:
            h, s, v = colorsys.rgb_to_hsv(r, g, b)
            if params.saturation is not None:
                s = min(s * params.saturation, 1.0)
            if params.hue is not None:
                h = (h + params.hue * 2.0 / 360.0) % 1.0
            result.append(colorsys.hsv_to_rgb(h, s, v))
        out[..., list(rgb_bands)] = np.clip(np.array(result).reshape(out.shape[:2] + (3,))
                                            * high, low, high)
    if params.contrast is not None and not params.contrast_first:
        linear(params.contrast, 0.0)
    return out


@pytest.mark.parametrize("params", [
    T.PhotometricParams(brightness=-20.5, contrast=1.3, contrast_first=True),
    T.PhotometricParams(brightness=25.0, contrast=0.6, contrast_first=False, saturation=1.4,
                        hue=-13),
    T.PhotometricParams(saturation=0.55, hue=17),
    T.PhotometricParams(contrast=0.8, contrast_first=False, saturation=1.45),  # no HSV trip
    T.PhotometricParams(brightness=3.0, saturation=0.7),
])
def test_photometric_distortion_on_c_bands(params):
    image = np.random.default_rng(6).random((10, 12, 6)).astype(np.float32) * 255
    spec = PhotometricSpec(enabled=True, bands=(0, 2, 3, 5))
    rgb_bands = (3, 0, 5)                # R, G, B anywhere among the bands
    planes = np.moveaxis(image, -1, 0).copy()
    ours = np.moveaxis(T.apply_photometric(planes, params, spec, rgb_bands), 0, -1)
    reference = reference_photometric(image, params, [0, 2, 3, 5], rgb_bands)
    assert relative_error(ours, reference) < 1e-5
    np.testing.assert_array_equal(ours[..., [1, 4]], image[..., [1, 4]])  # untouched bands


def test_photometric_draws_follow_mmseg_distribution():
    spec = PhotometricSpec(enabled=True)
    draws = [T.sample_photometric(spec, np.random.default_rng(s), True) for s in range(400)]
    for field, low, high in (("brightness", -32, 32), ("contrast", 0.5, 1.5),
                             ("saturation", 0.5, 1.5), ("hue", -18, 17)):
        values = [getattr(d, field) for d in draws if getattr(d, field) is not None]
        assert 0.4 < len(values) / len(draws) < 0.6        # each step with probability 1/2
        assert low <= min(values) and max(values) <= high
    assert 0.4 < np.mean([d.contrast_first for d in draws]) < 0.6
    without_rgb = T.sample_photometric(spec, np.random.default_rng(0), False)
    assert without_rgb.saturation is None and without_rgb.hue is None


# --- normalisation and padding ------------------------------------------------------------------

def test_normalisation_and_padding_against_numpy():
    rng = np.random.default_rng(7)
    image = rng.random((30, 40, 4)).astype(np.float32) * 255
    label = rng.integers(0, 3, (30, 40)).astype(np.int32)
    mean, std = np.array([10.0, 20.0, 30.0, 40.0]), np.array([2.0, 3.0, 4.0, 5.0])
    config = data_config("/unused", bands=(0, 1, 2, 3), band_names=("a", "b", "c", "d"),
                         mean=tuple(mean), std=tuple(std), size=48)
    out = T.TrainTransform(dataset_spec(config))({"image": image, "label": label},
                                                 np.random.default_rng(0))
    np.testing.assert_allclose(out["image"][:30, :40], (image - mean) / std, rtol=1e-6,
                               atol=1e-5)
    np.testing.assert_array_equal(out["image"][30:], 0.0)
    np.testing.assert_array_equal(out["image"][:, 40:], 0.0)
    np.testing.assert_array_equal(out["label"][:30, :40], label)
    assert (out["label"][30:] == 255).all() and (out["label"][:, 40:] == 255).all()
    evaluated = T.EvalTransform(dataset_spec(config))({"image": image, "label": label})
    np.testing.assert_allclose(evaluated["image"], (image - mean) / std, rtol=1e-6, atol=1e-5)


def test_train_transform_is_deterministic_given_the_rng():
    config = ml_collections.ConfigDict(data_config("/unused", size=40).to_dict())
    config.augment.short_edges = (30, 50)
    config.augment.flip_prob = 0.5
    transform = T.TrainTransform(dataset_spec(config))
    rng = np.random.default_rng(8)
    element = {"image": rng.random((48, 48, 3)).astype(np.float32),
               "label": rng.integers(0, 4, (48, 48)).astype(np.int32)}
    a = transform(element, np.random.default_rng(11))
    b = transform(element, np.random.default_rng(11))
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
