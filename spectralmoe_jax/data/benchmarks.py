"""The seven benchmarks of the paper (SPEC section 2) and the bundled FLAIR #2 demo tiles, on
`dataset_config`: a `config.data` with every key of `data/spec.py` present, so that the command
line can set any of them (`configs/custom.py` builds your own dataset on it).

Each benchmark function returns the `config.data` ConfigDict. Class names and
palettes are the released dataset classes' (`rs_dataset/*.py` of daxichen/SpectralMoE-main),
normalisation the released `data_preprocessor`s, augmentation the released train pipelines.
Point any of them at your copy with `--config.data.root=/path`.

Two released conventions kept on purpose so released checkpoints see the inputs they were
trained on:
- RGB benchmarks (LoveDA, Potsdam->Vaihingen, OpenEarthMap) feed the bands as B, G, R: mmseg's
  `LoadImageFromFile` decodes with OpenCV (BGR) and the configs set `bgr_to_rgb=False`; the
  ImageNet / OpenEarthMap means are applied in that order. Set `bands=('R', 'G', 'B')` (and
  reverse mean / std / rgb_bands) to train on RGB instead.
- `label_map` reproduces `reduce_zero_label=True`: code 0 is ignored (255), code k is k - 1.
The released multispectral `MSIPhotoMetricDistortion` assumes NIR, R, G, B and leaves band 0
alone; here brightness, contrast, saturation and hue act on the named R, G, B bands of each
dataset (for FLAIR's R, G, B, NIR order the released code jittered G, B, NIR instead).
"""

from __future__ import annotations

import os

import ml_collections

IGNORE = 255
# Released train pipelines: RandomChoiceResize(scales=[int(512 * x * 0.1) for x in ...]).
MULTISPECTRAL_SHORT_EDGES = tuple(int(512 * x * 0.1) for x in range(6, 13))   # 0.6-1.2 x 512
RGB_SHORT_EDGES = tuple(int(512 * x * 0.1) for x in range(5, 21))             # 0.5-2.0 x 512
IMAGENET_MEAN_BGR = (103.53, 116.28, 123.675)
IMAGENET_STD_BGR = (57.375, 57.12, 58.395)
DEMO_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "demo_data", "flair2")


def reduce_zero_label(num_codes: int) -> dict[int, int]:
    """mmseg `reduce_zero_label`: 0 -> ignore, k -> k - 1 for k = 1..num_codes."""
    return {0: IGNORE, **{k: k - 1 for k in range(1, num_codes + 1)}}


def split_dir_layout(image_ext: str, label_ext: str) -> dict:
    """The released layout `root/<split dir>/image/NAME.<image_ext>` with labels in
    `root/<split dir>/label/NAME.<label_ext>`; the folder holding `image/` is the domain."""
    return dict(label_pattern=rf"^(.*)image/([^/]+)\.{image_ext}$",
                label_replace=rf"\1label/\2.{label_ext}",
                domain_pattern=r"([^/]+)/image/")


def augment(short_edges, *, photometric_bands=None, cat_max_ratio=0.75, photometric=True):
    """The released train augmentation (spec.AugmentSpec): multi-scale resize, crop, flip,
    photometric distortion on `photometric_bands` (None: every band)."""
    return _with_defaults(
        dict(short_edges=tuple, ratio_range=tuple, max_size=int),
        dict(short_edges=short_edges, base_size=512, max_size=1024,
             cat_max_ratio=cat_max_ratio, flip_prob=0.5,
             photometric=_with_defaults(
                 dict(bands=tuple, value_range=tuple),
                 dict(enabled=photometric, brightness_delta=32.0, contrast_range=(0.5, 1.5),
                      saturation_range=(0.5, 1.5), hue_delta=18, bands=photometric_bands,
                      value_range=(0.0, 255.0)))))


# Keys of config.data that may be None, with the type the command line sets them to.
OPTIONAL_FIELDS = dict(band_names=tuple, wavelengths=tuple, rgb_bands=tuple, dtype=str,
                       nodata=float, num_classes=int, class_names=tuple, label_map=tuple,
                       mean=tuple, std=tuple, value_range=tuple)
