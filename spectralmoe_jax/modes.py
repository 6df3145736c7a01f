"""One function per `--mode` of the entry point: `(config, workdir, input_path, output_path)`."""

from __future__ import annotations

import json
import os


def train(config, workdir, **_):
    from spectralmoe_jax.evaluation.evaluator import Evaluator
    from spectralmoe_jax.training.trainer import Training

    training = Training(config, workdir)
    evaluator = Evaluator(config, workdir)
    last = training.run(evaluate_fn=evaluator.evaluate_during_training)
    print(json.dumps({"final_train": last}, indent=2))
    return training


def eval(config, workdir, **_):  # noqa: A001 - the mode's name
    from spectralmoe_jax.evaluation.evaluator import Evaluator, load_model_for_inference

    model, step = load_model_for_inference(config, workdir)
    return Evaluator(config, workdir).evaluate(model, step=step, report=config.eval.report)


def predict(config, workdir, input_path=None, output_path=None, **_):
    from spectralmoe_jax.evaluation.evaluator import load_model_for_inference, predict_paths

    if not input_path:
        raise ValueError("--mode predict needs --input: a GeoTIFF scene or a folder of them")
    model, _ = load_model_for_inference(config, workdir)
    return predict_paths(model, config, input_path, output_path or os.path.join(workdir, "predictions"))


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
    from spectralmoe_jax.data.stats import dataset_statistics_for_config

    return dataset_statistics_for_config(config.data, workdir)


def demo(config, workdir, **_):
    """The whole job: train, evaluate on the unseen domain, predict its tiles, write a report."""
    train(config, workdir)
    metrics = eval(config, workdir)
    return metrics
