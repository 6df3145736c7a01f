"""Several JAX processes on this machine, as on a pod: a launcher for tests and the worker's start.

The launcher (`run_processes`) starts one command per process, each with its own CPU devices,
joined by `jax.distributed` on a free localhost port, bounded in time, and leaves nothing
behind: every process runs in its own session and its whole group is killed with SIGKILL (the
preemption notifier jax.distributed installs catches SIGTERM). Output goes to files, never
pipes (a full pipe would block a child while we wait on its sibling); the first failure ends
the group at once. The worker calls `start_worker()` before any JAX computation.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

# Set by the launcher, read by `start_worker` (our names: no cluster detection involved).
COORDINATOR, NUM_PROCESSES, PROCESS_ID, NUM_DEVICES = (
    "SPECTRALMOE_COORDINATOR", "SPECTRALMOE_NUM_PROCESSES", "SPECTRALMOE_PROCESS_ID",
    "SPECTRALMOE_CPU_DEVICES")
# A cluster the tests happen to run in must not leak in: jax.distributed would read process ids
# and visible devices from these, and proxies can hang its localhost gRPC.
CLUSTER_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "TPU_", "MEGASCALE_", "CLOUD_TPU")


@dataclasses.dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)  # the child's session: grandchildren too
    except ProcessLookupError:
        pass
    process.wait()


def run_processes(argv: list[str], *, processes: int, devices_per_process: int, timeout: float,
                  cwd: str | None = None, env: dict | None = None) -> list[Result]:
    """Runs `argv` as `processes` JAX processes of `devices_per_process` CPU devices each.

    Returns every process's exit status and output; raises RuntimeError (with the failing
    process's output) if one fails and TimeoutError if the group outlives `timeout` seconds.
    """
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(CLUSTER_PREFIXES) and "_proxy" not in k.lower()}
    base.update(env or {})
    port = free_port()
    logs = tempfile.mkdtemp(prefix="spectralmoe_processes_")
    children, files = [], []
    try:
        for i in range(processes):
            child_env = dict(base, JAX_PLATFORMS="cpu", **{
                COORDINATOR: f"127.0.0.1:{port}", NUM_PROCESSES: str(processes),
                PROCESS_ID: str(i), NUM_DEVICES: str(devices_per_process)})
            out = open(os.path.join(logs, f"p{i}.out"), "w+")
            err = open(os.path.join(logs, f"p{i}.err"), "w+")
            files.append((out, err))
            children.append(subprocess.Popen(argv, cwd=cwd, env=child_env, stdout=out,
                                             stderr=err, start_new_session=True))
        deadline = time.monotonic() + timeout
        while True:
            codes = [c.poll() for c in children]
            if all(code is not None for code in codes):
                break
            if any(code not in (None, 0) for code in codes):
                time.sleep(1.0)  # the others may still print their side of the failure
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{processes} processes of {argv} ran past {timeout:.0f} s; "
                                   f"output: {_tails(files)}")
            time.sleep(0.2)
    finally:
        for child in children:
            _kill_group(child)
    results = []
    for child, (out, err) in zip(children, files):
        out.seek(0)
        err.seek(0)
        results.append(Result(child.returncode, out.read(), err.read()))
        out.close()
        err.close()
    for name in os.listdir(logs):
        os.remove(os.path.join(logs, name))
    os.rmdir(logs)
    failed = [(i, r) for i, r in enumerate(results) if r.returncode != 0]
    if failed:
        i, r = next(((i, r) for i, r in failed if r.returncode > 0), failed[0])
        raise RuntimeError(f"process {i} of {processes} exited with {r.returncode}:\n"
                           f"{r.stderr[-6000:]}")
    return results


def _tails(files) -> str:
    parts = []
    for i, (_, err) in enumerate(files):
        err.flush()
        err.seek(0)
        parts.append(f"[process {i}] {err.read()[-2000:]}")
    return "\n".join(parts)


def start_worker():
    """In a process `run_processes` started: its CPU devices, then `jax.distributed`; returns
    jax. An uncaught error ends the process at once (`os._exit`), so that it never waits in
    jax.distributed's shutdown barrier while its peers wait in their next collective."""
    import traceback

    def fail_fast(kind, value, tb):
        traceback.print_exception(kind, value, tb)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

    sys.excepthook = fail_fast
    import jax

    jax.config.update("jax_num_cpu_devices", int(os.environ[NUM_DEVICES]))
    jax.config.update("jax_default_matmul_precision", "highest")
    count = int(os.environ[NUM_PROCESSES])
    if count > 1:
        jax.distributed.initialize(coordinator_address=os.environ[COORDINATOR],
                                   num_processes=count,
                                   process_id=int(os.environ[PROCESS_ID]),
                                   initialization_timeout=120, heartbeat_timeout_seconds=30,
                                   cluster_detection_method="deactivate")
    return jax
