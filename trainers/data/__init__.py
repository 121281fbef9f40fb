"""Datasets by name. A builder takes (DataConfig, split) and returns a torch Dataset with
`classes`, `num_classes` and `ignore_index` attributes."""
from __future__ import annotations

from trainers.registry import DATASETS


# the SSSegmentation pipeline keys only the VOC loaders read; elsewhere they would be silently ignored
VOC_ONLY = ("resize", "cat_max_ratio", "photometric", "val_resize")


def _no_voc_keys(cfg) -> None:
    set_keys = [k for k in VOC_ONLY if getattr(cfg, k) not in (None, False)]
    if set_keys:
        raise ValueError(f"data.{set_keys[0]}: only the VOC loaders (voc2012_aug, voc2012) apply it, "
                         f"not data.name={cfg.name}")


@DATASETS.register("synthetic_surgical")
def synthetic_surgical(cfg, split: str):
    from trainers.data.synthetic import SyntheticSurgical

    _no_voc_keys(cfg)
    size = cfg.train_size if split == "train" else cfg.val_size
    return SyntheticSurgical(split, size=size or (512 if split == "train" else 128),
                             image_size=cfg.image_size, seed=cfg.seed)


def _voc2012(cfg, split: str, aug: bool):
    from trainers.data.voc import VOCSegmentation

    size = cfg.train_size if split == "train" else cfg.val_size
    return VOCSegmentation(cfg.root, split, image_size=cfg.image_size, size=size, aug=aug, resize=cfg.resize,
                           scale_range=cfg.scale_range, cat_max_ratio=cfg.cat_max_ratio,
                           photometric=cfg.photometric, val_resize=cfg.val_resize)


@DATASETS.register("voc2012_aug")
def voc2012_aug(cfg, split: str):
    """PASCAL VOC 2012 + SBD: train = train_aug (10,582 ids), val = VOC val (1,449)."""
    return _voc2012(cfg, split, aug=True)


@DATASETS.register("voc2012")
def voc2012(cfg, split: str):
    """PASCAL VOC 2012: train = train (1,464 ids), val = val (1,449)."""
    return _voc2012(cfg, split, aug=False)


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
    return DATASETS.get(cfg.name)(cfg, split)
