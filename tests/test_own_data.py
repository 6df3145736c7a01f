"""Your own data from the command line: configs/custom.py on RGB PNG tiles in mmseg's layout and
on geo-bench-like HDF5 tiles (one dataset per band), through validate, stats, train, eval and
predict; eval and predict with --checkpoint and --output."""

import glob
import importlib.util
import json
import os
import pathlib
import shlex
import subprocess
import sys

import numpy as np
import pytest

from tests.tiny import ROOT

SIZE = 64
CLASSES = ("building", "pervious", "impervious", "bare", "water", "other")
# tests/tiny.py's model and schedule, as command-line overrides.
TINY = {
    "model.dtype": "float32",
    **{f"model.{part}.overrides.{k}": v for part in ("vfm", "depth")
       for k, v in dict(width=32, depth=2, num_heads=2, mlp_dim=64).items()},
    "model.adapter.num_experts": 3, "model.adapter.rank": 2, "model.adapter.num_tokens": 16,
    "model.adapter.num_queries": 16, "model.adapter.query_dim": 32,
    "model.decoder.hidden_dim": 32, "model.decoder.num_queries": 16,
    "model.decoder.encoder_layers": 1, "model.decoder.encoder_heads": 2,
    "model.decoder.encoder_ffn_dim": 32, "model.decoder.decoder_layers": 2,
    "model.decoder.decoder_heads": 2, "model.decoder.decoder_ffn_dim": 32,
    "model.decoder.num_groups": 4, "loss.num_points": 64,
    "train.batch_size": 2, "train.num_steps": 2, "train.log_every": 1,
    "train.checkpoint_every": 1, "train.tensorboard": False,
    "eval.batch_size": 1, "eval.report": False,
    "data.crop_size": f"({SIZE}, {SIZE})", "data.augment.short_edges": f"({SIZE}, {SIZE + 16})",
    "data.augment.max_size": 4 * SIZE,
}
CLASS_FLAGS = [f"--config.data.class_names={CLASSES!r}"]
IMAGENET = ["--config.data.mean=(123.675, 116.28, 103.53)",
            "--config.data.std=(58.395, 57.12, 57.375)"]


def flags(values: dict) -> list[str]:
    return [f"--config.{k}={v}" for k, v in values.items()]


def cli(*args):
    run = subprocess.run([sys.executable, "-m", "spectralmoe_jax.main", *map(str, args)],
                         capture_output=True, text=True, cwd=ROOT, timeout=900)
    return run


