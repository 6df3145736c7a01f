"""Atomic, resumable checkpoints with orbax's CheckpointManager.

A checkpoint holds three items:
  trained  what evaluation and prediction need, restored without building an optimiser: the
           trainable parameters (`params`: 'adapter/...', 'head/...') and the statistics they
           keep (`stats`: BatchNorm running statistics, often none), as plain nested dicts;
  train    what else a resumed run needs to continue exactly: step, optimiser state, RNG key;
  data     the input iterator's state (JSON).
The frozen backbones are not saved: they come from their own files or seed.

orbax writes each step into a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoints intact (the next start removes the temporary one); we
keep the last `keep` steps and the best one by the target mIoU. A failed save (a full disk) is
one `CheckpointError`: a disk without room for the arrays is refused before orbax writes; a
write that fails midway has the errors orbax's threads log and tensorstore prints held back (a
traceback each), and the half-written step is removed at once, so that the disk is not left
full.
"""

from __future__ import annotations

import errno
import glob
import io
import json
import logging
import os
import shutil
import sys
import threading
import time

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from spectralmoe_jax.errors import UserError

ITEMS = ("trained", "train", "data")
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's temporary step folders: `<step><suffix>...`


class CheckpointError(UserError, OSError):
    """A checkpoint that could not be written or read; says where and why."""


class _HoldOrbaxErrors(logging.Filter):
    """Keeps the ERROR records orbax logs (through absl) from the console while a checkpoint
    is written; `release` logs them as one-line warnings after a save that succeeded anyway."""

    def __init__(self):
        super().__init__()
        self.held: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and _from_orbax(record):
            self.held.append(record.getMessage().splitlines()[0])
            return False
        return True

    def release(self) -> None:
        held, self.held = self.held, []
        for message in held:
            logging.getLogger("absl").warning("orbax: %s", message)


def _from_orbax(record: logging.LogRecord) -> bool:
    """Logged by orbax, or about an error raised inside it or in a checkpoint it writes."""
    here = f"{os.sep}orbax{os.sep}"
    message = record.getMessage()
    if here in record.pathname or here in message or TMP_SUFFIX in message:
        return True
    trace = record.exc_info[2] if record.exc_info else None
    while trace is not None:
        if here in trace.tb_frame.f_code.co_filename:
            return True
        trace = trace.tb_next
    return False


# The tasks of a failed save whose errors orbax never retrieves are reported by asyncio when
# they are garbage collected, possibly at exit: the failure they belong to is already reported.
_ORPHANED_TASKS = _HoldOrbaxErrors()
logging.getLogger("asyncio").addFilter(_ORPHANED_TASKS)


class _HeldStderr:
    """`sys.stderr` while orbax writes: tensorstore prints the errors of a failed save's
    pending writes there itself. Replayed after a save that worked; dropped after a failure,
    once nothing more arrives (`settle`)."""

    def __enter__(self):
        self.real, self.buffer = sys.stderr, io.StringIO()
        sys.stderr = self.buffer
        return self

    def settle(self, quiet: float = 0.3, limit: float = 10.0) -> None:
        deadline, size = time.monotonic() + limit, -1
        while size != self.buffer.tell() and time.monotonic() < deadline:
            size = self.buffer.tell()
            time.sleep(quiet)

    def __exit__(self, kind, *_):
        sys.stderr = self.real
        if kind is None:
            self.real.write(self.buffer.getvalue())


def _nbytes(tree) -> int:
    return sum(int(getattr(leaf, "nbytes", 0)) for leaf in jax.tree_util.tree_leaves(tree))


def check_writable(directory: str) -> None:
    """Fails early, with the path, when the workdir cannot hold checkpoints."""
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, ".write_probe")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as error:
        raise CheckpointError(f"workdir {directory!r} is not writable: {error.strerror or error}") from error


