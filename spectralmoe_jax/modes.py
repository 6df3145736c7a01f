"""One function per `--mode` of the entry point: `(run, paths)`, `run` the parsed `RunConfig`,
`paths` the command line's folders and files (`Paths`)."""

from __future__ import annotations

import dataclasses
import json
import os

from spectralmoe_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Paths:
    workdir: str | None = None  # a run's folder: checkpoints, metrics, default outputs
    input: str | None = None  # predict: scenes; convert: a PyTorch file
    output: str | None = None  # where eval / predict / convert write (default: in workdir)
    checkpoint: str | None = None  # eval / predict: the trained weights to use

    def need_workdir(self, mode: str) -> str:
        if not self.workdir:
            raise UserError(f"--mode {mode} needs --workdir")
        return self.workdir

    def output_in(self, mode: str, default: str) -> str:
        """--output, else `default` inside the workdir."""
        if self.output:
            return self.output
        return os.path.join(self.need_workdir(mode), default)


def fresh(path: str) -> str:
    """`path`, or `path.2`, `path.3`, ... if it exists: no run overwrites another's results."""
    candidate, n = path, 1
    while os.path.exists(candidate):
        n += 1
        candidate = f"{path}.{n}"
    return candidate


def _mesh_and_model(run, *, trained=None, require_trained=False):
    """The mesh of `run.mesh` and the model built into it, every parameter placed as the
    strategy's rule table says (`sharding.py`)."""
    from spectralmoe_jax import sharding
    from spectralmoe_jax.build import build_segmentor

    mesh = sharding.make_mesh(run.mesh)
    place = sharding.param_sharding(mesh, run.mesh.strategy)
    built = build_segmentor(run.model, seed=run.seed, trained=trained, sharding=place,
                            require_trained=require_trained)
    sharding.wait_for_all_processes("model built")
    return mesh, built


def start_training(run, workdir: str):
    """A run's `Training`: the workdir locked, the data checked, the workdir's run compared with
    this one, the mesh, the model with its weights, the optimiser and the state resumed from the
    workdir's checkpoints. The caller ends it with `Training.close()`, also after an error."""
    import jax

    from spectralmoe_jax.data.spec import DataError
    from spectralmoe_jax.data.validate import validate_dataset
    from spectralmoe_jax.io.workdir import WorkdirLock
    from spectralmoe_jax.training.trainer import Training, check_workdir_config

    if "source" not in run.data.splits:
        raise DataError("training reads config.data.splits.source, which this config leaves "
                        "out (or its glob is empty): set --config.data.splits.source.glob")
    need_normalization(run)
    # One trainer per workdir, from before anything is read or written.
    lock = WorkdirLock(workdir).acquire() if jax.process_index() == 0 else None
    try:
        if run.train.validate_data:
            # Bad input is found before anything is written: every tile's header, and the part
            # of each file that shows truncation; `--mode validate` reads every pixel.
            report = validate_dataset(run.data, read_pixels=False, num_threads=8,
                                      raise_errors=False)
            if not report.ok:
                raise DataError(f"{report.one_line()} (found before training; --mode validate "
                                "lists every problem)")
        check_workdir_config(run, workdir)
        mesh, built = _mesh_and_model(run)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return Training(run, workdir, built.model, mesh, lock=lock)


def train(run, paths: Paths):
    workdir = paths.need_workdir("train")
    training = start_training(run, workdir)
    try:
        last = training.run(evaluate_fn=_evaluate_in(run, workdir))
    finally:
        training.close()
    print(json.dumps({"final_train": last}, indent=2))
    return training


def _evaluate_in(run, workdir: str, evaluator=None):
    """(model, step) -> metrics, written to workdir/eval/step_N (no report while training)."""
    from spectralmoe_jax.evaluation.runner import Evaluator

    evaluator = evaluator or Evaluator(run)

    def evaluate(model, step: int, report: bool = False) -> dict:
        out = fresh(os.path.join(workdir, "eval", f"step_{step}"))
        return evaluator.evaluate(model, out, step=step, report=report)

    return evaluate


