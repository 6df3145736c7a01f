"""Atomic, resumable checkpoints with orbax's CheckpointManager.

A checkpoint holds three items:
  trained  what evaluation and prediction need, restored without building an optimiser: the
           trainable parameters (`params`: 'adapter/...', 'head/...') and the statistics they
           keep (`stats`: BatchNorm running statistics, often none), as plain nested dicts;
  train    what else a resumed run needs to continue exactly: step, optimiser state, RNG key;
  data     the input iterator's state (JSON).
The frozen backbones are not saved: they come from their own files or seed.

orbax writes each step into a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoints intact; we keep the last `keep` steps and the best one by
the target mIoU.
"""

from __future__ import annotations

import errno
import json
import os

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from spectralmoe_jax.errors import UserError

ITEMS = ("trained", "train", "data")


class CheckpointError(UserError, OSError):
    """A checkpoint that could not be written or read; says where and why."""


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
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=ITEMS, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        return self.manager.best_step()

    def save(self, step: int, *, trained, train, data, metrics: dict | None = None) -> None:
        """Writes one step atomically. A full disk is a `CheckpointError`; older steps remain."""
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
            reason = "the disk is full" if _is_disk_full(error) else f"{type(error).__name__}: {error}"
            last = self.manager.latest_step()
            raise CheckpointError(
                f"could not write checkpoint for step {step} in {self.directory}: {reason}. "
                f"The last complete checkpoint (step {last}) is untouched.") from error

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
        self.manager.close()


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


def _is_disk_full(error: BaseException) -> bool:
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if "No space left" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False
