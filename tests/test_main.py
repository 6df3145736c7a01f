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


def summary(tmp_path, config, *overrides):
    run = main("--config", config, "--mode", "summary", *overrides, workdir=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    with open(tmp_path / "summary.json") as f:
        return json.load(f), run.stdout


def vit_block(width, mlp):
    """Parameters of one pre-norm block: 2 norms, qkv, proj, fc1, fc2, 2 layer scales."""
    return 4 * width + (width + 1) * 3 * width + (width + 1) * width + (width + 1) * mlp + \
        (mlp + 1) * width + 2 * width


def test_summary_totals_per_part_are_the_papers(tmp_path):
    counts, table = summary(tmp_path, "configs/flair.py")
    parts = counts["parts"]
    assert parts["adapter"] == {"total": 5_737_985, "trainable": 5_737_985}  # Table 3: 5.74 M
    assert parts["head"]["total"] == parts["head"]["trainable"] == 20_537_805  # "20.6 M"
    assert parts["vfm"]["trainable"] == parts["depth"]["trainable"] == 0
    assert counts["trainable"] == parts["adapter"]["total"] + parts["head"]["total"]
    assert sum(p["total"] for p in parts.values()) == counts["total"]
    assert "adapter (part)" in table and "5.74 M" in table and "20.54 M" in table


def test_size_variant_and_presets_on_a_benchmark_config(tmp_path):
    # The traceback: a ViT-S preset on the ViT-L benchmark; feature_layers follow.
    counts, _ = summary(tmp_path / "preset", "configs/flair.py",
                        "--config.model.vfm.preset=dinov2_vits14")
    assert counts["modules"]["vfm/blocks"]["total"] == 12 * vit_block(384, 1536)
    # A size variant: VFM and depth encoder at ViT-S size, the adapter at its width.
    counts, _ = summary(tmp_path / "size", "configs/flair.py:vits")
    assert counts["modules"]["vfm/blocks"]["total"] == 12 * vit_block(384, 1536)
    assert counts["modules"]["depth/blocks"]["total"] == 12 * vit_block(384, 1536)
    assert counts["modules"]["adapter/experts_b"]["total"] == 12 * 6 * 16 * 384  # [L, E, r, d]
    # A preset and a method together: DINOv2 ViT-B/14 with REIN (no depth encoder).
    counts, _ = summary(tmp_path / "both", "configs/whu_ohs.py:dinov2_vitb14,rein")
    assert counts["modules"]["vfm/blocks"]["total"] == 12 * vit_block(768, 3072)
    assert counts["parts"]["depth"]["total"] == 0 and "adapter/w_gate" not in counts["modules"]
    assert counts["modules"]["adapter/experts_b"]["total"] == 12 * 1 * 16 * 768  # one token set


def test_config_mode_documents_every_field_and_shows_what_the_run_decides(tmp_path):
    run = main("--config", "configs/custom.py:vits", "--mode", "config",
               "--config.data.class_names=('a', 'b')",
               "--config.data.band_names=('R', 'G', 'B', 'NIR')",
               "--config.data.bands=('R', 'G', 'B', 'NIR')",
               "--config.data.mean=(0, 0, 0, 0)", "--config.data.std=(1, 1, 1, 1)",
               workdir=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [line for line in run.stdout.splitlines() if not line.startswith("#")]
    assert len(lines) > 150 and all(" = " in line and "  # " in line for line in lines)
    assert "(undocumented)" not in run.stdout
    for expected in ("model.vfm.overrides.width = 384  # ",
                     "model.vfm.overrides.in_channels = None -> 4  # ",  # from data.bands
                     "model.feature_layers = None -> (3, 5, 7, 11)  # ",
                     "model.decoder.num_classes = None -> 2  # ",
                     "data.layout.kind = 'folders'  # "):
        assert any(line.startswith(expected) for line in lines), expected
    # A config that does not parse: its fields, then the one-line error.
    broken = main("--config", "configs/custom.py", "--mode", "config", workdir=tmp_path)
    assert broken.returncode == 1 and "data.root = ''" in broken.stdout
    assert broken.stderr.strip().startswith("error:") and "class_names" in broken.stderr
    assert len(broken.stderr.strip().splitlines()) == 1


def test_help_names_the_variants_and_points_to_config_mode(tmp_path):
    run = subprocess.run([sys.executable, "-m", "spectralmoe_jax.main", "--help"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    for word in ("vits", "vitb", "vitl", "dinov2_vits14", "dofa_vitl16", "no_cross_attention",
                 "--mode config", "configs/custom.py", "--compile_cache"):
        assert word in run.stdout, word
