r"""Toy datasets in other people's layouts, cut from the bundled FLAIR #2 tiles: to try the
sequences of docs/own_data.md without the real data (and the fixtures of tests/test_own_data.py).

  python scripts/toy_data.py potsdam /tmp/toy_potsdam     # mmseg: img_dir/{train,val}, ann_dir/
  python scripts/toy_data.py geobench /tmp/toy_geobench   # geo-bench: m-toy/*.hdf5 + partition

Each tile is the top-left `--size` pixels of a bundled tile; the unseen region D004 is the
validation / test split, the other four train. Labels keep FLAIR's codes 1..6 (above 6: 6) with
code 0 in a corner, so `reduce_zero_label` applies as in mmseg's Potsdam.
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import numpy as np

FLAIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     "spectralmoe_jax", "demo_data", "flair2")
UNSEEN = "D004_2021"
GEOBENCH_BANDS = ("Red", "Green", "Blue", "NearInfrared")


def flair_crops(size: int):
    """(name, domain, bands [size, size, 5] uint8, codes [size, size] uint8) per bundled tile."""
    import rasterio
    from rasterio.windows import Window

    for path in sorted(glob.glob(os.path.join(FLAIR, "*_aerial.tif"))):
        window = Window(0, 0, size, size)
        with rasterio.open(path) as src:
            bands = np.moveaxis(src.read(window=window), 0, -1)
        with rasterio.open(path.replace("_aerial", "_mask")) as src:
            codes = np.clip(src.read(1, window=window), 1, 6).astype(np.uint8)
        codes[:4, :4] = 0
        name = os.path.basename(path)[:-len("_aerial.tif")]
        yield name, name[:9], bands, codes


def write_potsdam(out: str, size: int = 128) -> str:
    """R, G, B PNG tiles and code PNGs in mmseg's converted-Potsdam layout."""
    from PIL import Image

    for name, domain, bands, codes in flair_crops(size):
        split = "val" if domain == UNSEEN else "train"
        for folder, array in (("img_dir", bands[..., :3]), ("ann_dir", codes)):
            os.makedirs(os.path.join(out, folder, split), exist_ok=True)
            Image.fromarray(array).save(os.path.join(out, folder, split, f"{name}.png"))
    return out


def write_geobench(out: str, size: int = 128, task: str = "m-toy") -> str:
    """One HDF5 file per tile with a float32 2-D dataset per band and `label`, and the
    splits in `default_partition.json`, as geo-bench's segmentation tasks store them."""
    import h5py

    os.makedirs(os.path.join(out, task), exist_ok=True)
    partition = {"train": [], "valid": [], "test": []}
    for name, domain, bands, codes in flair_crops(size):
        with h5py.File(os.path.join(out, task, f"{name}.hdf5"), "w") as f:
            for i, key in enumerate(GEOBENCH_BANDS):
                f.create_dataset(key, data=bands[..., i].astype(np.float32))
            f.create_dataset("label", data=codes.astype(np.int64))
        partition["test" if domain == UNSEEN else "train"].append(name)
    with open(os.path.join(out, task, "default_partition.json"), "w") as f:
        json.dump(partition, f, indent=1)
    return out


WRITERS = {"potsdam": write_potsdam, "geobench": write_geobench}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("layout", choices=sorted(WRITERS))
    parser.add_argument("out", help="folder to write (created)")
    parser.add_argument("--size", type=int, default=128, help="tile size in pixels (<= 512)")
    args = parser.parse_args()
    print(f"wrote {WRITERS[args.layout](args.out, args.size)}")


if __name__ == "__main__":
    main()