LAYOUT_DEFAULTS = dict(kind="regex", label_pattern=str, label_replace=str, image_dir=str,
                       label_dir=str, image_suffix=str, label_suffix=str, domain_pattern=str)
SPLIT_DEFAULTS = dict(glob="", domains=tuple, names_file=str, names_key=str)


def _with_defaults(defaults: dict, values: dict) -> ml_collections.ConfigDict:
    """`values` over `defaults`; a default that is a type is a placeholder of that type (None
    until set), so every key is present and settable from the command line."""
    out = ml_collections.ConfigDict()
    values = {k: v for k, v in values.items() if v is not None or k not in defaults}
    for key, value in {**defaults, **values}.items():
        out[key] = (ml_collections.config_dict.placeholder(value) if isinstance(value, type)
                    else value)
    return out


def split(glob: str, domains=None, **fields) -> ml_collections.ConfigDict:
    """One split: its glob, domains (None: all), names_file / names_key (spec.SPLIT_FIELDS)."""
    return _with_defaults(SPLIT_DEFAULTS, dict(glob=glob, domains=domains, **fields))


def dataset_config(**fields) -> ml_collections.ConfigDict:
    """A `config.data` with every key of `spec.FIELDS` present (placeholders where a key may
    stay None), `fields` over the defaults below; `layout` and each of `splits` likewise."""
    layout = _with_defaults(LAYOUT_DEFAULTS, dict(fields.pop("layout", {})))
    splits = ml_collections.ConfigDict()
    for name, value in dict(fields.pop("splits", {})).items():
        splits[name] = value if isinstance(value, ml_collections.ConfigDict) else split(**value)
    defaults = dict(name="dataset", format="geotiff", root="", layout=layout, splits=splits,
                    bands=(0, 1, 2), value_scale=1.0, ignore_index=IGNORE,
                    reduce_zero_label=False, palette=(), crop_size=(512, 512),
                    augment=augment(RGB_SHORT_EDGES), array_layout="HWC",
                    hdf5_image_key="image", hdf5_band_keys=(), hdf5_label_key="label",
                    tfds_data_dir="", num_workers=0, on_bad_tile="error", **OPTIONAL_FIELDS)
    return _with_defaults(defaults, dict(fields, layout=layout, splits=splits))


def _benchmark(**fields) -> ml_collections.ConfigDict:
    """The paper's benchmarks: 8-bit images unless a benchmark says otherwise."""
    return dataset_config(**{"dtype": "uint8", **fields})


# --- multispectral / hyperspectral ---------------------------------------------------------

WHU_OHS_WAVELENGTHS = (
    0.466, 0.480, 0.500, 0.520, 0.536, 0.550, 0.566, 0.580, 0.596, 0.610, 0.626, 0.640,
    0.656, 0.670, 0.686, 0.700, 0.716, 0.730, 0.746, 0.760, 0.776, 0.790, 0.806, 0.820,
    0.836, 0.850, 0.866, 0.880, 0.896, 0.910, 0.926, 0.940)
# The 24 WHU-OHS codes (1..24) grouped into the 7 first-level land-use classes the released
# WHU_OHS_Dataset trains on (its `label_merged` folders hold labels merged this way).
WHU_OHS_MERGE = {1: 0, 2: 0,                        # paddy field, dry farm -> farmland
                 3: 1, 4: 1, 5: 1, 6: 1,            # woodland, shrubbery, sparse, other -> forest
                 7: 2, 8: 2, 9: 2,                  # high / medium / low cover -> grassland
                 10: 3, 11: 3, 12: 3, 13: 3, 14: 3,  # river, lake, reservoir, beach, shoal
                 15: 4, 16: 4, 17: 4,               # urban, rural, other construction
                 18: 5, 19: 5, 20: 5, 21: 5, 22: 5, 23: 5,  # sand ... bare rock -> unused
                 24: 6}                             # ocean


