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


def build_dataset(cfg, split: str):
    return DATASETS.get(cfg.name)(cfg, split)
