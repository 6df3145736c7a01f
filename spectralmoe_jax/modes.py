"""One function per `--mode` of the entry point: `(config, workdir, input_path, output_path)`."""

from __future__ import annotations

import json
import os


def train(config, workdir, **_):
    from spectralmoe_jax.evaluation.runner import Evaluator
    from spectralmoe_jax.training.trainer import Training

    training = Training(config, workdir)
    evaluator = Evaluator(config, workdir)
    last = training.run(evaluate_fn=evaluator.evaluate_during_training)
    print(json.dumps({"final_train": last}, indent=2))
    return training


def eval(config, workdir, **_):  # noqa: A001 - the mode's name
    from spectralmoe_jax.evaluation.runner import Evaluator, load_model_for_inference

    model, step = load_model_for_inference(config, workdir)
    return Evaluator(config, workdir).evaluate(model, step=step, report=config.eval.report)


def predict(config, workdir, input_path=None, output_path=None, **_):
    from spectralmoe_jax.evaluation.predict import predict_paths
    from spectralmoe_jax.evaluation.runner import load_model_for_inference

    if not input_path:
        raise ValueError("--mode predict needs --input: a GeoTIFF / PNG scene or a folder of them")
    model, _ = load_model_for_inference(config, workdir)
    return predict_paths(model, config, input_path, output_path or os.path.join(workdir, "predictions"))


def export(config, workdir, output_path=None, **_):
    """The workdir's model as ONNX and jax.export at config.export.tile_size, self-checked."""
    from spectralmoe_jax.evaluation.runner import load_model_for_inference
    from spectralmoe_jax.export import export_model

    model, _ = load_model_for_inference(config, workdir)
    return export_model(model, config, output_path or os.path.join(workdir, "export"))


def validate(config, workdir, **_):
    from spectralmoe_jax.data.validate import validate_dataset

    report = validate_dataset(config.data)
    print(report)
    return report


def summary(config, workdir, **_):
    from spectralmoe_jax.summary import write_summary

    return write_summary(config.model, workdir)


def convert(config, workdir, input_path=None, output_path=None, **_):
    from spectralmoe_jax.conversion.convert import convert_checkpoint

    if not input_path:
        raise ValueError("--mode convert needs --input: a PyTorch checkpoint file")
    return convert_checkpoint(config, input_path, output_path or os.path.join(workdir, "converted"))


def stats(config, workdir, **_):
    """Per-band statistics of the training split, printed as a config snippet to paste."""
    import numpy as np

    from spectralmoe_jax.data.sources import make_source
    from spectralmoe_jax.data.spec import dataset_spec
    from spectralmoe_jax.data.stats import compute_band_stats, config_snippet

    spec = dataset_spec(config.data)
    source = make_source(spec, "source")
    info = np.iinfo(spec.dtype) if np.issubdtype(np.dtype(spec.dtype), np.integer) else None
    value_range = (0.0, float(info.max) + 1) if info else tuple(config.data.get("value_range", (0.0, 1.0)))
    bins = int(min(value_range[1] - value_range[0], 4096)) if info else 4096
    def examples():
        for i in range(len(source)):
            raw = source.read_raw(i)
            valid = None if raw["nodata"] is None else ~raw["nodata"]
            yield {"image": raw["image"]} if valid is None else {"image": raw["image"], "valid": valid}

    raw = examples()
    result = compute_band_stats(raw, value_range=value_range, bins=bins)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "stats.json"), "w") as f:
        json.dump(result, f, indent=2, default=lambda x: np.asarray(x).tolist())
    print(config_snippet(result))
    return result


def demo(config, workdir, **_):
    """The whole job: evaluate the untrained model on the unseen domain, train, evaluate again
    (with the HTML report), predict the unseen tiles as GeoTIFFs and PNGs."""
    from spectralmoe_jax.data.pipeline import make_eval_source
    from spectralmoe_jax.evaluation.predict import predict_paths
    from spectralmoe_jax.evaluation.runner import Evaluator
    from spectralmoe_jax.training.trainer import Training

    training = Training(config, workdir)
    evaluator = Evaluator(config, workdir)
    start = int(training.state.step)
    before = evaluator.evaluate(training.model(), step=start, report=False) if start == 0 else None
    training.run(evaluate_fn=evaluator.evaluate_during_training)
    model = training.model()
    after = evaluator.evaluate(model, step=int(training.state.step), report=config.eval.report)
    source = make_eval_source(config.data, config.eval.split)
    tiles = [source.source.path(i) for i in range(len(source))]
    predict_paths(model, config, tiles, os.path.join(workdir, "predictions"))
    summary = {"mIoU_untrained": before and before["mIoU"], "mIoU_trained": after["mIoU"],
               "mAcc_trained": after["mAcc"], "domains": sorted(set(source.domains))}
    print(json.dumps(summary, indent=2))
    with open(os.path.join(workdir, "demo_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary
