"""Shared test settings: float32 parity needs full-precision matmuls on every backend."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax
import numpy as np
import pytest

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def np_rng():
  return np.random.default_rng(0)


def relative_error(ours, reference) -> float:
  """max |a - b| / max |b|: the parity measure used throughout the tests."""
  ours = np.asarray(ours, dtype=np.float64)
  reference = np.asarray(reference, dtype=np.float64)
  return float(np.max(np.abs(ours - reference)) / (np.max(np.abs(reference)) + 1e-12))
