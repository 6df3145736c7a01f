"""Input pipeline: dataset definitions, tile readers, augmentation, grain iterators, validation.

  spec.py           `config.data` checked and frozen (`dataset_spec`, `DataError`)
  benchmarks.py     `dataset_config` (every key settable), the seven paper benchmarks, the demo tiles
  layout.py         which files form a split, label and domain of each image (layout kinds)
  readers.py        GeoTIFF / PNG / JPEG / .npy / HDF5 (one array or a dataset per band) readers
  sources.py        the grain random-access source over files (`TileSource`)
  transforms.py     released augmentations and normalisation (NumPy)
  pipeline.py       `make_source`, `make_train_iterator`, `make_eval_source` (imports grain)
  tfds_builders.py  tensorflow-datasets builder writing ArrayRecord shards, `TfdsSource` reading them
  validate.py       `validate_dataset`: every bad file named before training
  stats.py          per-band statistics of a split (`--mode stats`)

Nothing is imported here, so model code and configs can use `benchmarks` without grain.
"""
