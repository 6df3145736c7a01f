"""The composition root: the segmentor of a run, with every part's weights.

  1. open the checkpoints the config names (frozen VFM and depth encoder; the trained adapter and
     head from `model.checkpoint` or a run), learning what each implies about the model;
  2. resolve the model config (preset < implied by a checkpoint < set in the config) and build
     the segmentor abstractly (`nnx.eval_shape`: shapes only, nothing allocated);
  3. convert every checkpoint against that model, checking names and shapes;
  4. initialise only what no checkpoint fills, in one compiled call whose unused initialisers
     XLA drops, directly into each parameter's sharding when a mesh is given.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import numpy as np
from absl import logging
from flax import nnx

from spectralmoe_jax.conversion import adapter as adapter_conversion
from spectralmoe_jax.conversion import load
from spectralmoe_jax.conversion.rules import ConversionError, check_params, flatten_state
from spectralmoe_jax.models.segmentor import Segmentor, SegmentorConfig, trained_variables

PARTS = ("vfm", "depth")  # frozen backbones with their own weights


@dataclasses.dataclass
class Built:
    model: Segmentor
    config: SegmentorConfig
    loaded: dict[str, str]  # part -> the file its weights came from
    trained_step: int | None  # the training step of trained weights read from a run


def build_segmentor(model_section, *, seed: int = 0, trained: str | None = None,
                    sharding: Callable | None = None, require_trained: bool = False) -> Built:
    """The segmentor of `model_section` (`RunConfig.model`) with its weights.

    trained: where the adapter and head come from, overriding `model.checkpoint` (a released
      `.pth`, a converted folder, a run's workdir or step folder).
    sharding: (path, abstract leaf) -> jax.sharding.Sharding for every parameter; None keeps
      everything on the default device.
    require_trained: a missing trained source is an error (evaluation and prediction).
    """
    opened: dict[str, load.Opened] = {}
    implied: dict[str, dict] = {}
    for part in PARTS:
        backbone = getattr(model_section, part)
        if backbone.enabled and backbone.weights.checkpoint:
            w = backbone.weights
            opened[part] = load.open_checkpoint(w.checkpoint, scheme=w.checkpoint_scheme,
                                                prefix=w.checkpoint_prefix)
            if opened[part].holds == "trained" or opened[part].kind == "run":
                raise ConversionError(f"{w.checkpoint}: holds a trained adapter and head, not "
                                      f"a backbone (config model.{part}.checkpoint)")
            implied[part] = load.backbone_implied(opened[part],
                                                  backbone.vit(model_section.dtype))
    trained = trained or model_section.checkpoint
    if trained:
        opened["trained"] = load.open_checkpoint(trained)
        if opened["trained"].holds in PARTS:
            raise ConversionError(f"{trained}: holds a converted {opened['trained'].holds} "
                                  "backbone, not a trained adapter and head")
        implied["adapter"] = dict(opened["trained"].implied)
        adapter_conversion.log_implied(trained, implied["adapter"], model_section.adapter)
    elif require_trained:
        raise ConversionError("no trained checkpoint: give --checkpoint (a run's workdir, a step "
                              "folder, a converted folder or a released .pth)")
    config = model_section.segmentor(implied)
    abstract = nnx.eval_shape(lambda: Segmentor(config, rngs=nnx.Rngs(seed)))
    ours = flatten_state(nnx.state(abstract))
    filled: dict[str, np.ndarray] = {}
    for part in PARTS:
        if part in opened:
            module = getattr(abstract, part)
            params = load.backbone_params(opened[part], module.config,
                                          stem=getattr(model_section, part).weights.stem)
            check_params(params, {k[len(part) + 1:]: v for k, v in ours.items()
                                  if k.startswith(part + "/")},
                         where=f"{opened[part].path} ({part})")
            filled.update({f"{part}/{k}": v for k, v in params.items()})
    if "trained" in opened:
        params = load.trained_params(opened["trained"], abstract)
        # A file may hold one trained part (a released adapter for a new head): the others keep
        # their initialisation, said once.
        trained_vars = trained_variables(ours)
        parts = sorted({k.split("/")[0] for k in params})
        absent = sorted({k.split("/")[0] for k in trained_vars} - set(parts))
        if absent:
            logging.warning("%s holds no %s: initialised", opened["trained"].path, " or ".join(absent))
        check_params(params, {k: v for k, v in trained_vars.items() if k.split("/")[0] in parts},
                     where=f"{opened['trained'].path} ({' + '.join(parts)})")
        filled.update(params)
    model = materialise(config, seed, abstract, filled, sharding)
    return Built(model, config, {p: o.path for p, o in opened.items()},
                 opened["trained"].step if "trained" in opened else None)


def materialise(config: SegmentorConfig, seed: int, abstract: Segmentor,
                filled: Mapping[str, np.ndarray], sharding: Callable | None = None) -> Segmentor:
    """The abstract model with `filled` arrays and every other variable initialised as
    `Segmentor(config, rngs=nnx.Rngs(seed))` would (the same random values)."""
    graphdef, state = nnx.split(abstract)
    leaves = flatten_state(state)
    place = sharding or (lambda path, leaf: None)
    shardings = {path: place(path, leaf) for path, leaf in leaves.items()}
    todo = sorted(set(leaves) - set(filled))

    def initialise():
        fresh = flatten_state(nnx.state(Segmentor(config, rngs=nnx.Rngs(seed))))
        return {path: fresh[path] for path in todo}

    initialised = {}
    if todo:
        out = None if sharding is None else {path: shardings[path] for path in todo}
        initialised = jax.jit(initialise, out_shardings=out)()
    values = dict(initialised)
    for path, array in filled.items():
        leaf = leaves[path]
        array = np.asarray(array, dtype=leaf.dtype)
        values[path] = (jax.device_put(array, shardings[path]) if shardings[path] is not None
                        else jax.numpy.asarray(array))

    def fill(path, leaf):
        return values["/".join(str(getattr(p, "key", p)) for p in path)]

    pure = jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def abstract_segmentor(model_section, seed: int = 0) -> Segmentor:
    """Shapes only (summary, restore templates): nothing is allocated or read."""
    config = model_section.segmentor()
    return nnx.eval_shape(lambda: Segmentor(config, rngs=nnx.Rngs(seed)))
