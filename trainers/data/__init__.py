"""Datasets by name. A builder takes (DataConfig, split) and returns a torch Dataset with
`classes`, `num_classes` and `ignore_index` attributes."""
from __future__ import annotations

from trainers.registry import DATASETS


@DATASETS.register("synthetic_surgical")
def synthetic_surgical(cfg, split: str):
    from trainers.data.synthetic import SyntheticSurgical

    size = cfg.train_size if split == "train" else cfg.val_size
    return SyntheticSurgical(split, size=size or (512 if split == "train" else 128),
                             image_size=cfg.image_size, seed=cfg.seed)


def _voc2012(cfg, split: str, aug: bool):
    from trainers.data.voc import VOCSegmentation

    size = cfg.train_size if split == "train" else cfg.val_size
    return VOCSegmentation(cfg.root, split, image_size=cfg.image_size, size=size, aug=aug)


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

    size = cfg.train_size if split == "train" else cfg.val_size
    return EndoVis2018(cfg.root, split, image_size=cfg.image_size, size=size)


def build_dataset(cfg, split: str):
    return DATASETS.get(cfg.name)(cfg, split)
