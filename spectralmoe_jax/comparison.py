"""`--mode compare`: the paper's Table 3 on one benchmark config. Every method of
`compare.methods` is trained and evaluated alike, and one table says what each costs and gives.

  python -m spectralmoe_jax.main --config configs/flair.py --workdir runs/flair_compare \
      --mode compare --config.data.root=/data/flair --config.model.vfm.checkpoint=...

Each method is the config with that method's variant applied (`config_lib.apply_method`, so the
config may start from any variant; the method's own fields win), trained in `workdir/<method>/`
with the usual checkpoints and metrics, then evaluated on `eval.split`. A method whose
`final_metrics.json` exists is not run again, and one cut off mid-way resumes from its last
checkpoint: a long comparison survives preemption. The same seed gives every method the same
data order. The table (`workdir/comparison.md`, `.json`, `.csv`) has one row per method:
adapter, head and trainable parameters (shapes, as `--mode summary`), the paper's count, the
median time of a logged training step after the first, images per second, mIoU and mAcc per
target domain and overall, the final training loss.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import statistics

from spectralmoe_jax.errors import ConfigError

# The paper's Table 3 (SPEC 5.3), adapter parameters in millions, by backbone shape.
PAPER_COUNTS = {
    "lora": {(1024, 24): 0.79}, "adaptformer": {(1024, 24): 3.22}, "vpt": {(1024, 24): 3.69},
    "set": {(1024, 24): 6.13, (1280, 32): 9.21}, "fada": {(1024, 24): 11.65, (1280, 32): 16.59},
    "rein": {(1024, 24): 2.99, (1280, 32): 4.51},
    "depthforge": {(1024, 24): 2.99, (1280, 32): 4.51},
    "spectralmoe": {(1024, 24): 5.74, (1280, 32): 10.29},
}
# Counts the released code does not reach (docs/methods.md): marked in the table.
NOT_RELEASED = ("set", "fada")
FINAL = "final_metrics.json"


def method_run(run, method: str):
    """The RunConfig of `run` with `method` applied."""
    from spectralmoe_jax import config_lib
    from spectralmoe_jax.run_config import parse

    if method not in config_lib.METHODS:
        raise ConfigError(f"config compare.methods: unknown method {method!r}; known: "
                          f"{', '.join(config_lib.METHODS)}")
    source = copy.deepcopy(run.source)
    return parse(config_lib.apply_method(source, method))


def training_log(workdir: str) -> tuple[float | None, float | None]:
    """(median seconds per step over the intervals between logged training records, the last
    logged loss). The first record's window holds the compilation and is not an interval."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return None, None
    with open(path) as f:
        records = sorted((r["step"], r["time"], r["loss"]) for r in map(json.loads, f)
                         if r.get("kind") == "train")
    rates = [(t1 - t0) / (s1 - s0)
             for (s0, t0, _), (s1, t1, _) in zip(records, records[1:]) if s1 > s0]
    return (statistics.median(rates) if rates else None), (records[-1][2] if records else None)


def parameter_row(model_section) -> dict:
    from spectralmoe_jax.summary import parameter_counts

    counts = parameter_counts(model_section, depth=1)
    part = lambda name: counts["modules"].get(name, {}).get("trainable", 0)  # noqa: E731
    return {"adapter": part("adapter"), "head": part("head"), "trainable": counts["trainable"]}


def train_and_evaluate(run, workdir: str, method: str) -> dict:
    """One method's row: trained (or resumed) in `workdir`, evaluated on `eval.split`."""
    from spectralmoe_jax import modes
    from spectralmoe_jax.evaluation.runner import Evaluator

    done = os.path.join(workdir, FINAL)
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    training = modes.start_training(run, workdir)
    training.run()
    step = int(training.state.step)
    metrics = Evaluator(run).evaluate(
        training.model(), modes.fresh(os.path.join(workdir, "eval", f"step_{step}")), step=step,
        report=False)
    training.writer.write(step, metrics, kind="eval")
    training.close()
    seconds, loss = training_log(workdir)
    row = {"method": method, **parameter_row(run.model), "steps": step,
           "final_loss": loss, "step_seconds": seconds,
           "images_per_second": run.train.batch_size / seconds if seconds else None,
           "metrics": metrics}
    with open(done, "w") as f:
        json.dump(row, f, indent=2)
    return row


def paper_count(method: str, vfm) -> float | None:
    return PAPER_COUNTS.get(method, {}).get((vfm.width, vfm.depth))


def domains_of(rows) -> list[str]:
    names = {key.split("/")[0] for row in rows for key in row["metrics"] if key.endswith("/mIoU")}
    return sorted(names)


def table_rows(rows, vfm) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells of the comparison table."""
    domains = domains_of(rows)
    header = ["method", "adapter (M)", "head (M)", "trainable (M)", "Table 3 (M)", "step (ms)",
              "img/s"]
    header += [f"{d} {k}" for d in domains for k in ("mIoU", "mAcc")]
    header += ["mIoU", "mAcc", "final loss", "steps"]
    number = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    cells = []
    for row in rows:
        paper = paper_count(row["method"], vfm)
        paper_cell = number(paper, ".2f") + ("*" if paper and row["method"] in NOT_RELEASED else "")
        seconds = row["step_seconds"]
        metric = row["metrics"].get
        line = [row["method"], number(row["adapter"] / 1e6, ".3f"), number(row["head"] / 1e6, ".3f"),
                number(row["trainable"] / 1e6, ".3f"), paper_cell,
                number(None if seconds is None else 1e3 * seconds, ".1f"),
                number(row["images_per_second"], ".2f")]
        line += [number(metric(f"{d}/{k}"), ".4f") for d in domains for k in ("mIoU", "mAcc")]
        line += [number(metric("mIoU"), ".4f"), number(metric("mAcc"), ".4f"),
                 number(row["final_loss"], ".4f"), str(row["steps"])]
        cells.append(line)
    return header, cells


def markdown(header, cells, note: str) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(line) + " |" for line in cells]
    return "\n".join(lines) + "\n\n" + note + "\n"


def compare_methods(run, workdir: str, methods=None) -> list[dict]:
    """Trains and evaluates every method, writes workdir/comparison.{md,json,csv}; the rows."""
    methods = tuple(methods or run.compare.methods)
    if not methods:
        raise ConfigError("config compare.methods is empty: name the methods to compare")
    runs = {method: method_run(run, method) for method in methods}  # every config error first
    rows = [train_and_evaluate(runs[m], os.path.join(workdir, m), m) for m in methods]
    vfm = run.model.segmentor().vfm
    header, cells = table_rows(rows, vfm)
    note = (f"{run.data.name}, split {run.eval.split!r}; VFM {run.model.vfm.preset} "
            f"(width {vfm.width}, {vfm.depth} blocks). Parameters: trainable, from shapes. "
            f"Step: median over logged intervals after the first. * The paper's count, which "
            f"the released code does not reach (docs/methods.md).")
    text = markdown(header, cells, note)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "comparison.md"), "w") as f:
        f.write(text)
    with open(os.path.join(workdir, "comparison.json"), "w") as f:
        json.dump({"rows": rows, "note": note}, f, indent=2)
    with open(os.path.join(workdir, "comparison.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(cells)
    print(text)
    return rows
