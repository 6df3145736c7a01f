r"""A picture of one prediction: the input in true colour, the predicted map, the legend.

  python scripts/prediction_figure.py \
      --image spectralmoe_jax/demo_data/flair2/D004_2021_IMG_000473_aerial.tif \
      --labels runs/demo/predictions/D004_2021_IMG_000473_aerial_pred.tif \
      --out docs/images/prediction_legend.png

The classes, their codes and colours come from the QGIS style predict writes beside the labels
(`<labels>.qml`), so the picture shows what a GIS user sees.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import rasterio

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from spectralmoe_jax.evaluation import gis, visualize  # noqa: E402


def figure(image_path: str, labels_path: str, rgb=(1, 2, 3), scale: int = 1) -> np.ndarray:
    entries = gis.read_qgis_style(os.path.splitext(labels_path)[0] + ".qml")
    with rasterio.open(labels_path) as src:
        stored, nodata = src.read(1), int(src.nodata if src.nodata is not None else 255)
    encoding = gis.LabelEncoding(tuple(v for v, _, _ in entries), nodata,
                                 tuple(n for _, n, _ in entries), tuple(c for _, _, c in entries))
    with rasterio.open(image_path) as src:
        composite = visualize.percentile_stretch(np.moveaxis(src.read(list(rgb)), 0, -1))
    predicted = gis.colorize_stored(stored, encoding)
    if scale > 1:
        composite, predicted = (a[::scale, ::scale] for a in (composite, predicted))
    panel = visualize.panel([composite, predicted], ["input (true colour)", "predicted classes"])
    return gis.with_legend(panel, gis.legend_image(encoding, title="code  class"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", required=True, help="the input scene")
    parser.add_argument("--labels", required=True, help="its predicted label raster")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--rgb", default="1,2,3", help="1-based bands shown as R, G, B")
    parser.add_argument("--scale", type=int, default=1, help="keep every scale-th pixel")
    args = parser.parse_args()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    rgb = tuple(int(b) for b in args.rgb.split(","))
    visualize.save_png(args.out, figure(args.image, args.labels, rgb, args.scale))
    print(f"wrote {args.out} ({os.path.getsize(args.out) // 1024} KB)")


if __name__ == "__main__":
    main()
