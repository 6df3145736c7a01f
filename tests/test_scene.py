"""Whole-scene prediction: seamless (windows equal the whole-image prediction), georeferenced
COG output, nodata, large scenes and memory that does not grow with the scene."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import rasterio
import torch
import torch.nn.functional as F
from rasterio.transform import from_origin
from rasterio.windows import Window
from scipy import ndimage

from spectralmoe_jax.evaluation import inference
from spectralmoe_jax.evaluation.gis import ids_encoding
from spectralmoe_jax.evaluation.scene import SceneInput, SceneOutput, Tiling, predict_scene

CRS = "EPSG:2154"
TRANSFORM = from_origin(961436.8, 6329262.4, 0.2, 0.2)


def smooth_field(rng, height, width, channels, cell=40):
    """A smooth random field [H, W, C] in 0..1 (bilinear upsampling of a coarse grid)."""
    coarse = rng.random((height // cell + 2, width // cell + 2, channels))
    return ndimage.zoom(coarse, (cell, cell, 1), order=1)[:height, :width]


def write_scene(path, height, width, channels, *, dtype="uint8", seed=0, nodata=None,
                descriptions=None, tile=1024):
    """A smooth multi-band GeoTIFF written in row blocks; a 1024-pixel pattern tiled over
    big scenes keeps this cheap. Returns the path."""
    rng = np.random.default_rng(seed)
    top = np.iinfo(dtype).max
    pattern = smooth_field(rng, min(height, tile), min(width, tile), channels)
    pattern = pattern * 0.9 * top + rng.normal(0, 0.02 * top, pattern.shape)
    pattern = np.clip(pattern, 1, top).astype(dtype)
    with rasterio.open(path, "w", driver="GTiff", height=height, width=width, count=channels,
                       dtype=dtype, crs=CRS, transform=TRANSFORM, nodata=nodata, tiled=True,
                       blockxsize=256, blockysize=256) as dst:
        for y in range(0, height, pattern.shape[0]):
            rows = min(pattern.shape[0], height - y)
            line = np.tile(pattern[:rows], (1, -(-width // pattern.shape[1]), 1))[:, :width]
            dst.write(np.moveaxis(line, -1, 0), window=Window(0, y, width, rows))
        for i, name in enumerate(descriptions or []):
            dst.set_band_description(i + 1, name)
    return str(path)


def per_pixel_fn(weight, bias):
    """A cheap per-pixel linear map (broadcast multiply-adds; XLA's CPU dot is slow here)."""

    def predict(x):
        return sum(x[..., c:c + 1] * weight[c] for c in range(weight.shape[0])) + bias

    return jax.jit(predict)


def conv_fn(kernel, bias):
    def predict(x):
        return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias

    return jax.jit(predict)


def torch_conv(x, kernel, bias):
    """'SAME' convolution of NHWC NumPy input in PyTorch (zero padding), float64."""
    weight = torch.tensor(np.array(kernel)).permute(3, 2, 0, 1).double()
    t = torch.tensor(np.ascontiguousarray(x)).permute(0, 3, 1, 2).double()
    y = F.conv2d(t, weight, torch.tensor(np.array(bias)).double(), padding=kernel.shape[0] // 2)
    return y.permute(0, 2, 3, 1).numpy()


def read_scene(path):
    with rasterio.open(path) as src:
        return np.moveaxis(src.read(), 0, -1), src.profile


def assert_labels_match(labels, scores, where=None, tie=1e-4):
    """labels == argmax(scores) wherever the top two scores are not within `tie`."""
    top2 = np.sort(scores, axis=-1)[..., -2:]
    decided = top2[..., 1] - top2[..., 0] > tie * np.abs(top2[..., 1]).max()
    if where is not None:
        decided &= where
    assert decided.mean() > 0.99 * (1 if where is None else where.mean())
    np.testing.assert_array_equal(labels[decided], np.argmax(scores, axis=-1)[decided])


def safe_pixels(size, window, stride, radius=1):
    """[size] bool: pixels that every covering window sees with their whole neighbourhood
    (or whose missing neighbours lie outside the scene, where both sides pad with zeros)."""
    window = min(window, size)
    safe = np.ones(size, bool)
    for s in inference.window_starts(size, window, stride):
        p = np.arange(s, s + window)
        ok = ((p - radius >= s) | (s == 0)) & ((p + radius < s + window) | (s + window == size))
        safe[p] &= ok
    return safe


def test_seamless_per_pixel_model(tmp_path, np_rng):
    # Each output pixel's blended scores equal the whole scene's: a 1x1 model has no context,
    # so any misplaced, missing or double-counted window (e.g. at column-block seams) would show.
    k = 5
    src = write_scene(tmp_path / "in.tif", 301, 463, 4, dtype="uint16")
    weight = np_rng.normal(size=(4, k)).astype(np.float32)
    bias = np_rng.normal(size=(k,)).astype(np.float32)
    mean, std = np.array([0.3, 0.35, 0.3, 0.4]), np.array([0.2, 0.25, 0.22, 0.3])
    result = predict_scene(per_pixel_fn(weight, bias), src, str(tmp_path / "out.tif"),
                           num_classes=k, scene_input=SceneInput(mean, std, value_scale=65535),
                           tiling=Tiling(window=120, overlap=50, batch_size=3, block_width=170,
                                         patch_multiple=16),
                           output=SceneOutput(probabilities="uint8"), progress=False)
    image, _ = read_scene(src)
    scores = ((image / 65535.0 - mean) / std) @ weight + bias  # float64 reference
    labels, profile = read_scene(result.labels_path)
    assert labels.shape == (301, 463, 1) and profile["dtype"] == "uint8"
    assert_labels_match(labels[..., 0], scores)
    probs, _ = read_scene(result.probabilities_path)
    softmax = np.exp(scores - scores.max(-1, keepdims=True))
    softmax /= softmax.sum(-1, keepdims=True)
    assert np.abs(probs - 255 * softmax).max() <= 0.5 + 1e-3
    xs = inference.window_starts(463, 120, 70)
    assert result.num_windows == len(inference.window_starts(301, 120, 70)) * sum(
        len([x for x in xs if x < min(x0 + 170, 463) and x + 120 > x0]) for x0 in (0, 170, 340))


def test_seamless_conv_model_with_tta(tmp_path, np_rng):
    # A 3x3 convolution: windows agree with the whole scene wherever no window edge cuts a
    # pixel's neighbourhood; with Hann weights the rest differs only slightly.
    k, c, window, overlap = 4, 3, 96, 40
    src = write_scene(tmp_path / "in.tif", 250, 330, c, seed=1)
    kernel = jnp.asarray(np_rng.normal(size=(3, 3, c, k)), jnp.float32)
    bias = jnp.asarray(np_rng.normal(size=(k,)), jnp.float32)
    result = predict_scene(conv_fn(kernel, bias), src, str(tmp_path / "out.tif"), num_classes=k,
                           scene_input=SceneInput([128] * c, [60] * c),
                           tiling=Tiling(window=window, overlap=overlap, tta=True,
                                         block_width=128, batch_size=2),
                           output=SceneOutput(probabilities="uint8", probability_kind="identity"),
                           progress=False)
    image, _ = read_scene(src)
    x = ((image - 128.0) / 60.0)[None]
    scores = 0.5 * (torch_conv(x, kernel, bias) + torch_conv(x[:, :, ::-1], kernel,
                                                             bias)[:, :, ::-1])[0]
    safe = np.outer(safe_pixels(250, window, window - overlap),
                    safe_pixels(330, window, window - overlap))
    assert 0.9 < safe.mean() < 1.0
    labels, _ = read_scene(result.labels_path)
    assert_labels_match(labels[..., 0], scores, where=safe)
    probs, _ = read_scene(result.probabilities_path)
    expected = np.round(255 * np.clip(scores, 0, 1))
    assert np.abs(probs[safe] - expected[safe]).max() <= 1
    assert (labels[..., 0] == scores.argmax(-1)).mean() > 0.99


def test_batch_is_no_larger_than_a_row_of_windows(tmp_path, np_rng):
    """A tile smaller than the window runs the model on one window, not on a padded batch."""
    src = write_scene(tmp_path / "tile.tif", 100, 120, 3)
    weight = np_rng.normal(size=(3, 2)).astype(np.float32)
    shapes = []

    def predict(x):
        shapes.append(x.shape)  # at trace time
        return sum(x[..., c:c + 1] * weight[c] for c in range(3))

    result = predict_scene(predict, src, str(tmp_path / "labels.tif"), num_classes=2,
                           scene_input=SceneInput([128] * 3, [64] * 3),
                           tiling=Tiling(window=256, batch_size=4, patch_multiple=16),
                           progress=False)
    assert result.num_windows == 1 and shapes == [(1, 112, 128, 3)]
    image = (read_scene(src)[0] - 128.0) / 64
    assert_labels_match(read_scene(result.labels_path)[0][..., 0], image @ weight)


def test_georeferencing_nodata_and_cog(tmp_path, np_rng):
    k = 3
    src = write_scene(tmp_path / "in.tif", 700, 650, 4, dtype="uint16", nodata=0,
                      descriptions=["blue", "green", "red", "nir"])
    with rasterio.open(src, "r+") as dst:  # a nodata corner, and a stripe missing in 'red'
        dst.write(np.zeros((4, 100, 120), np.uint16), window=Window(0, 0, 120, 100))
        dst.write(np.zeros((10, 650), np.uint16), 3, window=Window(0, 500, 650, 10))
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    weight = np_rng.normal(size=(3, k)).astype(np.float32)
    options = dict(num_classes=k, tiling=Tiling(window=256, overlap=64), progress=False)
    normalise = dict(mean=[3e4] * 3, std=[1e4] * 3)
    predict = per_pixel_fn(weight, np.zeros(k, np.float32))
    result = predict_scene(predict, src, str(tmp_path / "sub" / "labels.tif"),
                           scene_input=SceneInput(**normalise, bands=["nir", "red", "green"]),
                           output=SceneOutput(labels=ids_encoding(k, palette=palette)), **options)
    with rasterio.open(result.labels_path) as out:
        assert out.crs.to_epsg() == 2154 and out.transform == TRANSFORM
        assert out.nodata == 255 and out.dtypes == ("uint8",)
        assert out.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert out.profile["tiled"] and out.compression.name.lower() == "deflate"
        assert out.overviews(1) == [2]
        assert out.colormap(1)[2] == (0, 0, 255, 255)
        labels = out.read(1)
    image, _ = read_scene(src)
    image = image[..., [3, 2, 1]].astype(np.float64)
    missing = image == 0
    nodata = missing.all(-1)  # nodata in every selected band: no label
    assert nodata[:100, :120].all() and not nodata[500:510, 120:].any()
    np.testing.assert_array_equal(labels == 255, nodata)
    # A band's missing values enter the model as 0, the mean.
    scores = np.where(missing, 0.0, (image - 3e4) / 1e4) @ weight
    assert_labels_match(labels, scores, where=~nodata)

    # The same with the nodata value given, for a file without a nodata tag.
    with rasterio.open(src, "r+") as dst:
        dst.nodata = None
    again = predict_scene(predict, src, str(tmp_path / "again.tif"),
                          scene_input=SceneInput(**normalise, bands=[3, 2, 1], nodata=0), **options)
    np.testing.assert_array_equal(read_scene(again.labels_path)[0][..., 0], labels)

    with pytest.raises(ValueError, match="band name 'swir' is not one of the band descriptions"):
        predict_scene(predict, src, str(tmp_path / "x.tif"),
                      scene_input=SceneInput(**normalise, bands=["swir"]), **options)
    with pytest.raises(ValueError, match="mean has 3 values for 2 selected bands"):
        predict_scene(predict, src, str(tmp_path / "x.tif"),
                      scene_input=SceneInput(**normalise, bands=[0, 1]), **options)


def check_large_scene(tmp_path, height, width, np_rng):
    k, c = 4, 3
    src = write_scene(tmp_path / "big.tif", height, width, c)
    weight = np_rng.normal(size=(c, k)).astype(np.float32)
    bias = np_rng.normal(size=(k,)).astype(np.float32)
    result = predict_scene(per_pixel_fn(weight, bias), src, str(tmp_path / "big_labels.tif"),
                           num_classes=k, scene_input=SceneInput([128] * c, [64] * c),
                           tiling=Tiling(window=512, overlap=128, batch_size=4), progress=False)
    with rasterio.open(src) as inp, rasterio.open(result.labels_path) as out:
        assert out.shape == (height, width)
        for y in range(0, height, 500):  # compared in row blocks
            region = Window(0, y, width, min(500, height - y))
            image = np.moveaxis(inp.read(window=region), 0, -1)
            assert_labels_match(out.read(1, window=region), ((image - 128.0) / 64) @ weight + bias)


def test_large_scene(tmp_path, np_rng):
    check_large_scene(tmp_path, 3000, 2000, np_rng)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("SPECTRALMOE_SLOW_TESTS"),
                    reason="about 1-2 minutes on 2 CPU cores; set SPECTRALMOE_SLOW_TESTS=1")
def test_10000_by_10000_scene(tmp_path, np_rng):
    check_large_scene(tmp_path, 10000, 10000, np_rng)


_MEMORY_PROBE = textwrap.dedent("""
    import resource, sys
    import jax, numpy as np
    from spectralmoe_jax.evaluation.scene import SceneInput, Tiling, predict_scene
    w = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    fn = jax.jit(lambda x: sum(x[..., c:c + 1] * w[c] for c in range(3)))
    for src, dst in zip(sys.argv[1::2], sys.argv[2::2]):  # small scene first, then large
        predict_scene(fn, src, dst, num_classes=4, scene_input=SceneInput([128] * 3, [64] * 3),
                      tiling=Tiling(window=256, overlap=64, block_width=768), progress=False)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # peak so far, KiB
""")


def test_memory_does_not_grow_with_the_scene(tmp_path):
    # One process predicts a 1000^2 scene, then a 3000^2 one; the peak resident memory may
    # not grow by more than GDAL's block cache (64 MB), while 9x the pixels' float32 scores
    # alone would take 144 MB more (K=4).
    args = []
    for size in (1000, 3000):
        args += [write_scene(tmp_path / f"in_{size}.tif", size, size, 3),
                 str(tmp_path / f"out_{size}.tif")]
    run = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, *args], capture_output=True,
                         text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    small, large = (int(line) / 1024 for line in run.stdout.split())
    print(f"peak RSS {small:.0f} MB after 1000^2, {large:.0f} MB after 3000^2")
    assert large - small < 64
