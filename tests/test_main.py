"""The entry point: modes, config overrides and their errors."""

import json
import os
import subprocess
import sys

import numpy as np

from tests.tiny import ROOT


def main(*args, workdir):
    return subprocess.run(
        [sys.executable, "-m", "spectralmoe_jax.main", "--workdir", str(workdir), *args],
        capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_unknown_mode_and_unknown_config_key_are_clear_errors(tmp_path):
    bad_mode = main("--config", "configs/demo.py", "--mode", "bogus", workdir=tmp_path)
    assert bad_mode.returncode != 0 and "bogus" in bad_mode.stderr and "summary" in bad_mode.stderr
    bad_key = main("--config", "configs/demo.py", "--mode", "summary",
                   "--config.train.batch_sise=3", workdir=tmp_path)
    assert bad_key.returncode != 0 and "batch_sise" in bad_key.stderr
    bad_variant = main("--config", "configs/demo.py:bogus", "--mode", "summary", workdir=tmp_path)
    assert bad_variant.returncode != 0 and "bogus" in bad_variant.stderr


def test_summary_mode_writes_counts_and_applies_overrides(tmp_path):
    run = main("--config", "configs/demo.py", "--mode", "summary",
               "--config.model.adapter.num_experts=2", workdir=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    with open(tmp_path / "summary.json") as f:
        counts = json.load(f)
    assert "TOTAL" in run.stdout
    # experts_a is [L, E, m, r]: the ViT-S's 12 layers x 2 experts x 16 tokens x rank 4.
    assert counts["modules"]["adapter/experts_a"]["total"] == 12 * 2 * 16 * 4
    assert counts["trainable"] < counts["total"]


def test_validate_and_stats_modes_on_the_bundled_tiles(tmp_path):
    run = main("--config", "configs/demo.py", "--mode", "validate", workdir=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    run = main("--config", "configs/demo.py", "--mode", "stats", workdir=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    with open(tmp_path / "stats.json") as f:
        stats = json.load(f)
    # Independent reference: numpy over the four training tiles' R, G, B, NIR bands.
    import rasterio

    folder = os.path.join(ROOT, "spectralmoe_jax", "demo_data", "flair2")
    tiles = [f for f in os.listdir(folder) if f.endswith("_aerial.tif") and not f.startswith("D004")]
    pixels = []
    for name in tiles:
        with rasterio.open(os.path.join(folder, name)) as src:
            pixels.append(src.read([1, 2, 3, 4]).reshape(4, -1))
    pixels = np.concatenate(pixels, axis=1).astype(np.float64)
    np.testing.assert_allclose(stats["mean"], pixels.mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(stats["std"], pixels.std(axis=1), rtol=1e-5)
    assert "mean" in run.stdout and "std" in run.stdout


def test_validate_mode_names_a_bad_band_count(tmp_path):
    run = main("--config", "configs/demo.py", "--mode", "validate",
               "--config.data.band_names=('R', 'G', 'B', 'NIR', 'elevation', 'extra')",
               workdir=tmp_path)
    assert run.returncode != 0
    assert "_aerial.tif" in run.stderr and "6" in run.stderr and "5" in run.stderr
    assert "Traceback" not in run.stderr  # a clear message, not a stack trace


def test_a_misspelt_key_is_one_line_naming_it_and_the_nearest_key(tmp_path):
    run = main("--config", "configs/flair.py", "--mode", "summary",
               "--config.train.learning_rat=1", workdir=tmp_path)
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "learning_rat" in lines[0] and "'learning_rate'" in lines[0]
    assert "Traceback" not in run.stderr


def test_every_vit_field_of_a_benchmark_config_is_settable(tmp_path):
    sizes = dict(width=64, depth=4, num_heads=4, mlp_dim=128, in_channels=4)
    overrides = [f"--config.model.{part}.overrides.{k}={v}"
                 for part in ("vfm", "depth") for k, v in sizes.items()]
    run = main("--config", "configs/flair.py", "--mode", "summary", *overrides, workdir=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    with open(tmp_path / "summary.json") as f:
        counts = json.load(f)
    # Per block at width 64, MLP 128: 2 norms 2 x 128, qkv 64 x 192 + 192, proj 64 x 64 + 64,
    # fc1 64 x 128 + 128, fc2 128 x 64 + 64, 2 layer scales 2 x 64.
    block = 2 * 128 + 64 * 192 + 192 + 64 * 64 + 64 + 64 * 128 + 128 + 128 * 64 + 64 + 2 * 64
    assert counts["modules"]["vfm/blocks"]["total"] == 4 * block
    assert counts["modules"]["depth/blocks"]["total"] == 4 * block
    assert counts["modules"]["adapter/experts_b"]["total"] == 4 * 6 * 16 * 64
