"""Whole-image and sliding-window inference against mmseg's slide_inference written out in
PyTorch, padding and cropping, flip test-time augmentation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spectralmoe_jax.evaluation import inference
from tests.conftest import relative_error

C, K = 3, 5


def conv_fn(kernel, bias, multiple=1):
    """A translation-equivariant predict_fn: one 'SAME' convolution, HWIO kernel."""

    def predict(x):
        assert x.shape[1] % multiple == 0 and x.shape[2] % multiple == 0, x.shape
        y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + bias

    return predict


def torch_conv(x, kernel, bias):
    """The same convolution in PyTorch on NHWC NumPy input, zero padding."""
    weight = torch.tensor(np.array(kernel)).permute(3, 2, 0, 1).double()
    t = torch.tensor(np.array(x)).permute(0, 3, 1, 2).double()
    y = F.conv2d(t, weight, torch.tensor(np.array(bias)).double(),
                 padding=kernel.shape[0] // 2)
    return y.permute(0, 2, 3, 1).numpy()


def mmseg_slide(x, encode, crop, stride, weights=None):
    """mmseg EncoderDecoder.slide_inference (NHWC), optionally with per-window weights."""
    b, h_img, w_img, _ = x.shape
    h_grids = max(h_img - crop + stride - 1, 0) // stride + 1
    w_grids = max(w_img - crop + stride - 1, 0) // stride + 1
    preds, count = None, np.zeros((1, h_img, w_img, 1))
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1, x1 = h_idx * stride, w_idx * stride
            y2, x2 = min(y1 + crop, h_img), min(x1 + crop, w_img)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            out = encode(x[:, y1:y2, x1:x2])
            wgt = np.ones((y2 - y1, x2 - x1)) if weights is None else weights(y2 - y1, x2 - x1)
            if preds is None:
                preds = np.zeros((b, h_img, w_img, out.shape[-1]))
            preds[:, y1:y2, x1:x2] += out * wgt[None, :, :, None]
            count[:, y1:y2, x1:x2] += wgt[None, :, :, None]
    assert (count > 0).all()
    return preds / count


def hann(h, w):
    """sin^2(pi (i + 1/2) / n) per axis, written out."""
    return np.outer([np.sin(np.pi * (i + 0.5) / h) ** 2 for i in range(h)],
                    [np.sin(np.pi * (j + 0.5) / w) ** 2 for j in range(w)])


@pytest.fixture
def conv3(np_rng):
    return (jnp.asarray(np_rng.normal(size=(3, 3, C, K)), jnp.float32),
            jnp.asarray(np_rng.normal(size=(K,)), jnp.float32))


def test_window_starts_match_mmseg():
    for size, window, stride in [(1000, 512, 341), (512, 512, 341), (300, 512, 341),
                                 (1024, 512, 341), (700, 256, 256), (513, 512, 1)]:
        grids = max(size - window + stride - 1, 0) // stride + 1
        expected = [max(min(i * stride + window, size) - window, 0) for i in range(grids)]
        assert inference.window_starts(size, window, stride) == expected
    with pytest.raises(ValueError, match="uncovered"):
        inference.window_starts(1000, 100, 200)


@pytest.mark.parametrize("blend", ["mean", "hann"])
def test_slide_matches_mmseg_slide_inference(np_rng, conv3, blend):
    kernel, bias = conv3
    x = np_rng.normal(size=(2, 70, 93, C)).astype(np.float32)
    slide = jax.jit(functools.partial(inference.slide_inference, conv_fn(kernel, bias),
                                      window=32, stride=21, blend=blend, batch_size=5))
    ours = slide(x)
    reference = mmseg_slide(x, lambda crop: torch_conv(crop, kernel, bias), 32, 21,
                            None if blend == "mean" else hann)
    assert ours.shape == (2, 70, 93, K)
    assert relative_error(ours, reference) < 1e-6


@pytest.mark.parametrize("blend", ["mean", "hann"])
def test_slide_equals_whole_for_per_pixel_model(np_rng, blend):
    # A 1x1 convolution sees no neighbours: any correct blend of windows equals the whole
    # image's prediction exactly, and a misplaced window would show.
    kernel = jnp.asarray(np_rng.normal(size=(1, 1, C, K)), jnp.float32)
    predict = conv_fn(kernel, jnp.zeros(K))
    x = np_rng.normal(size=(1, 100, 77, C)).astype(np.float32)
    whole = inference.make_infer_fn(predict, mode="whole")(x)
    slide = inference.make_infer_fn(predict, mode="slide", window=40, stride=24, blend=blend,
                                    batch_size=3)(x)
    assert relative_error(slide, whole) < 1e-6
    assert relative_error(whole, np.asarray(x) @ np.asarray(kernel[0, 0])) < 1e-6


def test_window_larger_than_image(np_rng, conv3):
    # mmseg shrinks the window to the image: one window, identical to whole inference.
    x = np_rng.normal(size=(1, 20, 30, C)).astype(np.float32)
    predict = conv_fn(*conv3)
    np.testing.assert_allclose(inference.slide_inference(predict, x, window=64, stride=48),
                               inference.whole_inference(predict, x), rtol=1e-6, atol=1e-6)


def test_padding_to_patch_multiple_and_crop(np_rng, conv3):
    kernel, bias = conv3
    x = np_rng.normal(size=(2, 50, 37, C)).astype(np.float32)
    ours = inference.whole_inference(conv_fn(kernel, bias, multiple=16), x, patch_multiple=16)
    padded = np.pad(x, ((0, 0), (0, 14), (0, 11), (0, 0)))  # zeros up to 64 x 48
    reference = torch_conv(padded, kernel, bias)[:, :50, :37]
    assert ours.shape == (2, 50, 37, K)
    assert relative_error(ours, reference) < 1e-6
    reflect = inference.pad_to_multiple(jnp.asarray(x), 16, "reflect")
    np.testing.assert_array_equal(reflect, np.pad(x, ((0, 0), (0, 14), (0, 11), (0, 0)),
                                                  mode="reflect"))
    # Windows are padded too: slide inference with 20-pixel windows on a multiple-of-16 model.
    slide = inference.slide_inference(conv_fn(kernel, bias, multiple=16), x, window=20,
                                      stride=15, patch_multiple=16)
    reference = mmseg_slide(
        x, lambda crop: torch_conv(np.pad(crop, ((0, 0), (0, 12), (0, 12), (0, 0))),
                                   kernel, bias)[:, :20, :20], 20, 15)
    assert relative_error(slide, reference) < 1e-6


def test_flip_tta(np_rng, conv3):
    kernel, bias = conv3  # a random 3x3 kernel is not mirror-symmetric
    x = np_rng.normal(size=(2, 24, 29, C)).astype(np.float32)
    ours = inference.whole_inference(conv_fn(kernel, bias, multiple=8), x, patch_multiple=8,
                                     flip=True)

    def padded_conv(image):  # pad to 32 x 32, convolve, crop
        padded = np.pad(image, ((0, 0), (0, 8), (0, 3), (0, 0)))
        return torch_conv(padded, kernel, bias)[:, :24, :29]

    reference = 0.5 * (padded_conv(x) + padded_conv(x[:, :, ::-1])[:, :, ::-1])
    assert relative_error(ours, reference) < 1e-6
    assert relative_error(ours, padded_conv(x)) > 1e-2  # the flip does change the result
    slide = inference.slide_inference(conv_fn(kernel, bias), x, window=16, stride=10, flip=True)
    reference = mmseg_slide(x, lambda c: 0.5 * (torch_conv(c, kernel, bias) + torch_conv(
        c[:, :, ::-1], kernel, bias)[:, :, ::-1]), 16, 10)
    assert relative_error(slide, reference) < 1e-6


def test_bad_predict_fn_output(np_rng):
    x = np_rng.normal(size=(1, 32, 32, C)).astype(np.float32)
    with pytest.raises(ValueError, match="at its input's resolution"):
        inference.whole_inference(lambda im: im[:, ::4, ::4], x)
    with pytest.raises(ValueError, match="blend must be one of"):
        inference.window_weights(4, 4, "gauss")
    with pytest.raises(ValueError, match="mode must be 'whole' or 'slide'"):
        inference.make_infer_fn(lambda im: im, mode="tiles")
