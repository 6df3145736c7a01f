"""Metrics to `workdir/metrics.jsonl` (one JSON object a line) and TensorBoard event files.

TensorBoard files are written with tensorboardX, which needs no TensorFlow; only process 0 writes.
A resumed run first drops the records past its checkpoint (`drop_after`): the steps it redoes
are recorded once.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import numpy as np

from spectralmoe_jax.io.files import write_atomic


def _plain(value):
    if isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0:
        value = value.item()
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricWriter:
    def __init__(self, workdir: str, *, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            if tensorboard:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def records(self) -> list[dict]:
        """Every complete record (a line cut by a killed run is left out)."""
        if not os.path.exists(self.path):
            return []
        out = []
        with open(self.path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out

    def drop_after(self, step: int | None) -> None:
        """Keeps the records up to `step` (None: none), written to a new file renamed over the
        old one, so that a kill meanwhile loses nothing."""
        if not self.enabled or not os.path.exists(self.path):
            return
        kept = [r for r in self.records() if step is not None and r.get("step", 0) <= step]
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def last(self, kind: str = "train") -> dict:
        """The last record of `kind`, without its bookkeeping keys ({} if none)."""
        found = [r for r in self.records() if r.get("kind") == kind]
        if not found:
            return {}
        return {k: v for k, v in found[-1].items() if k not in ("kind", "time")}

    def write(self, step: int, metrics: dict, *, kind: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "kind": kind, "time": time.time()}
        record.update({k: _plain(v) for k, v in metrics.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key not in ("step", "time", "kind") and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"{kind}/{key}", value, int(step))
            self.tb.flush()

    def close(self):
        if self.tb is not None:
            self.tb.close()
