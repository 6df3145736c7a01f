"""Input pipeline throughput: tiles/s of the augmented training pipeline on synthetic GeoTIFFs.

    python scripts/benchmark.py --parts input --input-tiles 32 --input-batches 8 --input-workers 0 2

Writes `num_tiles` random 512x512 uint8 GeoTIFFs (4 bands, FLAIR-like: zstd-compressed like the
FLAIR files, or `compress=None`) with block labels into a temporary folder, then times the
released FLAIR augmentation (random short-edge resize 0.6-1.2 x 512, crop 512 with
cat_max_ratio 0.75, flip, photometric distortion, normalisation) for each worker count. The
GPU step we aim for takes 8 tiles per 60 ms, i.e. 133 tiles/s. Prints JSON.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import rasterio
from affine import Affine

from spectralmoe_jax.data import benchmarks, pipeline, sources, transforms

TARGET_TILES_PER_S = 8 / 0.060


def write_tiles(root: str, num_tiles: int, bands: int, size: int, compress: str | None):
    """Smooth random images (band-correlated, like imagery) and 64-pixel block labels."""
    rng = np.random.default_rng(0)
    for i in range(num_tiles):
        coarse = rng.integers(0, 256, (bands, size // 32, size // 32)).astype(np.float32)
        image = np.kron(coarse, np.ones((32, 32), np.float32))
        image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
        label = np.kron(rng.integers(1, 13, (size // 64, size // 64)),
                        np.ones((64, 64), np.int64)).astype(np.uint8)
        profile = dict(driver="GTiff", height=size, width=size, crs="EPSG:2154",
                       transform=Affine(0.2, 0, 1000, 0, -0.2, 2000), compress=compress)
        for suffix, array in (("aerial", image), ("mask", label[None])):
            with rasterio.open(os.path.join(root, f"T{i:04d}_{suffix}.tif"), "w",
                               count=array.shape[0], dtype="uint8", **profile) as dst:
                dst.write(array)


def data_config(root: str, bands: int, size: int):
    config = benchmarks.flair2_demo()
    config.root = root
    config.layout.domain_pattern = None
    config.splits = dict(source=dict(glob="*_aerial.tif", domains=None))
    config.band_names = tuple(f"b{i}" for i in range(bands))
    config.bands = tuple(range(bands))
    config.mean, config.std = (100.0,) * bands, (50.0,) * bands
    config.wavelengths = None
    config.crop_size = (size, size)
    return config


def time_stages(config, num: int = 8) -> dict:
    """CPU milliseconds per tile of reading and of augmenting (one process, one thread), and
    the tiles/s two fully available cores would reach from them. CPU time, unlike wall time,
    does not count waiting for cores other processes hold."""
    source = sources.TileSource(config, "source")
    transform = transforms.TrainTransform(source.spec)
    start = time.process_time()
    elements = [source[i % len(source)] for i in range(num)]
    read = (time.process_time() - start) / num
    start = time.process_time()
    for i, element in enumerate(elements):
        transform(element, np.random.default_rng(i))
    augment = (time.process_time() - start) / num
    return {"read_cpu_ms": round(read * 1e3, 1), "augment_cpu_ms": round(augment * 1e3, 1),
            "two_core_tiles_per_s": round(2.0 / (read + augment), 1)}


def run(num_tiles: int = 32, bands: int = 4, size: int = 512, batch_size: int = 8,
        workers=(0, 2), batches: int = 8, compress: str | None = "zstd") -> dict:
    """Wall-clock tiles/s of the training pipeline for each worker count (after a warm-up
    batch), the CPU cost per tile, and whether the best of them reaches 133 tiles/s."""
    with tempfile.TemporaryDirectory() as root:
        write_tiles(root, num_tiles, bands, size, compress)
        config = data_config(root, bands, size)
        result = {"tiles": num_tiles, "bands": bands, "size": size, "batch_size": batch_size,
                  "compress": compress or "none", "cpus": os.cpu_count(),
                  "load_average": round(os.getloadavg()[0], 2),
                  "per_tile": time_stages(config),
                  "target_tiles_per_s": round(TARGET_TILES_PER_S, 1),
                  "measured_tiles_per_s": {}}
        for num_workers in workers:
            iterator = pipeline.make_train_iterator(
                config, seed=0, batch_size=batch_size, num_workers=num_workers,
                num_threads=2 if num_workers == 0 else 1)
            try:
                next(iterator)
                start = time.perf_counter()
                for _ in range(batches):
                    next(iterator)
                elapsed = time.perf_counter() - start
            finally:
                iterator.close()
            result["measured_tiles_per_s"][f"workers={num_workers}"] = round(
                batches * batch_size / elapsed, 1)
        best = max(list(result["measured_tiles_per_s"].values())
                   + [result["per_tile"]["two_core_tiles_per_s"]])
        result["keeps_up"] = best >= TARGET_TILES_PER_S
        result["shortfall_factor"] = round(TARGET_TILES_PER_S / best, 2)
    return result


def run_part(ctx) -> dict:
    """The harness's 'input' part: the crop, batch and bands of the run's config."""
    o = ctx.options
    return run(num_tiles=o.input_tiles, bands=ctx.model.vfm.config.in_channels, size=ctx.size,
               batch_size=ctx.batch, workers=tuple(o.input_workers), batches=o.input_batches)
