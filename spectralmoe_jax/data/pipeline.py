"""The grain input pipeline: shuffled, repeated, augmented, sharded per JAX process, batched.

Element order and augmentation depend only on the seed: grain's `random_map` seeds each
element's generator from (seed, position in the repeated stream), worker processes each take
a slice of that stream and their outputs are interleaved back in order, and batching happens
after the workers. So batches are identical whatever `num_workers`, and
`get_state()`/`set_state()` resume exactly.

Process p of P takes stream positions p, p + P, p + 2P, ...: step k of the global batch is
positions [k B P, (k + 1) B P) of one shuffled stream, each process holding B of them.

A tile that cannot be used when it is read (`DataError`: unreadable, label values outside the
classes) stops the run by default; with `config.data.on_bad_tile='skip'` it is logged and the
next good tile of the split takes its place (`SkipBadTiles`), so the stream keeps its length,
its order and its batch shapes, and resuming stays exact.
"""

from __future__ import annotations

import os

import grain
from absl import flags, logging

from spectralmoe_jax.data.sources import TileSource
from spectralmoe_jax.data.spec import DataError, dataset_spec
from spectralmoe_jax.data.transforms import EvalTransform, TrainTransform


class BadTileLog:
    """The tiles skipped by `on_bad_tile='skip'`: one `path<TAB>reason` line each, appended by
    any reader thread or worker process (a file name may repeat; `count` counts files)."""

    def __init__(self, path: str | None):
        self.path = path

    def add(self, tile: str, reason: str) -> None:
        logging.warning("skipping bad tile %s (config.data.on_bad_tile='skip'): %s", tile, reason)
        if self.path:
            reason = " ".join(reason.split())  # one line
            with open(self.path, "a") as f:
                f.write(f"{tile}\t{reason}\n")

    def count(self) -> int:
        if not self.path or not os.path.exists(self.path):
            return 0
        with open(self.path) as f:
            return len({line.split("\t", 1)[0] for line in f if line.strip()})


class SkipBadTiles:
    """A random-access source whose unusable tiles are replaced by the next good one (in index
    order, wrapping): element i is always the same tile, whatever the reader threads or workers,
    so the pipeline's determinism and exact resume hold."""

    def __init__(self, source, log: BadTileLog):
        self.source = source
        self.log = log
        self._bad: set[int] = set()  # per process; a bad tile is read (and logged) once

    def __len__(self) -> int:
        return len(self.source)

    def __repr__(self) -> str:
        return f"SkipBadTiles({self.source!r})"

    def __getitem__(self, index: int) -> dict:
        count = len(self.source)
        for offset in range(count):
            candidate = (int(index) + offset) % count
            if candidate in self._bad:
                continue
            try:
                return self.source[candidate]
            except DataError as error:
                self._bad.add(candidate)
                self.log.add(self.source.path(candidate), str(error))
        where = f": see {self.log.path}" if self.log.path else ""
        raise DataError(f"every one of the {count} tiles of {self.source!r} is unusable "
                        f"(config.data.on_bad_tile='skip'){where}")


def make_source(config, split: str):
    """The split's tiles from their files, or from ArrayRecord shards when
    `config.data.tfds_data_dir` is set."""
    spec = dataset_spec(config)
    if not spec.tfds_data_dir:
        return TileSource(spec, split)
    from spectralmoe_jax.data.tfds_builders import TfdsSource  # tfds is slow to import

    return TfdsSource(spec, split)


def train_dataset(data_config, *, seed: int, batch_size: int, process_index: int = 0,
                  process_count: int = 1, num_workers: int = 0, num_threads: int = 2,
                  split: str = "source", start: int = 0,
                  bad_tile_log: str | None = None) -> grain.IterDataset:
    """The training pipeline as a grain `IterDataset`, from element `start` of this process's
    stream; `batch_size` is per process. `bad_tile_log`: the file listing skipped tiles
    (`config.data.on_bad_tile='skip'`)."""
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index {process_index} is outside 0..{process_count - 1}")
    if batch_size < 1:
        raise DataError(f"batch_size {batch_size} must be positive")
    spec = dataset_spec(data_config)
    source = make_source(spec, split)
    if spec.on_bad_tile == "skip":
        source = SkipBadTiles(source, BadTileLog(bad_tile_log))
    ds = (grain.MapDataset.source(source)
          .seed(seed)
          .shuffle()                 # a new order every epoch (seed folded with the epoch)
          .repeat(None)
          .random_map(TrainTransform(spec)))
    ds = ds[process_index::process_count][start:]
    buffer = 2 * batch_size
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                              prefetch_buffer_size=buffer))
    if num_workers > 0:
        # grain reads an absl flag when it starts workers; outside `absl.app.run` (tests,
        # notebooks, scripts) nothing has parsed flags, so take the defaults.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                         per_worker_buffer_size=buffer))
    return ds.batch(batch_size, drop_remainder=True)


