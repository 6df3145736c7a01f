"""Metrics to `workdir/metrics.jsonl` (one JSON object a line) and TensorBoard event files.

TensorBoard files are written with tensorboardX, which needs no TensorFlow; only process 0 writes.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import numpy as np


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
