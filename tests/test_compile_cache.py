"""The persistent compilation cache and the compile notices, in fresh processes: the second
start reads the program back, XLA's C++ error lines during a compile are muted, and a slow
compile gets one line saying how long it took the last time."""

import json
import os
import subprocess
import sys
import textwrap
import threading

from spectralmoe_jax import compile_cache
from tests.tiny import ROOT

# A program that takes seconds to compile (the cache keeps those past 1 s) and logs an
# XLA C++ error while compiling: its dump folder cannot be created.
SCRIPT = textwrap.dedent("""
    import sys
    from spectralmoe_jax import compile_cache
    compile_cache.setup(sys.argv[1])
    import jax, jax.numpy as jnp

    def f(x):
        for i in range(240):
            x = jnp.tanh(x @ x.T) * (i % 7) + jnp.roll(x, i % 5, axis=0)
        return x

    print(float(jax.jit(f)(jnp.ones((16, 16))).sum()))
""")


def start(cache, **env):
    environment = dict(os.environ, SPECTRALMOE_COMPILE_NOTICE_S="0",
                       XLA_FLAGS="--xla_dump_to=/proc/no/such/folder", PYTHONPATH=ROOT, **env)
    environment.pop("JAX_COMPILATION_CACHE_DIR", None)
    environment.pop("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", None)  # jax's 1 s, not conftest's
    environment.pop("TF_CPP_MIN_LOG_LEVEL", None)  # jax's default: C++ errors are printed
    return subprocess.run([sys.executable, "-c", SCRIPT, str(cache)], capture_output=True,
                          text=True, timeout=600, env=environment)


def test_a_second_start_reads_the_cache_and_no_xla_error_line_shows(tmp_path):
    cache = tmp_path / "xla"
    first = start(cache)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "compiling jit(f): the first compile" in first.stdout + first.stderr
    assert "Could not create directory" not in first.stderr  # muted while compiling
    entries = [n for n in os.listdir(cache) if n.startswith("jit_f-")]
    assert len(entries) == 1
    with open(cache / compile_cache.TIMES_FILE) as f:
        compiled_in = json.load(f)["jit(f)"]
    assert compiled_in >= 1.0

    second = start(cache)
    assert second.returncode == 0, second.stderr[-2000:]
    assert second.stdout.splitlines()[-1] == first.stdout.splitlines()[-1]  # same result
    assert f"its last compile took {compiled_in:.0f} s" in second.stdout + second.stderr
    assert [n for n in os.listdir(cache) if n.startswith("jit_f-")] == entries
    with open(cache / compile_cache.TIMES_FILE) as f:  # a cache hit records no compile time
        assert json.load(f)["jit(f)"] == compiled_in


def test_off_compiles_again_and_says_so(tmp_path):
    run = start("off", HOME=str(tmp_path))
    assert run.returncode == 0, run.stderr[-2000:]
    assert "the compilation cache is off" in run.stdout + run.stderr
    assert not os.path.exists(tmp_path / ".cache")


def test_cache_folder_from_flag_environment_or_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.cache_dir() == str(tmp_path / "spectralmoe_jax" / "xla")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/elsewhere")
    assert compile_cache.cache_dir() == "/elsewhere"
    assert compile_cache.cache_dir("/mine") == "/mine"
    assert compile_cache.cache_dir("off") is None and compile_cache.cache_dir("") is None


def test_log_level_is_muted_only_while_a_compile_runs(monkeypatch):
    levels = []
    notices = compile_cache.CompileNotices(None)
    notices._set_log_level = levels.append
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    event = compile_cache.BACKEND_COMPILE
    started, release = threading.Event(), threading.Event()

    def other_compile():  # another thread's compile overlapping this one
        notices.on_start(event, 0.0, fun_name="jit(b)")
        started.set()
        release.wait()
        notices.on_duration(event, 0.1, fun_name="jit(b)")

    notices.on_start(event, 0.0, fun_name="jit(a)")
    thread = threading.Thread(target=other_compile)
    thread.start()
    started.wait()
    notices.on_duration(event, 0.1, fun_name="jit(a)")
    assert levels == [compile_cache.MUTED]  # jit(b) still compiles
    release.set()
    thread.join()
    assert levels == [compile_cache.MUTED, 0]  # back to TF_CPP_MIN_LOG_LEVEL