def _trained_source(run, paths: Paths) -> str | None:
    """--checkpoint, else `model.checkpoint`, else the workdir's checkpoints."""
    from spectralmoe_jax.training.trainer import has_checkpoints

    if paths.checkpoint or run.model.checkpoint:
        source = paths.checkpoint or run.model.checkpoint
        if not os.path.exists(source):
            raise UserError(f"trained weights {source} do not exist (--checkpoint or config "
                            "model.checkpoint)")
        return source
    if paths.workdir and has_checkpoints(paths.workdir):
        return paths.workdir
    return None


def need_normalization(run) -> None:
    """Training and inference on values that were never normalised is a silent failure."""
    if not run.data.normalization_given:
        raise UserError(
            "config.data.mean and config.data.std are not set: --mode stats prints them for "
            "your tiles as flags (for RGB 0-255 tiles ImageNet's are (123.675, 116.28, 103.53) "
            "and (58.395, 57.12, 57.375)); zeros and ones feed the raw values")


def _inference_model(run, paths: Paths, mode: str):
    need_normalization(run)
    source = _trained_source(run, paths)
    if source is None and not run.eval.allow_untrained:
        where = f" (workdir {paths.workdir} holds no checkpoint)" if paths.workdir else ""
        raise UserError(f"--mode {mode}: no trained weights{where}: give --checkpoint (a run's "
                        "workdir, a step folder, a converted folder or a released .pth), or "
                        "--config.eval.allow_untrained=True to use the untrained model")
    _, built = _mesh_and_model(run, trained=source)
    if source is None:
        print(f"--mode {mode}: UNTRAINED model (eval.allow_untrained): random adapter and head")
    return built


def eval(run, paths: Paths):  # noqa: A001 - the mode's name
    from spectralmoe_jax.evaluation.runner import Evaluator

    built = _inference_model(run, paths, "eval")
    step = built.trained_step or 0
    out = fresh(paths.output_in("eval", os.path.join("eval", f"step_{step}")))
    record = Evaluator(run).evaluate(built.model, out, step=step, report=run.eval.report)
    record = dict(record, checkpoint=built.loaded.get("trained", "untrained"), step=step)
    import jax

    if jax.process_index() == 0:  # every process holds the same metrics; one writes them
        with open(os.path.join(out, "metrics.json"), "w") as f:
            json.dump(record, f, indent=2)
        print(f"metrics: {os.path.join(out, 'metrics.json')}")
    return record


def predict(run, paths: Paths):
    from spectralmoe_jax.evaluation.predict import predict_paths

    import jax

    if not paths.input:
        raise UserError("--mode predict needs --input: a GeoTIFF / PNG scene or a folder of them")
    if jax.process_count() > 1:
        raise UserError("--mode predict runs in one process: start it without "
                        "--config.distributed")
    if run.data.format in ("hdf5", "npy"):
        raise UserError(f"--mode predict reads scenes (GeoTIFF, PNG, JPEG); config.data.format "
                        f"{run.data.format!r} tiles are not scenes: --mode eval scores them and "
                        "draws their predictions in its report")
    _check_scene(run, paths.input)
    built = _inference_model(run, paths, "predict")
    return predict_paths(built.model, run, paths.input,
                         fresh(paths.output_in("predict", "predictions")))


def _check_scene(run, path: str) -> None:
    """Before the model is built: the input exists and, for one GeoTIFF, holds the bands."""
    from spectralmoe_jax.data import readers

    if not os.path.exists(path):
        raise UserError(f"--input {path}: no such file or folder")
    if os.path.isfile(path) and path.lower().endswith(readers.GEOTIFF_EXTENSIONS):
        info = readers.raster_info(path, dataclasses.replace(run.data, format="geotiff"))
        readers.check_band_count(path, info.count, run.data)


