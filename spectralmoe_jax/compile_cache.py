"""Compilation across runs: JAX's persistent cache, and one plain line while a long compile runs.

Every start of a run compiles the same programs again, and the train step takes minutes on a
laptop's CPU. JAX's persistent compilation cache keeps the compiled executables in a folder (a
user cache folder by default), so a later start with the same model, shapes and devices reads
them back in seconds.

XLA's alarm for a compile still running after two minutes ("Very slow compile? If you want to
file a bug, run with envvar XLA_FLAGS=--xla_dump_to=/tmp/foo ...", logged at ERROR by its C++
code) reads like a crash. C++ logging below FATAL is muted while a compile runs (only then: an
ERROR elsewhere, say from a GPU driver, may be the only explanation of a failure), and a compile
still running after `NOTICE_AFTER_S` seconds prints one line instead: what compiles and how long
it took the last time, which the cache folder records. Measured on 2 busy CPU cores: the tiny
engine-test model's train step compiled in 3.0 min and was read back from the cache in 35 s.
"""

from __future__ import annotations

import json
import os
import threading
import time

from spectralmoe_jax.io.files import write_atomic

NOTICE_AFTER_S = float(os.environ.get("SPECTRALMOE_COMPILE_NOTICE_S", "10"))
TIMES_FILE = "compile_times.json"  # in the cache folder: seconds of the last compile, per program
BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"  # jax/_src/dispatch.py
CACHE_HIT = "/jax/compilation_cache/cache_hits"
MUTED = 3  # absl's C++ minimum log level: FATAL only


def default_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "spectralmoe_jax", "xla")


def cache_dir(flag: str | None = None) -> str | None:
    """--compile_cache, else $JAX_COMPILATION_CACHE_DIR, else `default_dir()`; 'off' (or an
    empty value) turns the cache off (None)."""
    value = flag if flag is not None else os.environ.get("JAX_COMPILATION_CACHE_DIR",
                                                          default_dir())
    return None if value.strip().lower() in ("", "off", "none") else os.path.expanduser(value)


class CompileNotices:
    """Listens to JAX's compile events: mutes XLA's C++ alarm during a compile, prints one line
    for a slow one, records how long it took."""

    def __init__(self, directory: str | None, out=None):
        self.times_path = os.path.join(directory, TIMES_FILE) if directory else None
        self.directory = directory
        self.out = out
        self._lock = threading.Lock()
        self._active: dict[int, tuple[str, float, threading.Timer, list]] = {}
        self._set_log_level = _absl_log_level_setter()

    def times(self) -> dict[str, float]:
        if not self.times_path or not os.path.isfile(self.times_path):
            return {}
        try:
            with open(self.times_path) as f:
                return dict(json.load(f))
        except (OSError, ValueError):
            return {}

    def message(self, name: str) -> str:
        last = self.times().get(name)
        if last is not None:  # a cache hit is known only once read: both are possible here
            return (f"compiling {name} (or reading it from the compilation cache): its last "
                    f"compile took {_duration(last)}")
        where = (f"; it is cached in {self.directory} for later starts" if self.directory
                 else " (the compilation cache is off: every start compiles it again)")
        return (f"compiling {name}: the first compile of a model's program can take minutes on "
                f"a CPU{where}")

    def notice(self, name: str) -> None:
        from tqdm import tqdm

        tqdm.write(self.message(name), file=self.out)  # between progress bars, not inside one

    def on_start(self, event: str, value, **kwargs) -> None:
        if event != BACKEND_COMPILE:
            return
        name = str(kwargs.get("fun_name", "a program"))
        timer = threading.Timer(NOTICE_AFTER_S, self.notice, (name,))
        timer.daemon = True
        with self._lock:
            if not self._active and self._set_log_level:
                self._set_log_level(MUTED)
            self._active[threading.get_ident()] = (name, time.time(), timer, [])
        timer.start()

    def on_event(self, event: str, **kwargs) -> None:
        if event == CACHE_HIT:
            with self._lock:
                entry = self._active.get(threading.get_ident())
            if entry is not None:
                entry[3].append(True)

    def on_duration(self, event: str, duration: float, **kwargs) -> None:
        if event != BACKEND_COMPILE:
            return
        with self._lock:
            entry = self._active.pop(threading.get_ident(), None)
            if not self._active and self._set_log_level:
                self._set_log_level(_configured_level())
        if entry is None:
            return
        name, _, timer, hits = entry
        timer.cancel()
        if not hits and duration >= 1.0 and self.times_path:
            self._record(name, duration)

    def _record(self, name: str, duration: float) -> None:
        times = dict(self.times(), **{name: round(duration, 1)})
        try:
            write_atomic(self.times_path, json.dumps(times, indent=1, sort_keys=True))
        except OSError:
            pass  # a read-only cache folder: no estimate next time, nothing else lost


def _configured_level() -> int:
    """The C++ log level outside compiles: TF_CPP_MIN_LOG_LEVEL (jax sets 1, WARNING and up)."""
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "1"))
    except ValueError:
        return 1


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def _absl_log_level_setter():
    """jaxlib's setter of absl's C++ minimum log level (what jax's own `jax_logging_level`
    calls), or None where this jaxlib lacks it: then XLA's alarm shows as before."""
    try:
        from jax._src.lib import utils
        return utils.absl_set_min_log_level
    except (ImportError, AttributeError):
        return None


def setup(flag: str | None = None, out=None) -> CompileNotices:
    """Turns the persistent cache on (unless 'off') and the compile notices; call before the
    first compilation."""
    import jax
    from jax import monitoring

    directory = cache_dir(flag)
    if directory:
        os.makedirs(directory, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", directory)
    notices = CompileNotices(directory, out)
    monitoring.register_scalar_listener(notices.on_start)
    monitoring.register_event_listener(notices.on_event)
    monitoring.register_event_duration_secs_listener(notices.on_duration)
    return notices