class Checkpointer:
    """Saves and restores the items of a run's checkpoints under `directory`."""

    def __init__(self, directory: str, *, keep: int = 3, best_metric: str | None = "mIoU",
                 read_only: bool = False):
        """`read_only`: for evaluation and prediction, which must not touch a run's folder."""
        self.directory = os.path.abspath(directory)
        if not read_only:
            check_writable(self.directory)
        preserve = [policies.LatestN(n=keep)]
        if best_metric:
            preserve.append(policies.BestN(
                get_metric_fn=lambda metrics: metrics[best_metric], reverse=False, n=1,
                keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            create=not read_only,
            read_only=read_only,
            enable_async_checkpointing=False,  # a failed write must surface at the save call
            preservation_policy=policies.AnyPreservationPolicy(preserve),
            cleanup_tmp_directories=True,
        )
        # Handlers named per item, so that a step's metadata (shapes, dtypes) is readable
        # without restoring it.
        handlers = dict(trained=ocp.StandardCheckpointHandler(),
                        train=ocp.StandardCheckpointHandler(), data=ocp.JsonCheckpointHandler())
        self.manager = ocp.CheckpointManager(self.directory, item_handlers=handlers,
                                             options=options)
        self._orbax_errors = _HoldOrbaxErrors()
        # Orbax's writer threads may log after a failed save returned: held while this lives.
        logging.getLogger("absl").addFilter(self._orbax_errors)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        return self.manager.best_step()

    def save(self, step: int, *, trained, train, data, metrics: dict | None = None) -> None:
        """Writes one step atomically. A full disk is a `CheckpointError`; older steps remain,
        and the partial step is removed."""
        where = f"could not write checkpoint for step {step} in {self.directory}"
        needed, free = _nbytes(trained) + _nbytes(train), shutil.disk_usage(self.directory).free
        if free < needed:
            raise CheckpointError(
                f"{where}: the disk is full ({free / 1e6:.1f} MB free, the arrays alone need "
                f"{needed / 1e6:.1f} MB). The last complete checkpoint (step "
                f"{self.manager.latest_step()}) is untouched.")
        threads = set(threading.enumerate())
        self._orbax_errors.held.clear()
        with _HeldStderr() as stderr:
            try:
                self.manager.save(
                    step,
                    args=ocp.args.Composite(
                        trained=ocp.args.StandardSave(trained),
                        train=ocp.args.StandardSave(train),
                        data=ocp.args.JsonSave(_jsonable(data))),
                    metrics=metrics, force=True)
                self.manager.wait_until_finished()
            except Exception as error:  # noqa: BLE001 - any write failure is reported the same way
                self._clean_up_failed_save(step, threads)
                stderr.settle()
                reason = ("the disk is full" if _is_disk_full(error)
                          else f"{type(error).__name__}: {str(error).splitlines()[0]}")
                raise CheckpointError(
                    f"{where}: {reason}. The last complete checkpoint (step "
                    f"{self.manager.latest_step()}) is untouched; the partial step was "
                    "removed.") from error
        self._orbax_errors.release()

    def _clean_up_failed_save(self, step: int, threads_before: set) -> None:
        """Waits for the writer threads the save started, then removes its temporary folder."""
        try:
            self.manager.wait_until_finished()
        except Exception:  # noqa: BLE001 - the same failure, already being reported
            pass
        for thread in set(threading.enumerate()) - threads_before:
            if thread is not threading.current_thread():
                try:
                    thread.join(timeout=60)
                except Exception:  # noqa: BLE001 - orbax's threads re-raise their error here
                    pass
        for partial in glob.glob(os.path.join(self.directory, f"{step}{TMP_SUFFIX}*")):
            shutil.rmtree(partial, ignore_errors=True)
        self._orbax_errors.held.clear()
        _ORPHANED_TASKS.held.clear()

    def tree_differences(self, step: int, *, trained, train) -> list[str]:
        """How the saved `trained` and `train` items of `step` differ from the trees given
        (names, shapes, dtypes; read from the checkpoint's metadata, nothing restored)."""
        try:
            metadata = self.manager.item_metadata(step)
        except Exception as error:  # noqa: BLE001
            raise CheckpointError(f"cannot read the metadata of checkpoint step {step} in "
                                  f"{self.directory}: {error}") from error
        found = []
        for item, tree in (("trained", trained), ("train", train)):
            saved = metadata[item] if item in metadata else None
            if saved is None:
                found.append(f"{item}: missing in checkpoint step {step}")
                continue
            found += _leaf_differences(item, _leaves(saved), _leaves(tree))
        return found

    def restore(self, step: int | None = None, *, trained=None, train=None) -> dict | None:
        """The items of `step` (default: the latest), restored into the trees given (None for
        `trained`: as saved; `train=None`: the trained item only, for inference); None if there
        is no checkpoint."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            return None
        args = dict(trained=ocp.args.StandardRestore(trained))
        if train is not None:
            args.update(train=ocp.args.StandardRestore(train), data=ocp.args.JsonRestore())
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as error:  # noqa: BLE001
            raise CheckpointError(
                f"cannot restore checkpoint step {step} from {self.directory}: {error}") from error
        out = {"step": step, "trained": restored["trained"]}
        if train is not None:
            out.update(train=restored["train"], data=unpack_data_state(restored["data"]))
        return out

    def close(self):
        if self.manager is not None:
            self.manager.close()
            self.manager = None
        logging.getLogger("absl").removeFilter(self._orbax_errors)


def _jsonable(data_state):
    """grain iterator states are bytes of JSON; keep them as JSON objects in the checkpoint."""
    if isinstance(data_state, (bytes, bytearray)):
        return {"grain": json.loads(data_state.decode())}
    return {"state": data_state}


def unpack_data_state(saved):
    if saved is None:
        return None
    if "grain" in saved:
        return json.dumps(saved["grain"]).encode()
    return saved.get("state")


def _leaves(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    """'opt_state/0/mu/adapter/x' -> (shape, dtype) for every array of a tree (arrays, shape
    structs or orbax metadata: attribute, key and index paths all read as names)."""
    def name(entry) -> str:
        for attribute in ("key", "name", "idx"):
            if hasattr(entry, attribute):
                return str(getattr(entry, attribute))
        return str(entry)

    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            out["/".join(name(p) for p in path)] = (tuple(leaf.shape), str(leaf.dtype))
    return out


def _leaf_differences(item: str, saved: dict, ours: dict) -> list[str]:
    found = [f"{item} {k}: only in the checkpoint" for k in sorted(set(saved) - set(ours))]
    found += [f"{item} {k}: not in the checkpoint" for k in sorted(set(ours) - set(saved))]
    for key in sorted(set(saved) & set(ours)):
        if saved[key] != ours[key]:
            (shape_a, dtype_a), (shape_b, dtype_b) = saved[key], ours[key]
            found.append(f"{item} {key}: {shape_a} {dtype_a} in the checkpoint, "
                         f"{shape_b} {dtype_b} now")
    return found


def _is_disk_full(error: BaseException) -> bool:
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if "No space left" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False
