"""Nothing silent (issue 14): every bad input and fault, end to end through the command line.

Each case asserts the exit code, the one `error:` line naming the file, key or value (no
traceback, no library log record), and that the checkpoints and outputs written before are
intact. Faults that need the process itself to misbehave (a kill inside orbax's writer, a full
disk, a NaN batch) are injected by `tests/fault_hooks.py` where they really happen, and the
package's own handling runs.

The cases, by group (the issue's failing ones marked *):
  configuration and command line: unknown key on the command line and in a config file*, a
    value the run cannot use (eval mode, log_every, on_bad_tile, mesh), unknown mode, unknown
    variant, predict without --input*, convert without --input, summary without --workdir;
  data, before the first step: truncated tile*, image and mask in different CRSs*, missing
    mask, wrong band count, missing data root; `--mode validate` naming 11 bad tiles at once
    (CRS* and transform among them) and reporting each domain's CRS;
  data, as the pipeline reads it: mask codes outside the classes* (stop naming the file and the
    codes; or `on_bad_tile=skip`: logged, counted, trained to the end);
  the workdir: a second trainer refused at once naming the holder*, another model refused on
    resume (by config* and, for a workdir without config.json, by its parameter tree*),
    `train.restart` moving the previous run aside, a finished run saying so*;
  interruptions: kill -9 mid-step, then kill during a checkpoint write, then a resume equal to
    the uninterrupted run bit for bit with each step recorded once* and the stale lock taken
    over; NaN stop; full disk (injected ENOSPC*, and a real small tmpfs when running as root);
    read-only workdir (train refused, eval with --output works);
  eval and predict: no trained weights* (refused; untrained only when asked, and said), predict
    on a missing input and on a tile with too few bands*;
  in process, below the command line: the skip policy's replacement keeps the stream
    deterministic and resumable and evaluation leaves the tile out; the lock's pid fallback
    where a file system has no flock; a disk without room for the arrays refused before
    orbax writes.
Predict on a folder (it must skip the masks) belongs to the GIS work (evaluation/predict.py) and
is tested there. The in-process engine tests (tests/test_training.py: exact resume, NaN stop,
frozen weights, full disk at the save call, unwritable workdir) and the validation unit tests
(tests/test_data_validate.py: each bad tile kind, quick-check truncation per format, CRS and
transform rules) cover the same cases below the command line.
"""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import rasterio
from affine import Affine

from spectralmoe_jax.data import benchmarks
from tests.tiny import ROOT

CONFIG = "tests/tiny_config.py"
TRAIN_TILE = "D055_2018_IMG_036294"  # one of the four training tiles


# --- running the command line ------------------------------------------------------------------

