"""tfds round trip: ArrayRecord shards built from the bundled FLAIR tiles read back through
`tfds.data_source` equal the GeoTIFF source, element by element."""
import numpy as np
import pytest

from spectralmoe_jax.data import benchmarks, pipeline, sources, tfds_builders
from spectralmoe_jax.data.spec import DataError
from spectralmoe_jax.data.validate import validate_dataset


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    tfds_builders.build(benchmarks.flair2_demo(), data_dir)
    return data_dir


def test_round_trip_equals_geotiff_source(tfds_dir):
    files = benchmarks.flair2_demo()
    shards = benchmarks.flair2_demo()
    shards.tfds_data_dir = tfds_dir
    for split in ("source", "target"):
        from_files = sources.TileSource(files, split)
        from_shards = pipeline.make_source(shards, split)
        assert isinstance(from_shards, tfds_builders.TfdsSource)
        assert len(from_shards) == len(from_files)
        assert from_shards.domains == from_files.domains
        for index in range(len(from_files)):
            a, b = from_files[index], from_shards[index]
            assert (a["name"], a["domain"]) == (b["name"], b["domain"])
            assert b["image"].dtype == np.float32 and b["label"].dtype == np.int32
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_array_equal(a["label"], b["label"])
            profile_a, profile_b = from_files.profile(index), from_shards.profile(index)
            assert profile_a["crs"] == profile_b["crs"]
            assert profile_a["transform"] == profile_b["transform"]
            # The shards remember their files, so an evaluation on them can predict the scenes.
            assert from_shards.path(index) == from_files.path(index)
        evaluated = pipeline.make_eval_source(shards, split)
        assert [evaluated.path(i) for i in range(len(evaluated))] == \
            [from_files.path(i) for i in range(len(from_files))]


def test_training_batches_equal_from_files_and_shards(tfds_dir):
    shards = benchmarks.flair2_demo()
    shards.tfds_data_dir = tfds_dir
    a = next(pipeline.make_train_iterator(benchmarks.flair2_demo(), seed=1, batch_size=2))
    b = next(pipeline.make_train_iterator(shards, seed=1, batch_size=2))
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
    assert validate_dataset(shards).tiles == {"source": 4, "target": 2}


def test_missing_shards_are_reported(tmp_path):
    config = benchmarks.flair2_demo()
    config.tfds_data_dir = str(tmp_path)
    with pytest.raises(DataError, match="cannot read tfds dataset spectral_segmentation/"
                                        "flair2_demo split 'source'"):
        pipeline.make_source(config, "source")
