"""Input pipeline: dataset definitions, tile readers, augmentation, grain iterators, validation.

  spec.py           `config.data` checked and frozen (`dataset_spec`, `DataError`)
  benchmarks.py     the seven paper benchmarks and the bundled FLAIR #2 demo tiles
  layout.py         which files form a split, label and domain of each image
  readers.py        GeoTIFF / PNG / JPEG / .npy / HDF5 readers, any band count and dtype
  sources.py        grain random-access sources over files or tfds ArrayRecord shards
  transforms.py     released augmentations and normalisation (NumPy)
  pipeline.py       `make_train_iterator`, `make_eval_source` (the only module importing grain)
  tfds_builders.py  tensorflow-datasets builder writing ArrayRecord shards
  validate.py       `validate_dataset`: every bad file named before training

Nothing is imported here, so model code and configs can use `benchmarks` without grain.
"""
