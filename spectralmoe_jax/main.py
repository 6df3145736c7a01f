r"""The one entry point.

  python -m spectralmoe_jax.main --config configs/demo.py --workdir runs/demo --mode demo
  python -m spectralmoe_jax.main --config configs/flair.py:vits --workdir runs/flair --mode train \
      --config.data.root=/data/flair --config.train.batch_size=16
  python -m spectralmoe_jax.main --config configs/custom.py --mode config   # every field, documented

Modes:
  train     train (resuming from the workdir's last checkpoint), evaluating every eval_every steps
  eval      evaluate trained weights (--checkpoint, else the workdir's) on the target domains
  predict   label maps for --input (GeoTIFF / PNG scenes or a folder) in the dataset's codes,
            with QGIS style, legend, colour preview; optional probabilities and polygons
  export    the model as ONNX (QGIS Deepness, onnxruntime) and jax.export, checked on a tile
  validate  check the dataset against the config (bands, labels, sizes, corrupt files)
  summary   parameter counts by part and module, total and trainable -> workdir/summary.json
  convert   PyTorch checkpoint (--input) -> a converted folder (--output, default workdir/converted)
  stats     per-band mean / std / percentiles of the dataset, as a config snippet
  config    the resolved config: every field, its value and a one-line doc
  demo      train, then evaluate and predict: the whole job on the configured data
  compare   train and evaluate every method of compare.methods alike -> workdir/comparison.md

Configs: configs/custom.py (your own tiles: see docs/own_data.md), the paper's benchmarks
(flair, five_billion_pixels, gid_cross_region, whu_ohs, loveda, potsdam_vaihingen,
openearthmap) and demo. A benchmark or custom config takes a variant after a colon, words
joined by commas (configs/flair.py:rein,vits):
{variants}
Any field is set with --config.FIELD=VALUE; `--mode config` lists them with what each does.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

MODES = ("train", "eval", "predict", "export", "validate", "summary", "convert", "stats",
         "config", "demo", "compare")

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, configs/NAME.py[:VARIANT] (variants above; "
    "--mode config lists every field).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "A run's folder: checkpoints, metrics, outputs.")
_MODE = flags.DEFINE_enum("mode", "train", MODES, "What to do.")
_INPUT = flags.DEFINE_string("input", None, "predict: a GeoTIFF or a folder; convert: a PyTorch file.")
_OUTPUT = flags.DEFINE_string("output", None, "eval / predict / export / convert: where to "
                              "write (default: inside the workdir; an existing folder is never "
                              "reused).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "eval / predict / export: trained weights: "
                                  "a run's workdir or step folder, a converted folder, a released "
                                  ".pth.")
_COMPILE_CACHE = flags.DEFINE_string(
    "compile_cache", None, "Folder of the persistent XLA compilation cache (default: "
    "$JAX_COMPILATION_CACHE_DIR, else ~/.cache/spectralmoe_jax/xla); 'off' to compile anew.")
flags.mark_flags_as_required(["config"])


def fail(message: str) -> None:
    """One line on stderr, exit status 1: what the user must fix, without a traceback."""
    message = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from spectralmoe_jax.errors import UserError

    try:
        from spectralmoe_jax import compile_cache, modes, run_config

        paths = modes.Paths(workdir=_WORKDIR.value, input=_INPUT.value, output=_OUTPUT.value,
                            checkpoint=_CHECKPOINT.value)
        if _MODE.value == "config":  # prints the fields even when the config does not parse
            modes.config(_CONFIG.value, paths)
            return
        run = run_config.parse(_CONFIG.value)
        compile_cache.setup(_COMPILE_CACHE.value)
        import jax

        if run.distributed:
            jax.distributed.initialize()
        getattr(modes, _MODE.value)(run, paths)
    except UserError as error:
        # Bad input (config, data, checkpoints, workdir, a diverged run): the message says what
        # and where; a stack trace would only hide it.
        fail(f"({type(error).__name__}) {error}")
    except OSError as error:
        from spectralmoe_jax.errors import environment_message

        message = environment_message(error)
        if message is None:
            raise
        fail(f"({type(error).__name__}) {message}")


def parse_flags(argv):
    """absl's flag parsing, with a bad config override (a key the config does not have, a value
    of the wrong type) or a config file that fails to load reported as one line."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        message = str(error)
        if "Error whilst parsing config file" in message:  # get_config raised: its last line
            message = [line for line in message.splitlines() if line.strip()][-1]
        fail(message)
    except (AttributeError, KeyError) as error:
        fail(config_override_error(argv) or str(error).splitlines()[0])


def config_override_error(argv) -> str | None:
    """'--config.train.learning_rat: unknown config key config.train.learning_rat; did you mean
    'learning_rate'?' for the first override whose path the config does not have."""
    from spectralmoe_jax.errors import unknown_key

    files = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    files += [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    if not files:
        return None
    from ml_collections.config_flags.config_flags import ConfigFileFlagParser

    config = ConfigFileFlagParser("config").parse(files[-1])
    for flag in (a.split("=", 1)[0] for a in argv if a.startswith("--config.")):
        node, path = config, flag[len("--config."):].split(".")
        for depth, key in enumerate(path):
            if not hasattr(node, "keys") or key not in node.keys():
                known = list(node.keys()) if hasattr(node, "keys") else []
                return f"{flag}: {unknown_key(key, known, '.'.join(['config', *path[:depth]]))}"
            node = node[key]
    return None


def cli():
    from spectralmoe_jax import config_lib

    # --help prints this module's docstring: the variants from where they are defined.
    module = sys.modules[__name__]
    module.__doc__ = __doc__.replace("{variants}", config_lib.variant_help(indent="  "))
    logging.set_verbosity(logging.WARNING)
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    sys.exit(cli())
