"""The grain pipeline: same batches whatever the worker count, exact resume, process shards."""
import numpy as np
import pytest

from spectralmoe_jax.data import pipeline
from spectralmoe_jax.data.spec import DataError
from tests.test_data_sources import data_config, write_split


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    write_split(str(root), "source_dir", 5, size=40, seed=0)
    cfg = data_config(root, size=32, rgb_bands=(0, 1, 2))
    cfg.augment.short_edges = (28, 40, 48)
    cfg.augment.max_size = 64
    cfg.augment.cat_max_ratio = 0.75
    cfg.augment.flip_prob = 0.5
    cfg.augment.photometric.enabled = True
    return cfg


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


def test_batches_shapes_and_epochs(config):
    batches = take(pipeline.make_train_iterator(config, seed=0, batch_size=3), 4)
    for batch in batches:
        assert batch["image"].shape == (3, 32, 32, 3) and batch["image"].dtype == np.float32
        assert batch["label"].shape == (3, 32, 32) and batch["label"].dtype == np.int32
    # 12 elements over 5 tiles: epochs repeat the tiles with fresh augmentation.
    images = np.concatenate([b["image"] for b in batches])
    assert len({im.tobytes() for im in images}) == 12
    other_seed = take(pipeline.make_train_iterator(config, seed=1, batch_size=3), 1)[0]
    assert not np.array_equal(other_seed["image"], batches[0]["image"])


def test_identical_batches_with_zero_and_two_workers(config):
    in_process = take(pipeline.make_train_iterator(config, seed=5, batch_size=2), 4)
    iterator = pipeline.make_train_iterator(config, seed=5, batch_size=2, num_workers=2)
    try:
        with_workers = take(iterator, 4)
        state = iterator.get_state()
    finally:
        iterator.close()
    assert_same_batches(in_process, with_workers)
    # A state saved with workers resumes in-process.
    resumed = pipeline.make_train_iterator(config, seed=5, batch_size=2)
    resumed.set_state(state)
    reference = pipeline.make_train_iterator(config, seed=5, batch_size=2)
    take(reference, 4)
    assert_same_batches(take(resumed, 2), take(reference, 2))


def test_resume_from_state(config):
    iterator = pipeline.make_train_iterator(config, seed=7, batch_size=2)
    take(iterator, 3)
    state = iterator.get_state()
    assert state == {"position": 6, "seed": 7}
    expected = take(iterator, 3)
    fresh = pipeline.make_train_iterator(config, seed=7, batch_size=2, num_threads=0)
    fresh.set_state(state)
    assert_same_batches(take(fresh, 3), expected)
    with pytest.raises(DataError, match="seed 7"):
        pipeline.make_train_iterator(config, seed=8, batch_size=2).set_state(state)


def test_processes_hold_contiguous_slices_of_the_one_process_batch(config):
    """Process p of P holds rows [p b, (p + 1) b) of the batch one process reading P b gets,
    augmentation included: the global batch is the same row for row."""
    whole = take(pipeline.make_train_iterator(config, seed=3, batch_size=4), 2)
    shards = [take(pipeline.make_train_iterator(config, seed=3, batch_size=2, process_index=p,
                                                process_count=2), 2) for p in (0, 1)]
    for step in range(2):
        for key in ("image", "label"):
            joined = np.concatenate([shards[0][step][key], shards[1][step][key]])
            np.testing.assert_array_equal(joined, whole[step][key])
    with pytest.raises(DataError, match="process_index 2"):
        pipeline.make_train_iterator(config, seed=3, batch_size=2, process_index=2,
                                     process_count=2)


def test_state_resumes_at_another_process_count(config):
    """The state is a position in the stream all processes share: saved by two processes, it
    resumes in one, and saved by one, in two, with the same global batches."""
    reference = take(pipeline.make_train_iterator(config, seed=4, batch_size=4), 5)
    halves = [pipeline.make_train_iterator(config, seed=4, batch_size=2, process_index=p,
                                           process_count=2) for p in (0, 1)]
    for half in halves:
        take(half, 3)
    state = halves[0].get_state()
    assert state == halves[1].get_state() == {"position": 12, "seed": 4}
    one = pipeline.make_train_iterator(config, seed=4, batch_size=4)
    one.set_state(state)
    assert_same_batches(take(one, 2), reference[3:])
    assert one.get_state() == {"position": 20, "seed": 4}
    parts = []
    for p in (0, 1):
        half = pipeline.make_train_iterator(config, seed=4, batch_size=2, process_index=p,
                                            process_count=2)
        half.set_state({"position": 8, "seed": 4})
        parts.append(take(half, 3))
    for step in range(3):
        for key in ("image", "label"):
            joined = np.concatenate([parts[0][step][key], parts[1][step][key]])
            np.testing.assert_array_equal(joined, reference[2 + step][key])
