"""Streamed band statistics against NumPy on the whole array."""

import glob
import os
import types

import numpy as np
import pytest
import rasterio

from spectralmoe_jax.data import stats
from tests.conftest import relative_error

FLAIR = os.path.join(os.path.dirname(__file__), "..", "spectralmoe_jax", "demo_data", "flair2")
QS = (1.0, 2.0, 25.0, 50.0, 98.0, 99.0)


def test_mean_std_percentiles_against_numpy(np_rng):
    # A large offset and batches of unequal sizes: the naive sum-of-squares formula would lose
    # digits here; the Chan merge must not.
    offsets = np.array([1e4, -3.0, 250.0])
    batches = [offsets + np_rng.normal(size=(n, 17, 3)) * [1.0, 0.01, 30.0]
               for n in (1, 40, 7, 300)]
    whole = np.concatenate([b.reshape(-1, 3) for b in batches])
    value_range, bins = (-400.0, 10400.0), 20000
    result = stats.compute_band_stats(batches, value_range=value_range, bins=bins,
                                      percentiles=QS)
    assert relative_error(result["mean"], whole.mean(0)) < 1e-12
    assert relative_error(result["std"], whole.std(0)) < 1e-6
    np.testing.assert_allclose(result["std"], whole.std(0), rtol=1e-6)
    width = (value_range[1] - value_range[0]) / bins
    for q in QS:
        error = np.array(result["percentiles"][q]) - np.percentile(whole, q, 0)
        assert np.abs(error).max() <= width
    assert result["count"] == whole.shape[0] and result["clipped_values"] == 0
    np.testing.assert_array_equal(result["min"], whole.min(0))


def test_flair_tiles_uint8(np_rng):
    paths = sorted(glob.glob(os.path.join(FLAIR, "*_aerial.tif")))
    assert len(paths) == 6

    def examples():  # a data source's examples: dicts holding float32 [H, W, C]
        for path in paths:
            with rasterio.open(path) as src:
                yield {"image": np.moveaxis(src.read(), 0, -1).astype(np.float32),
                       "name": os.path.basename(path)}

    result = stats.compute_band_stats(examples(), value_range=(0, 256), bins=256,
                                      percentiles=QS)
    whole = np.concatenate([e["image"].reshape(-1, 5).astype(np.float64) for e in examples()])
    np.testing.assert_allclose(result["mean"], whole.mean(0), rtol=1e-6)
    np.testing.assert_allclose(result["std"], whole.std(0), rtol=1e-6)
    for q in QS:  # one bin per integer value here
        assert np.abs(np.array(result["percentiles"][q]) - np.percentile(whole, q, 0)).max() <= 1
    snippet = stats.config_snippet(result)
    config = types.SimpleNamespace(data=types.SimpleNamespace())
    exec(snippet, {"config": config})
    np.testing.assert_allclose(config.data.mean, whole.mean(0), rtol=1e-5)
    np.testing.assert_allclose(config.data.std, whole.std(0), rtol=1e-5)
    assert "# p98 = [" in snippet


def test_masks_non_finite_clipping_and_merge(np_rng):
    a = np_rng.uniform(0, 10, (30, 20, 2))
    b = np_rng.uniform(-5, 15, (25, 20, 2))  # partly outside the declared range
    a[3, 4, 1] = np.nan
    valid_b = np_rng.random((25, 20)) < 0.7
    first = stats.BandStats(2, (0, 10), bins=100)
    second = stats.BandStats(2, (0, 10), bins=100)
    first.update(a)
    second.update(b, valid=valid_b)
    first.merge(second)
    result = first.result()
    kept = np.concatenate([np.delete(a.reshape(-1, 2), 3 * 20 + 4, axis=0), b[valid_b]])
    np.testing.assert_allclose(result["mean"], kept.mean(0), rtol=1e-12)
    np.testing.assert_allclose(result["std"], kept.std(0), rtol=1e-12)
    assert result["excluded_pixels"] == 1 + (~valid_b).sum()
    assert result["clipped_values"] == ((b[valid_b] < 0) | (b[valid_b] >= 10)).sum()
    assert result["max"][0] == pytest.approx(kept[:, 0].max())
    with pytest.raises(ValueError, match=r"expected \[\.\.\., 2\]"):
        first.update(np.zeros((4, 4, 3)))
    with pytest.raises(ValueError, match="different bands, range or bins"):
        first.merge(stats.BandStats(2, (0, 11), bins=100))
    with pytest.raises(KeyError, match="no 'image' key"):
        stats.compute_band_stats([{"label": a}], value_range=(0, 1))
