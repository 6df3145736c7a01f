r"""Your own tiles: every dataset field from the command line (docs/own_data.md has three worked
examples: GeoTIFF like FLAIR, PNG like Potsdam, HDF5 like geo-bench).

  python -m spectralmoe_jax.main --config configs/custom.py:vits --workdir runs/mine --mode train \
      --config.data.root=/data/potsdam \
      --config.data.class_names="('impervious', 'building', 'low_vegetation', 'tree', 'car')" \
      --config.data.mean="(123.675, 116.28, 103.53)" --config.data.std="(58.395, 57.12, 57.375)" \
      --config.model.vfm.checkpoint=/weights/dinov3_vits16.pth

As it stands it reads RGB PNG tiles laid out as mmseg's converted Potsdam, Vaihingen or LoveDA:
`root/img_dir/train/*.png` (trains) and `root/img_dir/val/*.png` (evaluated), labels with the
same names under `ann_dir/`, with the released recipe. Give the root, the classes and the
normalisation (`--mode stats` prints it); change what else differs:

- files: `data.format` ('geotiff', 'image' for PNG / JPEG, 'npy', 'hdf5'), `data.root`, the
  split globs `data.splits.{source,target}.glob`, the layout `data.layout.kind`: 'folders'
  (`image_dir` -> `label_dir`), 'pairs' (`image_suffix` -> `label_suffix`, one folder),
  'same_file' (HDF5 label beside the bands) or 'regex' (`label_pattern` / `label_replace`);
- bands: `data.band_names` (in file order), `data.bands` (by name or 0-based index, in model
  order), `data.rgb_bands`, `data.wavelengths` (micrometres, DOFA), `data.hdf5_band_keys`;
- values: `data.dtype`, `data.value_scale`, `data.mean` / `data.std` (`--mode stats` prints
  them as flags; train, eval and predict ask for them);
- classes: `data.class_names`, `data.palette`, `data.label_map` as ((code, id), ...),
  `data.reduce_zero_label`, `data.ignore_index`;
- domains: `data.layout.domain_pattern`, `data.splits.<split>.domains`; a split whose glob is
  empty does not exist (an evaluation needs only `eval.split`, a prediction no split at all).

The VFM takes every selected band (`in_channels` follows `data.bands`), the depth encoder the
`rgb_bands`. Variants as the benchmark configs', comma-separated: a size (`vits`, `vitb`,
`vitl`), any ViT preset as the VFM (`dinov2_vitb14`), a method (`rein`, `frozen`, ...): e.g.
`configs/custom.py:dinov2_vits14,rein`. `--mode config` prints every field with what it does.
"""

from spectralmoe_jax import config_lib
from spectralmoe_jax.data import benchmarks

def get_data():
    return benchmarks.dataset_config(
        name="custom", format="image", root="",
        layout=dict(kind="folders", image_dir="img_dir", label_dir="ann_dir",
                    image_suffix=".png", label_suffix=".png"),
        splits=dict(source=dict(glob="img_dir/train/*.png"),
                    target=dict(glob="img_dir/val/*.png")),
        bands=(0, 1, 2), rgb_bands=(0, 1, 2),
        augment=benchmarks.augment(benchmarks.RGB_SHORT_EDGES))


def get_config(variant=None):
    config = config_lib.base_config(get_data(), num_steps=20000)
    return config_lib.apply_variant(config, variant)