def whu_ohs(labels: str = "codes24") -> ml_collections.ConfigDict:
    """WHU-OHS (OHS-A hyperspectral, 32 bands 466-940 nm, 512x512), cross-region, DOFA.

    Layout (released):
        root/source_dir/image/*.tif   32-band int16 reflectance x 10^4
        root/source_dir/label/*.tif   1 band, codes 0 (background, ignored) and 1..24
        root/target_dir/{image,label}/*.tif
    `labels='codes24'` merges the 24 codes into the 7 released classes; `labels='merged7'`
    reads labels already merged to codes 1..7. Released training: flip only, mean 0, std 1 on
    reflectance (raw / 10000).
    """
    if labels not in ("codes24", "merged7"):
        raise ValueError(f"labels={labels!r}: use 'codes24' or 'merged7'")
    label_map = ({0: IGNORE, **WHU_OHS_MERGE} if labels == "codes24" else reduce_zero_label(7))
    return _benchmark(
        name="whu_ohs", root="data/WHUOHS", layout=split_dir_layout("tif", "tif"),
        splits=dict(source=dict(glob="source_dir/image/*.tif", domains=None),
                    target=dict(glob="target_dir/image/*.tif", domains=None)),
        band_names=tuple(f"{round(w * 1000)}nm" for w in WHU_OHS_WAVELENGTHS),
        bands=tuple(range(32)), wavelengths=WHU_OHS_WAVELENGTHS,
        rgb_bands=(13, 5, 0),          # 670, 550, 466 nm: the released loader's RGB choice
        dtype="int16", value_scale=10000.0,
        num_classes=7,
        class_names=("Farmland", "Forest", "Grassland", "Waterbody", "Built-upland",
                     "Unusedland", "Ocean"),
        palette=((0, 255, 197), (38, 115, 0), (85, 255, 0), (0, 92, 230), (115, 0, 0),
                 (255, 255, 0), (0, 38, 115)),
        label_map=label_map, mean=(0.0,) * 32, std=(1.0,) * 32,
        augment=augment(None, cat_max_ratio=1.0, photometric=False),
    )


GID_CLASSES = (
    "industrial_area", "paddy_field", "irrigated_field", "dry_cropland", "garden_land",
    "arbor_forest", "shrub_forest", "park", "natural_meadow", "artificial_meadow", "river",
    "urban_residential", "lake", "pond", "fish_pond", "snow", "bare_land",
    "rural_residential", "stadium", "square", "road", "overpass", "railway_station", "airport")
GID_PALETTE = (
    (200, 0, 0), (0, 200, 0), (150, 250, 0), (150, 200, 150), (200, 0, 200), (150, 0, 250),
    (150, 150, 250), (200, 150, 200), (250, 200, 0), (200, 200, 0), (0, 0, 200),
    (250, 0, 150), (0, 150, 200), (0, 200, 250), (150, 200, 250), (250, 250, 250),
    (200, 200, 200), (200, 150, 150), (250, 200, 150), (150, 150, 0), (250, 150, 150),
    (250, 150, 0), (250, 200, 250), (200, 150, 0))


def _gid(name, root, mean, std):
    return _benchmark(
        name=name, root=root, layout=split_dir_layout("tif", "png"),
        splits=dict(source=dict(glob="source_dir/image/*.tif", domains=None),
                    target=dict(glob="target_dir*/image/*.tif", domains=None)),
        band_names=("NIR", "R", "G", "B"), bands=("NIR", "R", "G", "B"),
        wavelengths=(0.83, 0.665, 0.56, 0.49), rgb_bands=(1, 2, 3),
        num_classes=24, class_names=GID_CLASSES, palette=GID_PALETTE,
        label_map=reduce_zero_label(24), mean=mean, std=std,
        augment=augment(MULTISPECTRAL_SHORT_EDGES, photometric_bands=(1, 2, 3)),
    )


def five_billion_pixels() -> ml_collections.ConfigDict:
    """Five-Billion-Pixels / GID cross-sensor: GF-2 -> GF-1, PlanetScope, Sentinel-2 (24 classes).

    Layout (released, one root per target in the paper's runs):
        root/source_dir/image/*.tif     4-band uint8 NIR, R, G, B (GF-2 tiles)
        root/source_dir/label/*.png     codes 0 (unlabelled, ignored) and 1..24
        root/target_dir/{image,label}/  one target sensor; or several folders
        root/target_dir_GF1/..., root/target_dir_PlanetScope/... each reported as a domain.
    """
    return _gid("five_billion_pixels", "data/GID",
                mean=(110.714, 85.357, 88.594, 82.444), std=(72.380, 65.591, 63.937, 63.005))


