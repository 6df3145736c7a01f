"""One self-contained HTML page per evaluation (images inlined as base64 PNG), plus the same
figures as PNG files, the metrics as JSON and text, and the confusion matrices (.npy, .csv).
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from typing import Sequence

import numpy as np

from spectralmoe_jax.evaluation import visualize
from spectralmoe_jax.evaluation.metrics import (
    CONVENTIONS,
    OVERALL,
    ConfusionAccumulator,
    class_names_or_default,
    format_table,
    metrics_record,
    save_confusion,
)

_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; margin-right: 0.4em;
          vertical-align: middle; border: 1px solid #888; }
figure { margin: 0 0 1.5em; } img { max-width: 100%; image-rendering: pixelated; }
.conventions { max-width: 60em; background: #f6f6f6; padding: 0.6em 1em; }
"""


def write_report(out_dir: str, confusion: ConfusionAccumulator, *,
                 class_names: Sequence[str] | None = None, palette=None,
                 panels: Sequence[tuple[str, np.ndarray]] = (),
                 routing: Sequence[tuple[str, np.ndarray]] = (),
                 title: str = "Evaluation", notes: str | None = None) -> str:
    """Writes `out_dir/report.html` and its companions; returns the HTML path.

    Args:
      confusion: the per-domain confusion matrices of the evaluation.
      class_names, palette: K names and [K, 3] colours (defaults: class_k, `default_palette`).
      panels: (caption, uint8 image) figures, e.g. `visualize.prediction_panel` outputs.
      routing: (caption, uint8 image) expert-routing grids (`visualize.routing_grid`).
      notes: free text shown near the top (e.g. the checkpoint and config).
    """
    num_classes = confusion.num_classes
    names = class_names_or_default(class_names, num_classes)
    palette = visualize.default_palette(num_classes) if palette is None else np.asarray(palette)
    results = confusion.results()
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)

    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(metrics_record(results, names), f, indent=1)
    table = format_table(results, names)
    with open(os.path.join(out_dir, "metrics.txt"), "w") as f:
        f.write(table + "\n\n" + CONVENTIONS + "\n")
    matrices = dict(confusion.matrices)
    matrices[OVERALL] = confusion.overall()
    for domain, conf in matrices.items():
        save_confusion(conf, os.path.join(out_dir, f"confusion_{_slug(domain)}"), names)

    parts = [f"<h1>{_e(title)}</h1>"]
    if notes:
        parts.append(f"<pre>{_e(notes)}</pre>")
    parts.append("<h2>Summary</h2>" + _summary_table(results))
    parts.append(f"<h2>Conventions</h2><p class='conventions'>{_e(CONVENTIONS)}</p>")
    parts.append("<h2>Per class (IoU / Acc, %)</h2>" + _class_table(results, names, palette))
    for heading, figures in (("Predictions", panels), ("Expert routing", routing)):
        if figures:
            parts.append(f"<h2>{heading}</h2>")
        for i, (caption, image) in enumerate(figures):
            png = visualize.to_png(image)
            with open(os.path.join(out_dir, "images", f"{_slug(heading)}_{i:03d}.png"), "wb") as f:
                f.write(png)
            parts.append(f"<figure><img alt='{_e(caption)}' src='data:image/png;base64,"
                         f"{base64.b64encode(png).decode()}'><figcaption>{_e(caption)}"
                         "</figcaption></figure>")
    parts.append("<h2>Confusion matrices</h2><p>Rows: ground truth; columns: prediction; "
                 "cells shaded by the row's share.</p>")
    for domain, conf in matrices.items():
        parts.append(f"<h3>{_e(domain)}</h3>" + _confusion_table(conf, names))
    parts.append(f"<h2>Metrics as text</h2><pre>{_e(table)}</pre>")

    path = os.path.join(out_dir, "report.html")
    with open(path, "w") as f:
        f.write(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_e(title)}</title>"
                f"<style>{_STYLE}</style></head><body>{''.join(parts)}</body></html>\n")
    return path


def _e(text) -> str:
    return html.escape(str(text))


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text.lower())


def _num(value) -> str:
    return "&ndash;" if value is None or math.isnan(value) else f"{value:.2f}"


def _summary_table(results) -> str:
    rows = "".join(f"<tr><td>{_e(d)}</td><td>{_num(r['mIoU'])}</td><td>{_num(r['mAcc'])}</td>"
                   f"<td>{_num(r['aAcc'])}</td><td>{int(r['pixels'].sum())}</td></tr>"
                   for d, r in results.items())
    return ("<table><tr><th>domain</th><th>mIoU</th><th>mAcc</th><th>aAcc</th>"
            f"<th>pixels</th></tr>{rows}</table>")


def _class_table(results, names, palette) -> str:
    head = "".join(f"<th>{_e(d)} IoU</th><th>{_e(d)} Acc</th>" for d in results)
    rows = []
    for k, name in enumerate(names):
        r, g, b = (int(v) for v in palette[k])
        cells = "".join(f"<td>{_num(res['IoU'][k])}</td><td>{_num(res['Acc'][k])}</td>"
                        for res in results.values())
        rows.append(f"<tr><td><span class='swatch' style='background:rgb({r},{g},{b})'></span>"
                    f"{_e(name)}</td>{cells}</tr>")
    return f"<table><tr><th>class</th>{head}</tr>{''.join(rows)}</table>"


def _confusion_table(conf: np.ndarray, names) -> str:
    share = conf / np.maximum(conf.sum(axis=1, keepdims=True), 1)
    head = "".join(f"<th>{_e(n)}</th>" for n in names)
    rows = []
    for name, counts, shares in zip(names, conf, share):
        cells = "".join(f"<td style='background:rgba(30,90,200,{s:.2f})'>{c}</td>"
                        for c, s in zip(counts, shares))
        rows.append(f"<tr><td>{_e(name)}</td>{cells}</tr>")
    return f"<table><tr><th>GT \\ pred</th>{head}</tr>{''.join(rows)}</table>"
