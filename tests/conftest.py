"""Shared test settings: float32 parity needs full-precision matmuls on every backend."""
import os

import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Compiled programs are cached on disk: the engine tests compile the same tiny step in several
# processes (subprocess tests inherit these variables).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "spectralmoe_jax_test_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "2")
# Tests run tiny shapes: LLVM's optimisation passes cost far more than they save (halves the
# compile time of the train step; the numerics are the same IEEE float32 operations).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                               " --xla_llvm_disable_expensive_passes=true").strip()

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



def jaxpr_equations(jaxpr):
    """Every equation of a jaxpr, those of nested jaxprs (scan, checkpoint, pjit bodies) too."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    yield from jaxpr_equations(sub)


def primitive_names(fn, *args) -> list[str]:
    """The primitive of every equation in `fn`'s jaxpr, nested ones included."""
    return [eqn.primitive.name for eqn in jaxpr_equations(jax.make_jaxpr(fn)(*args).jaxpr)]