def gid_cross_region() -> ml_collections.ConfigDict:
    """GID cross-region (CGS): disjoint GF-2 regions, 24 classes; layout as
    `five_billion_pixels`. Normalisation from the released gid_cgs config."""
    return _gid("gid_cross_region", "data/GID_TG",
                mean=(112.067327, 83.535213, 88.392715, 82.128708),
                std=(73.937849, 65.736182, 64.700772, 63.703369))


FLAIR_CLASSES = ("Building", "Pervious surface", "Impervious surface", "Bare soil", "Water",
                 "Coniferous", "Deciduous", "Brushwood", "Vineyard", "Herbaceous vegetation",
                 "Agricultural land", "Plowed land")
FLAIR_PALETTE = ((219, 14, 154), (147, 142, 123), (248, 12, 0), (169, 113, 1), (21, 83, 174),
                 (25, 74, 38), (70, 228, 131), (243, 166, 13), (102, 0, 130), (85, 255, 0),
                 (255, 243, 13), (228, 223, 124))
# FLAIR codes 1..12 are the 12 benchmark classes; 0 and 13..19 (swimming pool, snow, clear
# cut, mixed, ligneous, greenhouse, other) are ignored, as in the paper's 12-class FLAIR task.
FLAIR_LABEL_MAP = {0: IGNORE, **{k: k - 1 for k in range(1, 13)},
                   **{k: IGNORE for k in range(13, 20)}}


def _flair(**fields):
    return _benchmark(
        band_names=("R", "G", "B", "NIR", "elevation"), bands=("R", "G", "B", "NIR"),
        wavelengths=(0.665, 0.56, 0.49, 0.83), rgb_bands=(0, 1, 2),
        num_classes=12, class_names=FLAIR_CLASSES, palette=FLAIR_PALETTE,
        label_map=FLAIR_LABEL_MAP,
        mean=(105.08, 110.87, 101.82, 106.38), std=(52.17, 45.38, 44.0, 39.69),
        augment=augment(MULTISPECTRAL_SHORT_EDGES, photometric_bands=(0, 1, 2)),
        **fields)


def flair() -> ml_collections.ConfigDict:
    """FLAIR #1/#2 aerial imagery (IGN, 0.2 m), cross-region, 12 classes, R, G, B, NIR.

    Layout (released):
        root/source_dir/image/*.tif   5 bands uint8 R, G, B, NIR, elevation (FLAIR's own files)
        root/source_dir/label/*.tif   FLAIR codes 1..19 (13..19 ignored)
        root/target_dir/{image,label}/*.tif
    The domain is the `Dddd_yyyy` département in the file path when present, else the folder.
    """
    return _flair(
        name="flair", root="data/FLAIR",
        layout=dict(split_dir_layout("tif", "tif"),
                    domain_pattern=r"^(?:.*?(D\d{3}_\d{4})|([^/]+)/image/)"),
        splits=dict(source=dict(glob="source_dir/image/*.tif", domains=None),
                    target=dict(glob="target_dir/image/*.tif", domains=None)))


def flair2_demo() -> ml_collections.ConfigDict:
    """The six FLAIR #2 tiles bundled in `spectralmoe_jax/demo_data/flair2` (see its README).

    Layout: paired files in one folder, `<domain>_IMG_<id>_aerial.tif` (5 bands uint8, 512x512,
    EPSG:2154) and `<domain>_IMG_<id>_mask.tif`. Train on D055, D051, D074, D006; evaluate on
    the unseen D004 (two tiles). Classes, bands and normalisation as `flair()`.
    """
    return _flair(
        name="flair2_demo", root=DEMO_ROOT,
        layout=dict(kind="pairs", image_suffix="_aerial.tif", label_suffix="_mask.tif",
                    domain_pattern=r"^(D\d{3}_\d{4})_"),
        splits=dict(source=dict(glob="*_aerial.tif",
                                domains=("D055_2018", "D051_2019", "D074_2020", "D006_2020")),
                    target=dict(glob="*_aerial.tif", domains=("D004_2021",))))


# --- RGB ------------------------------------------------------------------------------------