def cli(*args, faults=(), timeout=600):
    if faults:
        command = [sys.executable, os.path.join("tests", "fault_hooks.py"), *faults, "--", *args]
    else:
        command = [sys.executable, "-m", "spectralmoe_jax.main", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def mode(name, workdir, *overrides, faults=(), config=CONFIG):
    return cli("--config", config, "--workdir", str(workdir), "--mode", name, *overrides,
               faults=faults)


def lines_of(text):
    return [line for line in re.split(r"[\r\n]", text) if line.strip()]


def error_line(result):
    """Exit 1 with one `error:` line, no traceback and no library ERROR record."""
    assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
    lines = lines_of(result.stderr)
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert not [line for line in lines if re.match(r"[EF]\d{4} ", line)], result.stderr[-3000:]
    return errors[0]


def succeeded(result):
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return result


def snapshot(folder):
    """{relative path: sha1} of every file under `folder`."""
    out = {}
    for parent, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(parent, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha1(f.read()).hexdigest()
    return out


def records(workdir, kind="train"):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def steps_of(workdir, kind="train"):
    return [r["step"] for r in records(workdir, kind)]


def checkpoint_steps(workdir):
    return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


def copy_run(source, target):
    shutil.copytree(source, target)
    return str(target)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The uninterrupted tiny run: 4 steps, checkpoints 2 and 4, a record per step."""
    workdir = str(tmp_path_factory.mktemp("trained") / "run")
    succeeded(mode("train", workdir))
    assert checkpoint_steps(workdir) == ["2", "4"] and steps_of(workdir) == [1, 2, 3, 4]
    return workdir


# --- data: copies of the bundled tiles to break ---------------------------------------------------

def tiles_copy(tmp_path):
    folder = tmp_path / "tiles"
    shutil.copytree(benchmarks.DEMO_ROOT, folder)
    for name in os.listdir(folder):
        os.chmod(folder / name, 0o644)
    return folder


def rewrite(path, array=None, **profile_changes):
    """Rewrites a GeoTIFF with other pixels ([C, H, W]) and / or profile fields."""
    with rasterio.open(path) as src:
        profile, data = src.profile, src.read()
    array = data if array is None else array
    profile.update(count=array.shape[0], height=array.shape[1], width=array.shape[2],
                   dtype=str(array.dtype), **profile_changes)
    os.remove(path)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(array)


def truncate(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


def read(path):
    with rasterio.open(path) as src:
        return src.read()


# --- configuration and command line: one line, nothing built -----------------------------------

def misspelt_config_file(tmp_path):
    path = tmp_path / "misspelt.py"
    path.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "from tests.tiny import tiny_config\n"
        "def get_config(arg=None):\n"
        "    config = tiny_config()\n"
        "    config.train.learning_rat = 1.0\n"
        "    return config\n")
    return str(path)


@pytest.mark.parametrize("args, expected", [
    (["--mode", "summary", "--config.train.learning_rat=1"], ["learning_rat", "'learning_rate'"]),
    (["--mode", "summary", "--config.eval.mode=slid"], ["eval", "mode='slid'", "whole"]),
    (["--mode", "summary", "--config.train.log_every=0"], ["train", "log_every=0"]),
    (["--mode", "summary", "--config.data.on_bad_tile=ignore"], ["on_bad_tile", "'ignore'"]),
    (["--mode", "train", "--config.mesh.data=3"], ["mesh.data=3", "1 devices"]),
    (["--mode", "bogus"], ["--mode=bogus", "train"]),
    (["--mode", "predict"], ["--mode predict needs --input"]),
    (["--mode", "convert"], ["--mode convert needs --input"]),
])
def test_configuration_and_command_line_mistakes_are_one_line(tmp_path, args, expected):
    line = error_line(cli("--config", CONFIG, "--workdir", str(tmp_path / "run"), *args))
    for text in expected:
        assert text in line, line
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_config_file_mistakes_are_one_line(tmp_path):
    line = error_line(cli("--config", misspelt_config_file(tmp_path), "--mode", "summary",
                          "--workdir", str(tmp_path)))
    assert "learning_rat" in line and "'learning_rate'" in line
    line = error_line(cli("--config", f"{CONFIG}:bogus", "--mode", "summary", "--workdir",
                          str(tmp_path)))
    assert "bogus" in line and "no_depth" in line
    line = error_line(cli("--config", CONFIG, "--mode", "summary"))
    assert "--mode summary needs --workdir" in line


# --- data faults found before the first step -----------------------------------------------------

def break_truncated(tiles):
    path = str(tiles / f"{TRAIN_TILE}_aerial.tif")
    truncate(path)
    return path, ["truncated file"]


def break_crs(tiles):
    path = str(tiles / f"{TRAIN_TILE}_mask.tif")
    with rasterio.open(path, "r+") as dst:
        dst.crs = "EPSG:32631"
    return path, ["image CRS is EPSG:2154", "EPSG:32631"]


def break_missing_mask(tiles):
    path = str(tiles / f"{TRAIN_TILE}_mask.tif")
    os.remove(path)
    return path, ["label file is missing"]


def break_band_count(tiles):
    path = str(tiles / f"{TRAIN_TILE}_aerial.tif")
    rewrite(path, read(path)[:3])
    return path, ["has 3 bands, config expects 5"]


@pytest.mark.parametrize("fault", [break_truncated, break_crs, break_missing_mask,
                                   break_band_count])
def test_train_stops_before_the_first_step_naming_the_file(tmp_path, fault):
    tiles = tiles_copy(tmp_path)
    path, expected = fault(tiles)
    workdir = tmp_path / "run"
    line = error_line(mode("train", workdir, f"--config.data.root={tiles}"))
    assert path in line, line
    for text in expected:
        assert text in line, line
    assert "--mode validate lists every problem" in line
    assert sorted(os.listdir(workdir)) == []  # nothing written, the lock released


def test_train_on_a_missing_data_root_is_one_line(tmp_path):
    line = error_line(mode("train", tmp_path / "run", f"--config.data.root={tmp_path}/nowhere"))
    assert f"{tmp_path}/nowhere: config.data.root is not a folder" in line


def add_tile(tiles, number):
    """A copy of the training tile under a new name in the same domain; its two paths."""
    stem = f"D055_2018_IMG_9{number:05d}"
    for kind in ("aerial", "mask"):
        shutil.copy(tiles / f"{TRAIN_TILE}_{kind}.tif", tiles / f"{stem}_{kind}.tif")
    return str(tiles / f"{stem}_aerial.tif"), str(tiles / f"{stem}_mask.tif")


def test_validate_names_eleven_bad_tiles_and_each_domains_crs(tmp_path):
    tiles = tiles_copy(tmp_path)
    image, mask = zip(*(add_tile(tiles, i) for i in range(11)))
    rewrite(image[0], read(image[0])[:3])
    truncate(image[1])
    truncate(mask[2])
    codes = read(mask[3])
    codes[0, :8, :8] = 250
    rewrite(mask[3], codes)
    rewrite(mask[4], read(mask[4])[:, :256, :256])
    os.remove(mask[5])
    with open(mask[6], "wb") as f:
        f.write(b"not a tiff")
    rewrite(image[7], read(image[7]).astype(np.uint16))
    rewrite(mask[8], np.concatenate([read(mask[8])] * 2))
    with rasterio.open(mask[9], "r+") as dst:
        dst.crs = "EPSG:32631"
    with rasterio.open(mask[10], "r+") as dst:
        dst.transform = dst.transform @ Affine.translation(3, 0)
    before = snapshot(tiles)
    result = mode("validate", tmp_path / "run", f"--config.data.root={tiles}")
    line = error_line(result)
    assert line.startswith("error: (DataError) 11 problem(s) in dataset 'flair2_demo'")
    expected = [
        (image[0], "has 3 bands, config expects 5"), (image[1], "truncated file"),
        (mask[2], "truncated file"), (mask[3], "label values [250] are outside the classes"),
        (image[4], f"image is 512x512 but its label {mask[4]} is 256x256"),
        (mask[5], "label file is missing"), (mask[6], "cannot read header"),
        (image[7], "image dtype is uint16, config expects uint8"),
        (mask[8], "label has 2 bands"),
        (image[9], f"image CRS is EPSG:2154 but its label {mask[9]} is in EPSG:32631"),
        (image[10], f"its label {mask[10]} have different transforms")]
    report = result.stdout
    for path, problem in expected:
        assert any(path in p and problem in p for p in lines_of(report)), (path, problem)
    assert "11 problem(s):" in report
    assert "target CRS: D004_2021 EPSG:2154 (2)" in report
    assert snapshot(tiles) == before  # validation only reads


# --- label codes outside the classes, found as the pipeline reads the tile -----------------------

def test_mask_codes_outside_the_classes_stop_or_are_skipped(tmp_path):
    tiles = tiles_copy(tmp_path)
    mask = str(tiles / f"{TRAIN_TILE}_mask.tif")
    codes = read(mask)
    codes[0, 100:140, 100:140] = 250
    rewrite(mask, codes)
    workdir = str(tmp_path / "run")
    line = error_line(mode("train", workdir, f"--config.data.root={tiles}"))
    assert f"{mask}: label values [250] are outside the classes 0..11 and ignore 255" in line
    assert not os.path.exists(os.path.join(workdir, "checkpoints", "4"))

    # The documented skip: the tile is logged once and counted, the run trains to the end.
    result = succeeded(mode("train", workdir, f"--config.data.root={tiles}",
                            "--config.data.on_bad_tile=skip"))
    with open(os.path.join(workdir, "bad_tiles.txt")) as f:
        logged = {line.split("\t")[0] for line in f}
    assert logged == {str(tiles / f"{TRAIN_TILE}_aerial.tif")}
    assert "skipping bad tile" in result.stderr and "[250]" in result.stderr
    assert steps_of(workdir) == [1, 2, 3, 4]
    counts = [r["bad_tiles"] for r in records(workdir)]
    assert counts == sorted(counts) and counts[-1] == 1  # read in the first epoch, counted once
    assert checkpoint_steps(workdir) == ["2", "4"]


# --- the workdir: one trainer, one run ------------------------------------------------------------

def wait_for(predicate, timeout=600, what="condition"):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_a_second_trainer_is_refused_at_once_naming_the_holder(trained, tmp_path):
    workdir = copy_run(trained, tmp_path / "run")
    release = tmp_path / "release"
    command = [sys.executable, os.path.join("tests", "fault_hooks.py"), f"hold={release}", "--",
               "--config", CONFIG, "--workdir", workdir, "--mode", "train",
               "--config.train.num_steps=6"]
    first = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        lock = os.path.join(workdir, "lock.json")

        def holds():
            try:
                with open(lock) as f:
                    return json.load(f)["pid"] == first.pid
            except (OSError, ValueError, KeyError):
                return False

        wait_for(holds, what="the first trainer's lock")
        before = snapshot(workdir)
        line = error_line(mode("train", workdir, "--config.train.num_steps=6"))
        assert f"workdir {workdir} is in use by another training run" in line
        assert f"pid {first.pid}" in line and "host " in line and "started 20" in line
        assert first.poll() is None  # refused while the first one holds the workdir
        assert snapshot(workdir) == before  # the refused trainer wrote nothing
        release.write_text("go")
        out, err = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err[-3000:]
    assert steps_of(workdir) == [1, 2, 3, 4, 5, 6]  # each step once
    assert checkpoint_steps(workdir) == ["2", "4", "6"]  # no temporary folder left
    assert not os.path.exists(os.path.join(workdir, "lock.json"))


def test_resuming_with_another_model_is_refused_naming_the_difference(trained, tmp_path):
    workdir = copy_run(trained, tmp_path / "run")
    before = snapshot(workdir)
    line = error_line(mode("train", workdir, "--config.model.adapter.num_experts=4"))
    assert f"workdir {workdir} holds a different run" in line
    assert "config model.adapter.num_experts: 3 in the workdir, 4 now" in line
    assert "--config.train.restart=True" in line and "new --workdir" in line
    assert snapshot(workdir) == before


def test_a_workdir_without_its_config_is_checked_by_its_parameter_tree(trained, tmp_path):
    workdir = copy_run(trained, tmp_path / "run")
    os.remove(os.path.join(workdir, "config.json"))  # as a run of an older version left it
    before = snapshot(workdir)
    line = error_line(mode("train", workdir, "--config.model.adapter.num_experts=4"))
    assert ("checkpoint step 4 trained params/adapter/experts_a: (2, 3, 16, 2) float32 in the "
            "checkpoint, (2, 4, 16, 2) float32 now") in line
    assert snapshot(workdir) == before


def test_restart_moves_the_previous_run_aside(trained, tmp_path):
    workdir = copy_run(trained, tmp_path / "run")
    before = snapshot(workdir)
    # Another data recipe (the program stays the same, so nothing is compiled anew).
    change = "--config.data.augment.flip_prob=0.0"
    line = error_line(mode("train", workdir, change, "--config.train.num_steps=2"))
    assert "config data.augment.flip_prob: 0.5 in the workdir, 0.0 now" in line
    result = succeeded(mode("train", workdir, change, "--config.train.num_steps=2",
                            "--config.train.restart=True"))
    assert "previous run moved to" in result.stdout
    assert snapshot(os.path.join(workdir, "previous_run")) == before
    assert checkpoint_steps(workdir) == ["2"] and steps_of(workdir) == [1, 2]
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["config"]["data"]["augment"]["flip_prob"] == 0.0


def test_a_finished_run_says_so(trained, tmp_path):
    workdir = copy_run(trained, tmp_path / "run")
    before = snapshot(os.path.join(workdir, "checkpoints"))
    result = succeeded(mode("train", workdir))
    assert f"{workdir}: the run is complete (step 4 of 4)" in result.stdout
    final = json.loads(result.stdout[result.stdout.index("{"):])["final_train"]
    assert final["step"] == 4 and final["loss"] == records(trained)[-1]["loss"]
    assert snapshot(os.path.join(workdir, "checkpoints")) == before
    assert steps_of(workdir) == [1, 2, 3, 4]


# --- interruptions --------------------------------------------------------------------------------

def restore_params(step_folder):
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(os.path.join(step_folder, "trained"))
    import jax

    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_leaves_with_path(restored)}


def test_kills_mid_step_and_mid_save_then_an_exact_resume(trained, tmp_path):
    workdir = str(tmp_path / "run")
    # 1. kill -9 in the middle of step 4 (its batch being read), after checkpoint 2.
    command = [sys.executable, os.path.join("tests", "fault_hooks.py"), "stall_batch=4", "--",
               "--config", CONFIG, "--workdir", workdir, "--mode", "train"]
    first = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: os.path.exists(os.path.join(workdir, "stalled")), what="step 4")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    os.remove(os.path.join(workdir, "stalled"))
    assert checkpoint_steps(workdir) == ["2"] and steps_of(workdir) == [1, 2, 3]

    # 2. resume; killed while orbax writes checkpoint 4: the lock of (1) is taken over.
    second = mode("train", workdir, faults=["kill_in_save=4"])
    assert second.returncode == -signal.SIGKILL, second.stderr[-3000:]
    assert "taking over the lock of a training run that is no longer running" in second.stderr
    assert f"pid {first.pid}" in second.stderr
    assert checkpoint_steps(workdir) == ["2", "4.orbax-checkpoint-tmp"]

    # 3. resume to the end: the partial step removed, steps 3 and 4 redone and recorded once,
    # equal to the uninterrupted run bit for bit (losses and the saved parameters).
    succeeded(mode("train", workdir))
    assert checkpoint_steps(workdir) == ["2", "4"]
    assert steps_of(workdir) == [1, 2, 3, 4]
    assert [r["loss"] for r in records(workdir)] == [r["loss"] for r in records(trained)]
    ours = restore_params(os.path.join(workdir, "checkpoints", "4"))
    reference = restore_params(os.path.join(trained, "checkpoints", "4"))
    assert ours.keys() == reference.keys()
    for key in ours:
        np.testing.assert_array_equal(ours[key], reference[key], err_msg=key)


def test_a_nan_loss_stops_with_the_last_good_checkpoint(trained, tmp_path):
    workdir = copy_run(trained, tmp_path / "run")
    before = snapshot(os.path.join(workdir, "checkpoints"))
    line = error_line(mode("train", workdir, "--config.train.num_steps=6",
                           faults=["nan_batch=1"]))
    assert "(NonFiniteLossError) non-finite loss (nan) at step 5" in line
    assert "the last good checkpoint is step 4" in line
    assert snapshot(os.path.join(workdir, "checkpoints")) == before
    assert steps_of(workdir) == [1, 2, 3, 4]


def assert_full_disk_handled(workdir, result, before):
    line = error_line(result)
    assert f"could not write checkpoint for step 6 in {workdir}/checkpoints: the disk is full" \
        in line
    assert "The last complete checkpoint (step 4) is untouched; the partial step was removed" \
        in line
    assert "_SignalingThread" not in result.stderr and "RESOURCE_EXHAUSTED" not in result.stderr
    assert "Event loop is closed" not in result.stderr
    assert checkpoint_steps(workdir) == ["2", "4"]  # no temporary folder left
    assert snapshot(os.path.join(workdir, "checkpoints")) == before


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(trained, tmp_path):
    workdir = copy_run(trained, tmp_path / "run")
    before = snapshot(os.path.join(workdir, "checkpoints"))
    result = mode("train", workdir, "--config.train.num_steps=6", faults=["enospc_in_save=6"])
    assert_full_disk_handled(workdir, result, before)


def folder_bytes(folder):
    return sum(os.path.getsize(os.path.join(p, f)) for p, _, fs in os.walk(folder) for f in fs)


def mount_tmpfs(folder, size_kb):
    os.makedirs(folder)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(folder)],
                       check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("cannot mount a tmpfs here (needs root)")


def test_a_real_full_disk_midway_through_a_save(trained, tmp_path):
    """A small tmpfs with room for the checkpoint's arrays but not for all its files: orbax
    and tensorstore fail midway, in several threads, as on a real disk."""
    disk = tmp_path / "disk"
    mount_tmpfs(disk, folder_bytes(trained) // 1024 + 4096)
    try:
        workdir = copy_run(trained, disk / "run")
        before = snapshot(os.path.join(workdir, "checkpoints"))
        room = int(0.85 * folder_bytes(os.path.join(trained, "checkpoints", "4")))
        with open(disk / "ballast", "wb") as f:
            f.write(b"\0" * (shutil.disk_usage(disk).free - room))
        free = shutil.disk_usage(disk).free
        result = mode("train", workdir, "--config.train.num_steps=6")
        assert_full_disk_handled(workdir, result, before)
        assert shutil.disk_usage(disk).free > free - 64 * 1024  # the partial step's space is back
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_disk_without_room_for_the_arrays_is_refused_before_writing(tmp_path, monkeypatch):
    from spectralmoe_jax.io import checkpoint

    checkpointer = checkpoint.Checkpointer(str(tmp_path / "checkpoints"))
    tree = {"w": np.zeros((256, 256), np.float32)}
    checkpointer.save(1, trained=tree, train=tree, data={"position": 0})
    monkeypatch.setattr(checkpoint.shutil, "disk_usage",
                        lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 10**5, 10**5))
    with pytest.raises(checkpoint.CheckpointError) as error:
        checkpointer.save(2, trained=tree, train=tree, data={"position": 1})
    assert ("could not write checkpoint for step 2 in "
            f"{tmp_path}/checkpoints: the disk is full (0.1 MB free, the arrays alone need "
            "0.5 MB). The last complete checkpoint (step 1) is untouched.") == str(error.value)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]
    checkpointer.close()


def test_a_read_only_workdir_refuses_training_but_evaluates(trained, tmp_path):
    if os.geteuid() == 0:
        disk = tmp_path / "disk"
        mount_tmpfs(disk, folder_bytes(trained) // 1024 + 4096)
        workdir = copy_run(trained, disk / "run")
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    else:
        workdir = copy_run(trained, tmp_path / "run")
        for parent, dirs, files in os.walk(workdir):
            for name in dirs + files:
                os.chmod(os.path.join(parent, name), 0o555)
        os.chmod(workdir, 0o555)
    try:
        before = snapshot(workdir)
        line = error_line(mode("train", workdir, "--config.train.num_steps=6"))
        assert f"workdir {workdir!r} is not writable" in line
        out = tmp_path / "eval"
        result = succeeded(mode("eval", workdir, f"--output={out}", "--config.eval.report=False"))
        with open(out / "metrics.json") as f:
            metrics = json.load(f)
        assert metrics["step"] == 4 and metrics["checkpoint"].endswith("checkpoints/4")
        assert "UNTRAINED" not in result.stdout
        assert snapshot(workdir) == before
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", "-l", str(tmp_path / "disk")], check=False)


# --- eval and predict -----------------------------------------------------------------------------

def test_eval_and_predict_need_trained_weights(tmp_path):
    workdir = tmp_path / "empty"
    tile = os.path.join(benchmarks.DEMO_ROOT, "D004_2021_IMG_000473_aerial.tif")
    for args in (["eval"], ["predict", f"--input={tile}"]):
        line = error_line(mode(*args[:1], workdir, *args[1:]))
        assert f"no trained weights (workdir {workdir} holds no checkpoint)" in line
        assert "--config.eval.allow_untrained=True" in line
    line = error_line(mode("eval", workdir, f"--checkpoint={tmp_path}/nowhere"))
    assert f"trained weights {tmp_path}/nowhere do not exist" in line
    assert not os.path.exists(workdir / "eval") and not os.path.exists(workdir / "predictions")


def test_eval_uses_the_untrained_model_only_when_asked_and_says_so(tmp_path):
    workdir = tmp_path / "empty"
    result = succeeded(mode("eval", workdir, "--config.eval.allow_untrained=True",
                            "--config.eval.report=False"))
    assert "UNTRAINED model (eval.allow_untrained)" in result.stdout
    with open(workdir / "eval" / "step_0" / "metrics.json") as f:
        assert json.load(f)["checkpoint"] == "untrained"


def test_predict_input_problems_are_one_line(tmp_path):
    line = error_line(mode("predict", tmp_path / "run", f"--input={tmp_path}/missing.tif"))
    assert f"--input {tmp_path}/missing.tif: no such file or folder" in line
    tile = str(tmp_path / "three_bands.tif")
    shutil.copy(os.path.join(benchmarks.DEMO_ROOT, "D004_2021_IMG_000473_aerial.tif"), tile)
    os.chmod(tile, 0o644)
    rewrite(tile, read(tile)[:3])
    line = error_line(mode("predict", tmp_path / "run", f"--input={tile}"))
    assert f"{tile}: has 3 bands, config expects 5" in line


def test_skipped_tiles_keep_the_stream_deterministic_and_leave_evaluation(tmp_path):
    """In process: the skip policy's replacement is the same tile in every pipeline, a resumed
    pipeline continues identically, and evaluation leaves the bad tile out."""
    from spectralmoe_jax.data import pipeline
    from tests.tiny import tiny_config

    tiles = tiles_copy(tmp_path)
    for stem in (TRAIN_TILE, "D004_2021_IMG_000473"):
        mask = str(tiles / f"{stem}_mask.tif")
        codes = read(mask)
        codes[0, :4, :4] = 250
        rewrite(mask, codes)
    data = tiny_config().data
    data.root, data.on_bad_tile = str(tiles), "skip"
    log = str(tmp_path / "bad_tiles.txt")

    def batches(iterator, count):
        return [next(iterator) for _ in range(count)]

    first = pipeline.make_train_iterator(data, seed=3, batch_size=2, bad_tile_log=log)
    reference = batches(first, 4)
    resumed = pipeline.make_train_iterator(data, seed=3, batch_size=2, bad_tile_log=log)
    resumed.set_state({"position": 4, "seed": 3})
    for a, b in zip(reference[2:], batches(resumed, 2)):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    assert all(np.isin(b["label"], list(range(12)) + [255]).all() for b in reference)
    assert pipeline.BadTileLog(log).count() == 1

    evaluation = pipeline.make_eval_source(data, "target")
    names = [example["name"] for example in evaluation]
    assert names == ["D004_2021_IMG_000687_aerial"]


def test_the_lock_without_flock_falls_back_to_the_recorded_pid(tmp_path, monkeypatch):
    """On file systems without advisory locks the recorded holder decides: alive refuses
    (with how to clear it), dead is taken over. With flock, a second holder is refused."""
    import errno
    import fcntl

    from spectralmoe_jax.io import workdir as workdir_lib

    first = workdir_lib.WorkdirLock(str(tmp_path)).acquire()
    with pytest.raises(workdir_lib.WorkdirError, match=f"pid {os.getpid()}, started"):
        workdir_lib.WorkdirLock(str(tmp_path)).acquire()
    first.release()
    assert not os.path.exists(tmp_path / "lock.json")

    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    holder = workdir_lib.WorkdirLock(str(tmp_path)).acquire()
    with pytest.raises(workdir_lib.WorkdirError, match="if that run is no longer running, delete"):
        workdir_lib.WorkdirLock(str(tmp_path)).acquire()
    holder.release()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with open(tmp_path / "lock.json", "w") as f:
        json.dump({"host": __import__("socket").gethostname(), "pid": dead.pid,
                   "started": "earlier"}, f)
    taken = workdir_lib.WorkdirLock(str(tmp_path)).acquire()
    with open(tmp_path / "lock.json") as f:
        assert json.load(f)["pid"] == os.getpid()
    taken.release()