def ok(run):
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def toy_data():
    """scripts/toy_data.py, which writes the fixtures (and the toy data of docs/own_data.md)."""
    spec = importlib.util.spec_from_file_location("toy_data", os.path.join(ROOT, "scripts",
                                                                           "toy_data.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def png_root(tmp_path_factory):
    """mmseg's layout: img_dir/{train,val}/NAME.png (R, G, B) and ann_dir/... codes 0..6;
    the unseen D004 tiles are the validation split."""
    return pathlib.Path(toy_data().write_potsdam(str(tmp_path_factory.mktemp("potsdam")), SIZE))


@pytest.fixture(scope="module")
def png_run(png_root, tmp_path_factory):
    """Two training steps of the custom config on the PNG tiles."""
    workdir = tmp_path_factory.mktemp("png_run")
    ok(cli("--config", "configs/custom.py", "--workdir", workdir, "--mode", "train",
           *png_flags(png_root)))
    return workdir


def png_flags(png_root, *, normalise=True):
    """(A tuple flag is given once: ml_collections joins repeated ones.)"""
    return [f"--config.data.root={png_root}", "--config.data.reduce_zero_label=True",
            *CLASS_FLAGS, *(IMAGENET if normalise else []), *flags(TINY)]


def test_png_tiles_in_mmseg_layout_validate_and_stats(png_root, tmp_path):
    run = ok(cli("--config", "configs/custom.py", "--mode", "validate", *png_flags(png_root)))
    assert "source 4 tiles" in run.stdout and "target 2 tiles" in run.stdout
    run = ok(cli("--config", "configs/custom.py", "--mode", "stats", "--output", tmp_path,
                 *png_flags(png_root)))
    from PIL import Image

    pixels = np.concatenate([np.asarray(Image.open(path)).reshape(-1, 3) for path in
                             glob.glob(str(png_root / "img_dir" / "train" / "*.png"))])
    pixels = pixels.astype(np.float64)
    with open(tmp_path / "stats.json") as f:
        stats = json.load(f)
    np.testing.assert_allclose(stats["mean"], pixels.mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats["std"], pixels.std(0), rtol=1e-5)
    # No dtype in the config: the tiles' uint8 gives one histogram bin per value.
    assert stats["value_range"] == [0.0, 256.0]
    for q in (2, 50, 98):
        np.testing.assert_allclose(stats["percentiles"][str(float(q))],
                                   np.percentile(pixels, q, axis=0), atol=1.0)
    assert "--config.data.mean='(" in run.stdout  # flags to paste on the next command line


def eval_flags(png_root):
    return ["--config", "configs/custom.py", "--mode", "eval", *png_flags(png_root)]


def metrics(folder):
    with open(os.path.join(folder, "metrics.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def png_eval(png_root, png_run, tmp_path_factory):
    """The run's evaluation into --output: (the folder, its metrics)."""
    out = tmp_path_factory.mktemp("png_eval") / "eval"
    ok(cli(*eval_flags(png_root), "--workdir", png_run, "--output", out))
    return out, metrics(out)


def test_png_train_then_eval_never_overwrites(png_root, png_run, png_eval):
    out, first = png_eval
    assert os.path.isdir(png_run / "checkpoints" / "2") and first["step"] == 2
    again = ok(cli(*eval_flags(png_root), "--workdir", png_run, "--output", out))
    assert f"{out}.2" in again.stdout and metrics(f"{out}.2") == first
    # Without --output: in the workdir, beside (not over) the training's own evaluation.
    ok(cli(*eval_flags(png_root), "--workdir", png_run))
    assert {"step_2", "step_2.2"} <= set(os.listdir(png_run / "eval"))


def test_eval_from_a_step_folder_and_from_a_converted_folder(png_root, png_run, png_eval,
                                                               tmp_path):
    from spectralmoe_jax.conversion import load

    ok(cli(*eval_flags(png_root), "--checkpoint", png_run / "checkpoints" / "1",
           "--output", tmp_path / "one"))
    step_one = metrics(tmp_path / "one")
    assert step_one["step"] == 1
    assert step_one["checkpoint"].endswith(os.path.join("checkpoints", "1"))

    # A converted folder (as --mode convert writes them) holding the run's latest trained
    # weights scores as the run does.
    opened = load.open_checkpoint(str(png_run))
    load.write_converted(str(tmp_path / "converted"), opened.state, {"holds": "trained"})
    ok(cli(*eval_flags(png_root), "--checkpoint", tmp_path / "converted",
           "--output", tmp_path / "conv"))
    converted, run = metrics(tmp_path / "conv"), dict(png_eval[1])
    assert converted.pop("checkpoint") == str(tmp_path / "converted")
    assert converted.pop("step") == 0 and run.pop("step") == 2  # a converted folder has no step
    run.pop("checkpoint")
    assert converted == run  # every IoU and accuracy, per domain and overall


def test_predict_writes_to_output_and_never_over_it(png_root, png_run, tmp_path):
    scene = png_root / "img_dir" / "val" / "D004_2021_IMG_000473.png"
    os.makedirs(tmp_path / "maps")  # an earlier result, say: left as it is
    ok(cli("--config", "configs/custom.py", "--mode", "predict", "--workdir", png_run,
           "--input", scene, "--output", tmp_path / "maps", *png_flags(png_root)))
    assert os.listdir(tmp_path / "maps") == []
    assert glob.glob(str(tmp_path / "maps.2" / "D004_2021_IMG_000473_pred*"))
    assert not os.path.exists(png_run / "predictions")


# --- HDF5 tiles with one dataset per band (geo-bench) ---------------------------------------

GEOBENCH_BANDS = ("Red", "Green", "Blue", "NearInfrared")
# Three of the four stored bands, by name: the model is the PNG run's, whose compiled programs
# the compilation cache then already holds.
SELECTED = ("Blue", "Green", "Red")


@pytest.fixture(scope="module")
def hdf5_root(tmp_path_factory):
    """geo-bench's layout: m-toy/NAME.hdf5 holding a 2-D float32 dataset per band and
    `label`, the splits listed in m-toy/default_partition.json."""
    return pathlib.Path(toy_data().write_geobench(str(tmp_path_factory.mktemp("geobench")), SIZE))


def hdf5_flags(root):
    data = {
        "data.format": "hdf5", "data.root": root, "data.dtype": "float32",
        "data.hdf5_band_keys": repr(GEOBENCH_BANDS), "data.bands": repr(SELECTED),
        "data.value_range": "(0.0, 256.0)", "data.reduce_zero_label": True,
        "data.layout.kind": "same_file",
        "data.splits.source.glob": "m-toy/*.hdf5",
        "data.splits.source.names_file": "m-toy/default_partition.json",
        "data.splits.source.names_key": "train",
        "data.splits.target.glob": "m-toy/*.hdf5",
        "data.splits.target.names_file": "m-toy/default_partition.json",
        "data.splits.target.names_key": "test",
    }
    return [*CLASS_FLAGS, *flags(data), *flags(TINY)]


def test_hdf5_band_per_dataset_tiles_through_the_command_line(hdf5_root, tmp_path):
    config = ["--config", "configs/custom.py"]
    run = ok(cli(*config, "--mode", "validate", *hdf5_flags(hdf5_root)))
    assert "source 4 tiles" in run.stdout and "target 2 tiles" in run.stdout

    run = ok(cli(*config, "--mode", "stats", "--output", tmp_path / "stats",
                 *hdf5_flags(hdf5_root)))
    with open(tmp_path / "stats" / "stats.json") as f:
        stats = json.load(f)
    import h5py

    with open(hdf5_root / "m-toy" / "default_partition.json") as f:
        names = json.load(f)["train"]
    planes = []
    for name in names:
        with h5py.File(hdf5_root / "m-toy" / f"{name}.hdf5") as f:
            planes.append(np.stack([f[key][...] for key in SELECTED], -1).reshape(-1, 3))
    pixels = np.concatenate(planes).astype(np.float64)
    assert len(names) == 4
    np.testing.assert_allclose(stats["mean"], pixels.mean(0), rtol=1e-5)
    stats_flags = [line for line in run.stdout.splitlines() if line.startswith("--config.data.mean")]

    # Train with the statistics just printed.
    workdir = tmp_path / "run"
    ok(cli(*config, "--mode", "train", "--workdir", workdir, *hdf5_flags(hdf5_root),
           *shlex.split(stats_flags[0])))
    assert os.path.isdir(workdir / "checkpoints" / "2")
    with open(workdir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2]
    assert any(r["kind"] == "eval" for r in records)  # the end-of-training evaluation on 'test'

    run = ok(cli(*config, "--mode", "eval", "--workdir", workdir, "--output", tmp_path / "eval",
                 *hdf5_flags(hdf5_root), *shlex.split(stats_flags[0])))
    with open(tmp_path / "eval" / "metrics.json") as f:
        assert json.load(f)["step"] == 2

    # No georeference in an HDF5 tile: predict says so in one line.
    run = cli(*config, "--mode", "predict", "--workdir", workdir,
              "--input", hdf5_root / "m-toy" / "D004_2021_IMG_000473.hdf5", *hdf5_flags(hdf5_root))
    assert run.returncode == 1 and "hdf5" in run.stderr and "Traceback" not in run.stderr


def test_eval_needs_only_its_split_and_training_says_what_is_missing(png_root, png_run,
                                                                       png_eval, tmp_path):
    only_target = ["--config.data.splits.source.glob=", "--config.data.splits.target.domains=None"]
    ok(cli(*eval_flags(png_root), "--workdir", png_run, "--output", tmp_path / "eval",
           *only_target))
    assert metrics(tmp_path / "eval") == png_eval[1]
    run = cli("--config", "configs/custom.py", "--mode", "train", "--workdir", tmp_path / "t",
              *png_flags(png_root), *only_target)
    assert run.returncode == 1 and "splits.source" in run.stderr and "Traceback" not in run.stderr
    unnormalised = cli("--config", "configs/custom.py", "--mode", "train", "--workdir",
                       tmp_path / "u", *png_flags(png_root, normalise=False))
    assert unnormalised.returncode == 1 and "--mode stats" in unnormalised.stderr