class TrainIterator(grain.DatasetIterator):
    """Checkpointable batch iterator whose state is the number of elements this process has
    consumed: `{"position": n, "seed": s}`. It restores exactly with any `num_workers` or
    `batch_size`, since the stream before batching depends only on the seed."""

    def __init__(self, make_dataset, seed: int, batch_size: int):
        self._iterator = None        # `close` runs on garbage collection even if this raises
        first = make_dataset(0)
        super().__init__()
        self._make_dataset = make_dataset
        self._seed = seed
        self._batch_size = batch_size
        self._position = 0
        self._iterator = iter(first)

    def __next__(self) -> dict:
        batch = next(self._iterator)
        self._position += self._batch_size
        return batch

    def get_state(self) -> dict:
        return {"position": self._position, "seed": self._seed}

    def set_state(self, state: dict) -> None:
        if state.get("seed", self._seed) != self._seed:
            raise DataError(f"the saved input state is for seed {state['seed']}, this iterator "
                            f"uses seed {self._seed}")
        self._iterator.close()
        self._position = int(state["position"])
        self._iterator = iter(self._make_dataset(self._position))

    def close(self) -> None:
        if self._iterator is not None:
            self._iterator.close()


def make_train_iterator(data_config, *, seed: int, batch_size: int, process_index: int = 0,
                        process_count: int = 1, num_workers: int = 0, num_threads: int = 2,
                        split: str = "source", bad_tile_log: str | None = None) -> TrainIterator:
    """Endless iterator of `{"image": float32 [B, H, W, C], "label": int32 [B, H, W]}` with
    B = `batch_size` (this process's share of the global batch) and (H, W) = crop size.

    `num_workers` > 0 runs the reading and augmentation in that many processes;
    `num_threads` threads read in each process. `get_state()` is a small dict to store with
    the checkpoint; `set_state()` continues from there. `bad_tile_log`: see `train_dataset`.
    """
    def make_dataset(start: int) -> grain.IterDataset:
        return train_dataset(data_config, seed=seed, batch_size=batch_size,
                             process_index=process_index, process_count=process_count,
                             num_workers=num_workers, num_threads=num_threads, split=split,
                             start=start, bad_tile_log=bad_tile_log)

    return TrainIterator(make_dataset, seed, batch_size)


class EvalSource:
    """Full tiles of a split, normalised, not augmented, with what evaluation needs to report
    per domain and to georeference predictions.

    Element: `{"image": float32 [H, W, C], "label": int32 [H, W], "name": str, "domain": str,
    "path": str}` (the image file; for tfds shards, the file they were built from).
    """

    def __init__(self, data_config, split: str = "target"):
        self.spec = dataset_spec(data_config)
        self.source = make_source(self.spec, split)
        self.split = split
        self._transform = EvalTransform(self.spec)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        return {**self._transform(self.source[index]), "path": self.path(index)}

    def __iter__(self):
        """Every tile in order; with `config.data.on_bad_tile='skip'`, an unusable one is left
        out of the evaluation with a warning (a replacement would count another tile twice)."""
        used = 0
        for index in range(len(self)):
            try:
                example = self[index]
            except DataError as error:
                if self.spec.on_bad_tile != "skip":
                    raise
                BadTileLog(None).add(self.path(index), str(error))
                continue
            used += 1
            yield example
        if not used:
            raise DataError(f"every one of the {len(self)} tiles of {self!r} is unusable "
                            "(config.data.on_bad_tile='skip'): nothing to evaluate")

    def path(self, index: int) -> str:
        """The image file of tile `index` (for shards: the file it was built from)."""
        return self.source.path(index)

    def __repr__(self) -> str:
        return f"EvalSource({self.source!r})"

    @property
    def domains(self) -> list[str]:
        """The domain of every tile in index order."""
        return self.source.domains

    def profile(self, index: int) -> dict | None:
        """rasterio profile (crs, transform, height, width, ...) of tile `index`, or None."""
        return self.source.profile(index)


def make_eval_source(data_config, split: str = "target") -> EvalSource:
    return EvalSource(data_config, split)