def _rgb(**fields):
    return _benchmark(
        band_names=("R", "G", "B"), bands=("B", "G", "R"),
        wavelengths=(0.49, 0.56, 0.665), rgb_bands=(2, 1, 0),
        augment=augment(RGB_SHORT_EDGES), **fields)


def loveda() -> ml_collections.ConfigDict:
    """LoveDA rural -> urban, 7 classes, RGB 1024x1024 PNG.

    Layout (released):
        root/Train/Rural/image/*.png, root/Train/Rural/label/*.png   codes 0 (no data) 1..7
        root/Val/Urban/image/*.png,   root/Val/Urban/label/*.png
    """
    return _rgb(
        name="loveda", format="image", root="data/LoveDA/Rural2Urban",
        layout=split_dir_layout("png", "png"),
        splits=dict(source=dict(glob="Train/Rural/image/*.png", domains=None),
                    target=dict(glob="Val/Urban/image/*.png", domains=None)),
        num_classes=7,
        class_names=("background", "building", "road", "water", "barren", "forest",
                     "agricultural"),
        palette=((255, 255, 255), (255, 0, 0), (255, 255, 0), (0, 0, 255), (159, 129, 183),
                 (0, 255, 0), (255, 195, 128)),
        label_map=reduce_zero_label(7), mean=IMAGENET_MEAN_BGR, std=IMAGENET_STD_BGR)


def potsdam_vaihingen() -> ml_collections.ConfigDict:
    """ISPRS Potsdam (RGB) -> Vaihingen (IR-R-G stored as 3 channels), 6 classes, PNG.

    Layout (released; labels are mmseg-converted code maps, 0 = boundary, ignored):
        root/Potsdam/image/*.png,   root/Potsdam/label/*.png
        root/Vaihingen/image/*.png, root/Vaihingen/label/*.png
    """
    return _rgb(
        name="potsdam_vaihingen", format="image", root="data/Potsdam2Vaihingen",
        layout=split_dir_layout("png", "png"),
        splits=dict(source=dict(glob="Potsdam/image/*.png", domains=None),
                    target=dict(glob="Vaihingen/image/*.png", domains=None)),
        num_classes=6,
        class_names=("impervious_surface", "building", "low_vegetation", "tree", "car",
                     "clutter"),
        palette=((255, 255, 255), (0, 0, 255), (0, 255, 255), (0, 255, 0), (255, 255, 0),
                 (255, 0, 0)),
        label_map=reduce_zero_label(6), mean=IMAGENET_MEAN_BGR, std=IMAGENET_STD_BGR)


def openearthmap() -> ml_collections.ConfigDict:
    """OpenEarthMap cross-continent, 8 classes, RGB GeoTIFF.

    Layout (released):
        root/source_dir/image/*.tif   3-band uint8 R, G, B
        root/source_dir/label/*.tif   codes 0 (unknown, ignored) and 1..8
        root/target_dir/{image,label}/*.tif
    """
    return _rgb(
        name="openearthmap", root="data/OpenEarthMap8", layout=split_dir_layout("tif", "tif"),
        splits=dict(source=dict(glob="source_dir/image/*.tif", domains=None),
                    target=dict(glob="target_dir/image/*.tif", domains=None)),
        num_classes=8,
        class_names=("bareland", "rangeland", "developed space", "road", "tree", "water",
                     "agriculture land", "building"),
        palette=((128, 0, 0), (0, 255, 36), (148, 148, 148), (255, 255, 255), (34, 97, 38),
                 (0, 69, 255), (75, 181, 73), (222, 31, 7)),
        label_map=reduce_zero_label(8),
        mean=(118.246, 120.441, 100.838), std=(49.52, 44.578, 48.335))


BENCHMARKS = {
    "whu_ohs": whu_ohs,
    "five_billion_pixels": five_billion_pixels,
    "gid_cross_region": gid_cross_region,
    "flair": flair,
    "loveda": loveda,
    "potsdam_vaihingen": potsdam_vaihingen,
    "openearthmap": openearthmap,
    "flair2_demo": flair2_demo,
}


def get_benchmark(name: str, **kwargs) -> ml_collections.ConfigDict:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARKS)}")
    return BENCHMARKS[name](**kwargs)
