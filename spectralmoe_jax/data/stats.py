"""Streamed per-band statistics of a dataset: mean, std and percentiles in constant memory.

Mean and variance are merged batch by batch in float64 with Chan et al.'s parallel update
(the pairwise form of Welford's algorithm), so they are exact to rounding whatever the dataset
size. Percentiles come from a fixed-bin histogram per band over a declared value range,
interpolated linearly inside the bin that holds the quantile: the error is below one bin width.
Values outside the range are counted in the end bins (and reported as clipped).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

DEFAULT_PERCENTILES = (1.0, 2.0, 50.0, 98.0, 99.0)


class BandStats:
    """Accumulates per-band count, mean, M2 (sum of squared deviations) and a histogram."""

    def __init__(self, num_bands: int, value_range: tuple[float, float], bins: int = 4096):
        low, high = map(float, value_range)
        if not high > low:
            raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
        self.num_bands, self.low, self.high, self.bins = num_bands, low, high, bins
        self.count = 0
        self.mean = np.zeros(num_bands, np.float64)
        self.m2 = np.zeros(num_bands, np.float64)
        self.minimum = np.full(num_bands, np.inf)
        self.maximum = np.full(num_bands, -np.inf)
        self.histogram = np.zeros((num_bands, bins), np.int64)
        self.clipped = 0       # band values outside value_range, counted in the end bins
        self.excluded = 0      # pixels left out: masked, or non-finite in some band

    def update(self, image, valid=None) -> None:
        """Adds an image [..., C] (any leading shape); `valid` [...] bool selects pixels."""
        image = np.asarray(image)
        if image.ndim < 2 or image.shape[-1] != self.num_bands:
            raise ValueError(f"image of shape {image.shape}: expected [..., {self.num_bands}] "
                             f"(bands last)")
        pixels = image.reshape(-1, self.num_bands).astype(np.float64)
        keep = np.isfinite(pixels).all(axis=1)
        if valid is not None:
            keep &= np.asarray(valid, bool).reshape(-1)
        self.excluded += int(keep.size - keep.sum())
        pixels = pixels[keep]
        if pixels.shape[0] == 0:
            return
        count = pixels.shape[0]
        mean = pixels.mean(axis=0)
        m2 = ((pixels - mean) ** 2).sum(axis=0)
        self._merge(count, mean, m2)
        self.minimum = np.minimum(self.minimum, pixels.min(axis=0))
        self.maximum = np.maximum(self.maximum, pixels.max(axis=0))

        scaled = (pixels - self.low) * (self.bins / (self.high - self.low))
        self.clipped += int(((scaled < 0) | (scaled >= self.bins)).sum())
        index = np.clip(np.floor(scaled), 0, self.bins - 1).astype(np.int64)
        index += np.arange(self.num_bands) * self.bins  # one bincount for all bands
        self.histogram += np.bincount(index.reshape(-1), minlength=self.num_bands * self.bins
                                      ).reshape(self.num_bands, self.bins)

    def merge(self, other: "BandStats") -> None:
        """Adds another accumulator with the same bands, range and bins (e.g. from a worker)."""
        if (other.num_bands, other.low, other.high, other.bins) != (
                self.num_bands, self.low, self.high, self.bins):
            raise ValueError("cannot merge BandStats with different bands, range or bins")
        if other.count:
            self._merge(other.count, other.mean, other.m2)
        self.minimum = np.minimum(self.minimum, other.minimum)
        self.maximum = np.maximum(self.maximum, other.maximum)
        self.histogram += other.histogram
        self.clipped += other.clipped
        self.excluded += other.excluded

    def _merge(self, count: int, mean: np.ndarray, m2: np.ndarray) -> None:
        """Chan, Golub & LeVeque (1979): combine (n_a, mean_a, M2_a) with (n_b, mean_b, M2_b)."""
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta ** 2 * (self.count * count / total)
        self.count = total

    def percentiles(self, qs: Sequence[float] = DEFAULT_PERCENTILES) -> np.ndarray:
        """[len(qs), C] percentiles, linear inside the bin holding each quantile."""
        width = (self.high - self.low) / self.bins
        out = np.empty((len(qs), self.num_bands))
        for band in range(self.num_bands):
            cumulative = np.cumsum(self.histogram[band])
            for i, q in enumerate(qs):
                target = q / 100.0 * cumulative[-1]
                b = int(np.searchsorted(cumulative, target, side="left"))
                b = min(b, self.bins - 1)
                before = cumulative[b - 1] if b > 0 else 0
                inside = cumulative[b] - before
                fraction = (target - before) / inside if inside else 0.0
                out[i, band] = self.low + (b + fraction) * width
        return out

    def result(self, qs: Sequence[float] = DEFAULT_PERCENTILES) -> dict:
        """mean, std (population, ddof 0), min, max, percentiles {q: [C]}, counts; lists."""
        if self.count == 0:
            raise ValueError("no valid pixels were accumulated")
        percentiles = self.percentiles(qs)
        return {
            "mean": self.mean.tolist(),
            "std": np.sqrt(self.m2 / self.count).tolist(),
            "min": self.minimum.tolist(),
            "max": self.maximum.tolist(),
            "percentiles": {float(q): percentiles[i].tolist() for i, q in enumerate(qs)},
            "count": int(self.count),
            "excluded_pixels": int(self.excluded),
            "clipped_values": int(self.clipped),
            "value_range": [self.low, self.high],
            "bins": self.bins,
        }


def compute_band_stats(examples: Iterable, *, value_range: tuple[float, float],
                       bins: int = 4096, percentiles: Sequence[float] = DEFAULT_PERCENTILES,
                       key: str = "image", max_examples: int | None = None) -> dict:
    """Statistics over an iterable of images [..., C] or of dicts holding one under `key`
    (e.g. a data source's examples, whose optional 'valid' mask is honoured)."""
    stats = None
    for n, example in enumerate(examples):
        if max_examples is not None and n >= max_examples:
            break
        valid = None
        if isinstance(example, Mapping):
            if key not in example:
                raise KeyError(f"example {n} has no {key!r} key (keys: {sorted(example)})")
            valid = example.get("valid")
            example = example[key]
        image = np.asarray(example)
        if stats is None:
            stats = BandStats(image.shape[-1], value_range, bins)
        stats.update(image, valid)
    if stats is None:
        raise ValueError("the dataset yielded no examples")
    return stats.result(percentiles)


def config_snippet(stats: Mapping, prefix: str = "config.data.") -> str:
    """Python lines to paste into a config: mean and std, percentiles as comments."""
    def fmt(values):
        return "[" + ", ".join(f"{v:.6g}" for v in values) + "]"

    lines = [f"# {stats['count']} pixels, value range {stats['value_range']}, "
             f"{stats['bins']} histogram bins (spectralmoe_jax.data.stats)",
             f"{prefix}mean = {fmt(stats['mean'])}",
             f"{prefix}std = {fmt(stats['std'])}"]
    lines += [f"# p{q:g} = {fmt(v)}" for q, v in stats["percentiles"].items()]
    return "\n".join(lines) + "\n"


def dataset_stats(spec, split: str = "source", value_range: tuple[float, float] | None = None
                  ) -> dict:
    """Statistics of the raw selected bands of `split` (nodata pixels left out).

    Integer images get one histogram bin per value from 0 to their dtype's maximum (at most
    4096 bins); other images use `value_range` (`config.data.value_range`, default (0, 1)) with
    4096 bins. Without `config.data.dtype` the first tile's dtype decides.
    """
    from spectralmoe_jax.data.pipeline import make_source

    source = make_source(spec, split)
    if spec.dtype:
        dtype = np.dtype(spec.dtype)
    else:  # e.g. PNG tiles of any depth: 8-bit ones must not be binned in (0, 1)
        dtype = source.read_raw(0)["image"].dtype if len(source) else None
    if dtype is not None and np.issubdtype(dtype, np.integer):
        value_range = (0.0, float(np.iinfo(dtype).max) + 1)
        bins = int(min(value_range[1], 4096))
    else:
        value_range, bins = tuple(value_range or spec.value_range or (0.0, 1.0)), 4096

    def examples():
        for i in range(len(source)):
            raw = source.read_raw(i)
            yield ({"image": raw["image"]} if raw["nodata"] is None
                   else {"image": raw["image"], "valid": ~raw["nodata"]})

    return compute_band_stats(examples(), value_range=value_range, bins=bins)


def command_line_flags(stats: Mapping, prefix: str = "config.data.") -> str:
    """The mean and std as flags for the entry point's command line."""
    def fmt(values):
        return "'(" + ", ".join(f"{v:.6g}" for v in values) + ")'"

    return f"--{prefix}mean={fmt(stats['mean'])} --{prefix}std={fmt(stats['std'])}"
