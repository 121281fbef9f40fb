"""Datasets by name. A builder takes (DataConfig, split) and returns a torch Dataset with
`classes`, `num_classes` and `ignore_index` attributes."""
from __future__ import annotations

from trainers.registry import DATASETS


# the SSSegmentation pipeline keys only the folder datasets read (trainers/data/folder.py: VOC, ADE20K, Cityscapes,
# the night-time sets, LIP, CIHP); elsewhere they would be silently ignored
VOC_ONLY = ("resize", "cat_max_ratio", "photometric", "val_resize", "crop_size", "rotate")
PIPELINE_DATASETS = ("voc2012_aug", "voc2012", "ade20k", "cityscapes", "dark_zurich", "nighttime_driving", "lip", "cihp")


def _no_voc_keys(cfg) -> None:
    set_keys = [k for k in VOC_ONLY if getattr(cfg, k) not in (None, False)]
    if not cfg.keep_ratio:
        set_keys.append("keep_ratio")
    if set_keys:
        raise ValueError(f"data.{set_keys[0]}: only the VOC loaders and the other SSSegmentation-pipeline datasets "
                         f"({', '.join(PIPELINE_DATASETS)}) apply it, not data.name={cfg.name}")


def _pipeline(cfg) -> dict:
    """SSSegmentation's pipeline keys of a data config, as FolderSegmentation takes them."""
    return dict(resize=cfg.resize, scale_range=cfg.scale_range, cat_max_ratio=cfg.cat_max_ratio,
                photometric=cfg.photometric, val_resize=cfg.val_resize, crop_size=cfg.crop_size,
                keep_ratio=cfg.keep_ratio, rotate=cfg.rotate)


@DATASETS.register("synthetic_surgical")
def synthetic_surgical(cfg, split: str):
    from trainers.data.synthetic import SyntheticSurgical

    _no_voc_keys(cfg)
    size = cfg.train_size if split == "train" else cfg.val_size
    return SyntheticSurgical(split, size=size or (512 if split == "train" else 128),
                             image_size=cfg.image_size, seed=cfg.seed, shift=cfg.shift)


def _voc2012(cfg, split: str, aug: bool):
    from trainers.data.voc import VOCSegmentation

    size = cfg.train_size if split == "train" else cfg.val_size
    return VOCSegmentation(cfg.root, split, image_size=cfg.image_size, size=size, aug=aug, **_pipeline(cfg))


@DATASETS.register("voc2012_aug")
def voc2012_aug(cfg, split: str):
    """PASCAL VOC 2012 + SBD: train = train_aug (10,582 ids), val = VOC val (1,449)."""
    return _voc2012(cfg, split, aug=True)


@DATASETS.register("voc2012")
def voc2012(cfg, split: str):
    """PASCAL VOC 2012: train = train (1,464 ids), val = val (1,449)."""
    return _voc2012(cfg, split, aug=False)


def _folder(cls, cfg, split: str):
    size = cfg.train_size if split == "train" else cfg.val_size
    return cls(cfg.root, split, image_size=cfg.image_size, size=size, **_pipeline(cfg))


@DATASETS.register("ade20k")
def ade20k(cfg, split: str):
    """ADE20K SceneParsing (150 classes, reduce_zero_label): train = training (20,210), val = validation (2,000)."""
    from trainers.data.scenes import ADE20K
    return _folder(ADE20K, cfg, split)


@DATASETS.register("cityscapes")
def cityscapes(cfg, split: str):
    """Cityscapes gtFine, 19 train ids: train (2,975), val (500)."""
    from trainers.data.scenes import Cityscapes
    return _folder(Cityscapes, cfg, split)


@DATASETS.register("dark_zurich")
def dark_zurich(cfg, split: str):
    """Dark Zurich val (50 night images, Cityscapes train ids): an evaluation set, split val only."""
    from trainers.data.scenes import DarkZurich
    return _folder(DarkZurich, cfg, split)


@DATASETS.register("nighttime_driving")
def nighttime_driving(cfg, split: str):
    """Nighttime Driving test (50 night images, coarse Cityscapes train ids): an evaluation set, read as split val."""
    from trainers.data.scenes import NighttimeDriving
    return _folder(NighttimeDriving, cfg, split)


@DATASETS.register("lip")
def lip(cfg, split: str):
    """LIP single-person parsing (20 classes): train (30,462), val (10,000)."""
    from trainers.data.humans import LIP
    return _folder(LIP, cfg, split)


@DATASETS.register("cihp")
def cihp(cfg, split: str):
    """CIHP multi-person parsing, its 20 part classes: train = Training (28,280), val = Validation (5,000)."""
    from trainers.data.humans import CIHP
    return _folder(CIHP, cfg, split)


@DATASETS.register("endovis2018")
def endovis2018(cfg, split: str):
    """EndoVis 2018 robotic scene segmentation (12 classes): root/{train,val}/seq_<n>, or seq_<n>
    folders directly under root with val = seq_2, 5, 9, 15."""
    from trainers.data.endovis import EndoVis2018

    _no_voc_keys(cfg)
    size = cfg.train_size if split == "train" else cfg.val_size
    return EndoVis2018(cfg.root, split, image_size=cfg.image_size, size=size)


@DATASETS.register("synthetic_cod")
def synthetic_cod(cfg, split: str):
    """Embedded camouflaged-object scenes (trainers/data/foreground.py): binary masks, object textured like its
    background."""
    return _foreground(cfg, split, "camouflaged")


@DATASETS.register("synthetic_sod")
def synthetic_sod(cfg, split: str):
    """Embedded salient-object scenes (trainers/data/foreground.py): the same layouts, a conspicuous object."""
    return _foreground(cfg, split, "salient")


def _foreground(cfg, split: str, flavour: str):
    from trainers.data.foreground import SyntheticForeground

    _no_voc_keys(cfg)
    size = cfg.train_size if split == "train" else cfg.val_size
    return SyntheticForeground(split, size=size or (512 if split == "train" else 128), image_size=cfg.image_size,
                               seed=cfg.seed, flavour=flavour)


def _foreground_folder(cfg, split: str, pairs):
    from trainers.data.cod import ForegroundFolder

    _no_voc_keys(cfg)
    size = cfg.train_size if split == "train" else cfg.val_size
    return ForegroundFolder(pairs(cfg.root, split), split, image_size=cfg.image_size, size=size)


@DATASETS.register("cod10k")
def cod10k(cfg, split: str):
    """COD10K-v3: train = Train (3,040 camouflaged images), val = Test (2,026) (trainers/data/cod.py)."""
    from trainers.data.cod import cod10k_pairs
    return _foreground_folder(cfg, split, cod10k_pairs)


@DATASETS.register("camo")
def camo(cfg, split: str):
    """CAMO-V.1.0-CVIU2019: train = Images/Train (1,000), val = Images/Test (250)."""
    from trainers.data.cod import camo_pairs
    return _foreground_folder(cfg, split, camo_pairs)


@DATASETS.register("duts")
def duts(cfg, split: str):
    """DUTS: train = DUTS-TR (10,553), val = DUTS-TE (5,019)."""
    from trainers.data.cod import duts_pairs
    return _foreground_folder(cfg, split, duts_pairs)


def build_dataset(cfg, split: str):
    if cfg.shift is not None and cfg.name != "synthetic_surgical":   # rendered in trainers/data/synthetic/shift.py
        raise ValueError(f"data.shift: only the generated synthetic_surgical scenes apply it, not data.name={cfg.name}")
    return DATASETS.get(cfg.name)(cfg, split)
