"""A training run's folder: which process holds it, and which run it holds.

  lock.json     the training process that holds the workdir: host, pid, start time, command.
                A second trainer refuses at once, naming it. The lock is an advisory `flock`
                on this file, which the kernel drops when its process dies, so the lock of a
                killed run is recognised as stale and taken over; on file systems without
                locks the recorded pid is checked instead (on this host).
  config.json   the run's configuration (every field, as it started), compared on resume: a
                workdir continues only the run it holds (`differences`). Starting over moves
                the previous run into `previous_run/` (`move_aside`); nothing is deleted.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys

from absl import logging

from spectralmoe_jax.errors import UserError
from spectralmoe_jax.io.files import write_atomic

LOCK_FILE = "lock.json"
CONFIG_FILE = "config.json"
PREVIOUS_RUN = "previous_run"


class WorkdirError(UserError):
    """The workdir is in use by another run, or holds a different run."""


# --- the lock ----------------------------------------------------------------------------------

def _holder_info() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)}


def _describe(holder: dict) -> str:
    return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started "
            f"{holder.get('started', '?')}")


def _read_holder(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 1 << 16).decode(errors="replace")
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _write_holder(fd: int, holder: dict) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(holder) + "\n").encode())
    os.fsync(fd)


def _alive_here(holder: dict) -> bool:
    """True unless `holder` is a process of this host that no longer exists."""
    if holder.get("host") != socket.gethostname():
        return True  # another host's process cannot be checked from here
    try:
        os.kill(int(holder.get("pid", -1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True
    return True


class WorkdirLock:
    """Held by the one training process of a workdir, from before it writes anything until it
    ends (`release`, also on errors; the kernel releases it when the process is killed)."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = os.path.join(workdir, LOCK_FILE)
        self._fd: int | None = None

    def acquire(self) -> WorkdirLock:
        try:
            os.makedirs(self.workdir, exist_ok=True)
            while self._fd is None:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _read_holder(fd)
                    os.close(fd)
                    raise self._busy(holder) from None
                except OSError as error:  # no advisory locks on this file system
                    os.close(fd)
                    if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS,
                                           errno.EINVAL):
                        raise
                    self._acquire_by_pid()
                    return self
                if os.path.exists(self.path) and os.path.samestat(os.fstat(fd),
                                                                  os.stat(self.path)):
                    self._take(fd)
                else:  # its previous holder removed the file while we opened it: again
                    os.close(fd)
        except OSError as error:
            raise WorkdirError(f"workdir {self.workdir!r} is not writable: "
                               f"{error.strerror or error}") from error
        return self

    def _take(self, fd: int) -> None:
        stale = _read_holder(fd)
        if stale:
            logging.warning("%s: taking over the lock of a training run that is no longer "
                            "running (%s)", self.path, _describe(stale))
        _write_holder(fd, _holder_info())
        self._fd = fd

    def _acquire_by_pid(self) -> None:
        """Without `flock`: the holder recorded in the file, if alive, keeps the workdir."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        holder = _read_holder(fd)
        if holder and _alive_here(holder):
            os.close(fd)
            raise self._busy(holder, hint=f"; if that run is no longer running, delete "
                                          f"{self.path}")
        self._take(fd)

    def _busy(self, holder: dict, hint: str = "") -> WorkdirError:
        return WorkdirError(
            f"workdir {self.workdir} is in use by another training run ({_describe(holder)}; "
            f"lock {self.path}): wait for it to end, or train in another --workdir{hint}")

    def release(self) -> None:
        if self._fd is None:
            return
        try:  # removed while held, so that no one takes an orphaned file's lock
            os.remove(self.path)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# --- the run a workdir holds -----------------------------------------------------------------

def write_config(workdir: str, record: dict) -> None:
    """`config.json`, written whole or not at all."""
    write_atomic(os.path.join(workdir, CONFIG_FILE),
                 json.dumps(record, indent=2, sort_keys=True, default=str))


def read_config(workdir: str) -> dict | None:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as error:
        raise WorkdirError(f"{path}: unreadable ({error}); move it away to resume without "
                           "the configuration check") from error


def differences(saved, current, where: str = "") -> list[str]:
    """'model.adapter.num_experts: 4 in the workdir, 6 now' for every value the two nested
    dicts both hold and differ in (a key only one side has, as a field added to or dropped
    from the code since, is not a difference)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) & set(current), key=str):
            out += differences(saved[key], current[key], f"{where}.{key}" if where else str(key))
        return out
    if saved != current:
        return [f"{where}: {saved!r} in the workdir, {current!r} now"]
    return []


def summarise(items: list[str], limit: int = 6) -> str:
    """The first `limit` items joined on one line, and how many more."""
    shown = "; ".join(items[:limit])
    return shown + (f"; and {len(items) - limit} more" if len(items) > limit else "")


def move_aside(workdir: str) -> str:
    """Moves everything of the previous run (all but the lock and earlier moved runs) into a new
    `workdir/previous_run[.N]`; returns that folder."""
    target, n = os.path.join(workdir, PREVIOUS_RUN), 1
    while os.path.exists(target):
        n += 1
        target = os.path.join(workdir, f"{PREVIOUS_RUN}.{n}")
    os.makedirs(target)
    for name in sorted(os.listdir(workdir)):
        if name == LOCK_FILE or name.split(".")[0] == PREVIOUS_RUN:
            continue
        os.rename(os.path.join(workdir, name), os.path.join(target, name))
    return target


def start_over_or_refuse(workdir: str, found: list[str], *, restart: bool,
                         move: bool = True) -> None:
    """The workdir holds another run (`found` says how it differs): with `train.restart`, move
    it aside (`move`: this process does; one of a run's processes) and start from step 0;
    otherwise one line saying what differs and what to do."""
    if not found:
        return
    if restart:
        if not move:
            return
        moved = move_aside(workdir)
        logging.warning("train.restart: the previous run of %s (it differs: %s) is now in %s; "
                        "starting from step 0", workdir, summarise(found, 3), moved)
        print(f"train.restart: previous run moved to {moved}; starting from step 0")
        return
    raise WorkdirError(
        f"workdir {workdir} holds a different run, so it cannot resume: {summarise(found)}. "
        "Train in a new --workdir, or pass --config.train.restart=True to move the previous "
        f"run into {os.path.join(workdir, PREVIOUS_RUN)} and start over")
