"""Evaluation with a SpectralMoE segmentor: the `eval` mode (the `predict` mode: predict.py).

Binds the model-agnostic pieces (inference, evaluator, metrics, report) to the segmentor:
its `predict_fn` is Mask2Former's semantic inference (mask logits upsampled to the input size,
then softmax(class)[:-1] x sigmoid(mask), as mmseg's `Mask2FormerHead.predict`).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spectralmoe_jax.evaluation import metrics as metrics_lib
from spectralmoe_jax.evaluation import visualize
from spectralmoe_jax.evaluation.evaluator import evaluate
from spectralmoe_jax.evaluation.inference import make_infer_fn
from spectralmoe_jax.models.mask2former import semantic_inference


def semantic_scores(model, images):
    """images [B, H, W, C] (normalised) -> class scores [B, H, W, K] of the last decoder layer."""
    out = model(images, train=False)
    masks = out["mask_logits"][-1]  # [B, Q, h, w]
    b, q = masks.shape[:2]
    # Upsampling: antialias changes nothing, and without it the resize exports to ONNX.
    masks = jax.image.resize(masks.astype(jnp.float32), (b, q, *images.shape[1:3]), "linear",
                             antialias=False)
    return semantic_inference(out["class_logits"][-1].astype(jnp.float32), masks)


@functools.lru_cache(maxsize=4)
def state_predict_fn(graphdef):
    """(state, images) -> scores for one model structure: the weights stay an argument."""
    return lambda state, images: semantic_scores(nnx.merge(graphdef, state), images)


def make_model_infer(graphdef, eval_config, multiple: int):
    """jitted (state, images) -> scores of `config.eval` (whole or sliding windows).

    The model state is an argument, not a constant: one compilation serves every checkpoint
    evaluated during a run."""
    def infer(state, images):
        predict = lambda x: semantic_scores(nnx.merge(graphdef, state), x)  # noqa: E731
        return make_infer_fn(predict, mode=eval_config.mode, window=eval_config.window,
                             stride=eval_config.stride, batch_size=eval_config.batch_size,
                             patch_multiple=multiple, flip=eval_config.flip)(images)

    return jax.jit(infer)


def patch_multiple(model) -> int:
    """Inputs must divide into patches, and the stride-32 level halves the patch grid."""
    return 2 * model.vfm.config.patch_size


def routing_maps(model, image: np.ndarray) -> np.ndarray | None:
    """Top-1 expert of every patch in every layer [L, h, w] for one normalised image."""
    if model.adapter is None or not model.adapter.config.routed:
        return None
    multiple = patch_multiple(model)
    h, w = (s - s % multiple for s in image.shape[:2])
    graphdef, state = nnx.split(model)
    return np.asarray(_routing_fn(graphdef)(state, jnp.asarray(image[None, :h, :w]))[0])


@functools.lru_cache(maxsize=4)
def _routing_fn(graphdef):
    return jax.jit(lambda state, x: nnx.merge(graphdef, state)(x, train=False)["expert_v"])


class Evaluator:
    """Per-domain mIoU / mAcc / IoU of a model on `eval.split`, with the confusion matrix and
    report written to a folder. It returns the metrics: the run's one metric writer records
    them."""

    def __init__(self, run):
        self.config = run
        self._source = None
        self._infer = None  # (graphdef, jitted infer), compiled once per model structure

    @property
    def source(self):
        if self._source is None:
            from spectralmoe_jax.data.pipeline import make_eval_source

            self._source = make_eval_source(self.config.data, self.config.eval.split)
        return self._source

    def evaluate(self, model, out_dir: str, *, step: int = 0, report: bool = True) -> dict:
        data = self.config.data
        graphdef, state = nnx.split(model)
        if self._infer is None or self._infer[0] != graphdef:
            self._infer = graphdef, make_model_infer(graphdef, self.config.eval, patch_multiple(model))
        infer = functools.partial(self._infer[1], state)
        result = evaluate(infer, self.source, num_classes=data.num_classes,
                          ignore_index=data.ignore_index,
                          samples_per_domain=2 if report else 0, progress=True)
        results = result.results()
        names = list(data.class_names)
        print(metrics_lib.format_table(results, names))
        record = metrics_lib.metrics_record(results, names)
        os.makedirs(out_dir, exist_ok=True)
        metrics_lib.save_confusion(result.confusion.overall(), os.path.join(out_dir, "confusion"), names)
        if report:
            self.write_report(model, result, out_dir, step)
        return record

    def write_report(self, model, result, out_dir: str, step: int) -> str:
        from spectralmoe_jax.evaluation.report import write_report

        data = self.config.data
        bands = data.rgb_bands or (0, 1, 2)
        panels, routing = [], []
        for sample in result.samples:
            image = visualize.prediction_panel(sample["image"], sample["label"], sample["pred"],
                                               data.palette, bands=bands, name=sample["name"])
            visualize.save_png(os.path.join(out_dir, f"{sample['name']}_panel.png"), image)
            panels.append((f"{sample['domain']} / {sample['name']}", image))
            experts = routing_maps(model, sample["image"])
            if experts is not None:
                grid = visualize.routing_grid(experts, model.adapter.config.num_experts)
                routing.append((sample["name"], grid))
        path = write_report(out_dir, result.confusion, class_names=list(data.class_names),
                            palette=data.palette, panels=panels, routing=routing,
                            title=f"{data.name}: evaluation at step {step}")
        print(f"report: {path}")
        return path
