r"""The one entry point.

  python -m spectralmoe_jax.main --config configs/demo.py --workdir runs/demo --mode demo
  python -m spectralmoe_jax.main --config configs/flair.py --workdir runs/flair --mode train \
      --config.data.root=/data/FLAIR --config.train.batch_size=16

Modes:
  train     train (resuming from the workdir's last checkpoint), evaluating every eval_every steps
  eval      evaluate the workdir's checkpoint (or the untrained model) on the target domains
  predict   label maps for --input (GeoTIFF / PNG scenes or a folder) in the dataset's codes,
            with QGIS style, legend, colour preview; optional probabilities and polygons
  export    the model as ONNX (QGIS Deepness, onnxruntime) and jax.export, checked on a tile
  validate  check the dataset against the config (bands, labels, sizes, corrupt files)
  summary   parameter counts by module, total and trainable -> workdir/summary.json
  convert   PyTorch checkpoint (--input) -> Orbax parameters in the workdir
  stats     per-band mean / std / percentiles of the dataset, as a config snippet
  demo      train, then evaluate and predict: the whole job on the configured data
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

MODES = ("train", "eval", "predict", "export", "validate", "summary", "convert", "stats", "demo")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and outputs.")
_MODE = flags.DEFINE_enum("mode", "train", MODES, "What to do.")
_INPUT = flags.DEFINE_string("input", None, "predict: a GeoTIFF or a folder; convert: a PyTorch file.")
_OUTPUT = flags.DEFINE_string("output", None,
                              "predict / convert / export: where to write (default: workdir).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax

    if _CONFIG.value.get("distributed", False):
        jax.distributed.initialize()
    from spectralmoe_jax import modes

    run = getattr(modes, _MODE.value)
    try:
        run(_CONFIG.value, _WORKDIR.value, input_path=_INPUT.value, output_path=_OUTPUT.value)
    except user_errors() as error:
        # Bad input (data, checkpoints, workdir, a diverged run): the message says what and
        # where; a stack trace would only hide it.
        print(f"error ({type(error).__name__}): {error}", file=sys.stderr)
        sys.exit(1)


def user_errors() -> tuple[type[Exception], ...]:
    from spectralmoe_jax.conversion.rules import ConversionError
    from spectralmoe_jax.conversion.torch_io import CheckpointReadError
    from spectralmoe_jax.data.spec import DataError
    from spectralmoe_jax.training.checkpoint import CheckpointError
    from spectralmoe_jax.training.trainer import NonFiniteLossError

    return (DataError, ConversionError, CheckpointReadError, CheckpointError, NonFiniteLossError,
            FileNotFoundError)


def cli():
    logging.set_verbosity(logging.WARNING)
    app.run(main)


if __name__ == "__main__":
    sys.exit(cli())