def export(run, paths: Paths):
    """The trained model as ONNX and jax.export at export.tile_size, checked on a real tile."""
    from spectralmoe_jax.export import export_model

    built = _inference_model(run, paths, "export")
    return export_model(built.model, run, fresh(paths.output_in("export", "export")))


def validate(run, paths: Paths):
    from spectralmoe_jax.data.spec import DataError
    from spectralmoe_jax.data.validate import validate_dataset

    report = validate_dataset(run.data, raise_errors=False)
    print(report)
    if not report.ok:
        raise DataError(f"{report.one_line()} (all listed above)")
    return report


def summary(run, paths: Paths):
    from spectralmoe_jax.summary import write_summary

    return write_summary(run.model, paths.output or paths.need_workdir("summary"))


def convert(run, paths: Paths):
    from spectralmoe_jax.conversion.convert import convert_checkpoint

    if not paths.input:
        raise UserError("--mode convert needs --input: a PyTorch checkpoint file")
    return convert_checkpoint(run, paths.input, paths.output_in("convert", "converted"))


def stats(run, paths: Paths):
    """Per-band statistics of the training split, printed as a config snippet to paste."""
    import numpy as np

    from spectralmoe_jax.data.stats import command_line_flags, config_snippet, dataset_stats

    result = dataset_stats(run.data, "source")
    out = paths.output or paths.need_workdir("stats")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "stats.json"), "w") as f:
        json.dump(result, f, indent=2, default=lambda x: np.asarray(x).tolist())
    print(config_snippet(result))
    print(f"# as flags:\n{command_line_flags(result)}")
    return result


def config(run, paths: Paths):
    """Every field of the config: its value, what the run makes of a None, a one-line doc.
    `run` may be the ConfigDict itself: its fields are printed even when it does not parse,
    and the error follows."""
    from spectralmoe_jax import config_doc
    from spectralmoe_jax.run_config import RunConfig, parse

    source = run.source if isinstance(run, RunConfig) else run
    try:
        parsed = parse(run)
    except UserError:
        print(config_doc.describe(source))
        raise
    text = config_doc.describe(source, parsed)
    print(text)
    return text


def demo(run, paths: Paths):
    """The whole job: evaluate the untrained model on the unseen domain, train, evaluate again
    (with the HTML report), predict the unseen tiles as GeoTIFFs and PNGs."""
    from spectralmoe_jax.evaluation.predict import predict_paths
    from spectralmoe_jax.evaluation.runner import Evaluator

    workdir = paths.need_workdir("demo")
    training = start_training(run, workdir)
    try:
        evaluator = Evaluator(run)
        evaluate = _evaluate_in(run, workdir, evaluator)
        before = None
        if int(training.state.step) == 0:
            before = evaluate(training.model(), 0)
            training.writer.write(0, before, kind="eval")
        training.run(evaluate_fn=evaluate)
        model, step = training.model(), int(training.state.step)
        after = evaluate(model, step, report=run.eval.report)
        training.writer.write(step, after, kind="eval")
    finally:
        training.close()
    source = evaluator.source
    tiles = [path for path in map(source.path, range(len(source))) if os.path.isfile(path)]
    predict_paths(model, run, tiles, os.path.join(workdir, "predictions"))
    summary = {"mIoU_untrained": before and before["mIoU"], "mIoU_trained": after["mIoU"],
               "mAcc_trained": after["mAcc"], "domains": sorted(set(source.domains))}
    print(json.dumps(summary, indent=2))
    with open(os.path.join(workdir, "demo_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def compare(run, paths: Paths):
    """Every method of `compare.methods` trained and evaluated alike, one table (comparison.py)."""
    from spectralmoe_jax.comparison import compare_methods

    return compare_methods(run, paths.need_workdir("compare"))
