r"""The command line with faults injected, for tests/test_faults.py:

  python tests/fault_hooks.py FAULT=VALUE ... -- <the flags of spectralmoe_jax.main>

Faults (each at the level where the real one happens, so the package's own handling runs):
  kill_in_save=N    the process SIGKILLs itself while orbax writes checkpoint step N (inside
                    orbax's writer thread, after the step's temporary folder exists)
  enospc_in_save=N  orbax's write of a file of checkpoint step N fails with ENOSPC, as on a
                    full disk (orbax's threads log it and the save fails as it would)
  nan_batch=N       the N-th batch this process reads has NaN pixels
  stall_batch=N     reading the N-th batch writes `<workdir>/stalled` and blocks: the test
                    kills the process there, in the middle of a step
  hold=PATH         training waits before its first step until PATH exists
"""

import errno
import os
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _in_step_folder(path, step: int) -> bool:
    return f"{os.sep}{step}.orbax-checkpoint-tmp" in str(path)


def install(fault: str, value: str, workdir: str | None) -> None:
    if fault in ("kill_in_save", "enospc_in_save"):
        from etils.epath import abstract_path

        step, write_text = int(value), abstract_path.Path.write_text

        def faulty_write_text(self, data, *args, **kwargs):
            if _in_step_folder(self, step):
                if fault == "kill_in_save":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise OSError(errno.ENOSPC, "No space left on device", str(self))
            return write_text(self, data, *args, **kwargs)

        abstract_path.Path.write_text = faulty_write_text
    elif fault in ("nan_batch", "stall_batch"):
        import numpy as np

        from spectralmoe_jax.data import pipeline

        at, next_batch, count = int(value), pipeline.TrainIterator.__next__, [0]

        def faulty_next(self):
            batch = next_batch(self)
            count[0] += 1
            if count[0] == at and fault == "nan_batch":
                batch = dict(batch, image=np.full_like(batch["image"], np.nan))
            elif count[0] == at:
                with open(os.path.join(workdir, "stalled"), "w") as f:
                    f.write(str(os.getpid()))
                while True:
                    time.sleep(1)
            return batch

        pipeline.TrainIterator.__next__ = faulty_next
    elif fault == "hold":
        from spectralmoe_jax.training import trainer

        run = trainer.Training.run

        def held_run(self, *args, **kwargs):
            while not os.path.exists(value):
                time.sleep(0.2)
            return run(self, *args, **kwargs)

        trainer.Training.run = held_run
    else:
        raise SystemExit(f"fault_hooks: unknown fault {fault!r}")


def main() -> None:
    split = sys.argv.index("--")
    faults, flags = sys.argv[1:split], sys.argv[split + 1:]
    workdir = next((flags[i + 1] for i, f in enumerate(flags[:-1]) if f == "--workdir"), None)
    for item in faults:
        fault, value = item.split("=", 1)
        install(fault, value, workdir)
    from spectralmoe_jax.main import cli

    sys.argv = ["spectralmoe_jax.main", *flags]
    sys.exit(cli())


if __name__ == "__main__":
    main()
