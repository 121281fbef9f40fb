"""A continual step of any registered dataset: PLOP's Subset (the step's images) with its target transform (the
step's label map), as one 256-entry lookup table applied to each mask tensor.

Which images a step keeps depends on which classes each image holds (tasks.filter_images). That is a (N, 256) bool
matrix per dataset split (`class_presence`), computed once:
    in-memory datasets with a `masks` tensor (synthetic_surgical): one scatter over all masks, vectorised;
    datasets on disk: one pass over the stored masks (`load_mask(i)`, else `load(i)[1]`: VOC, ADE20K), cached in
    $RLSEG_CACHE (default ~/.cache/rlseg)/continual/<hash of dataset, root, split, ids>.npy, as PLOP caches its
    per-step index lists (data/<dataset>/<task>/train-<step>.npy), and in this process for the later steps.

ADE20K: the reduce-zero-label loader's void (255) becomes PLOP's background "other" (tasks.plop_space_lut); so does
any padding its transforms mark 255 (PLOP's own ADE pipeline has no ignore label at all).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from trainers.continual.tasks import Step, eval_images, eval_lut, filter_images, plop_space_lut, train_lut

_PRESENCE: dict[str, torch.Tensor] = {}      # this process's memo, by cache key


def _cache_key(dataset, split: str) -> str:
    ids = getattr(dataset, "ids", None) or [str(pair) for pair in getattr(dataset, "samples", [])] or None
    parts = [type(dataset).__name__, str(getattr(dataset, "root", "")), split, str(len(dataset)),
             str(getattr(dataset, "seed", "")), str(getattr(dataset, "image_size", "")),
             hashlib.sha1("\n".join(map(str, ids)).encode()).hexdigest() if ids is not None else ""]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:20]


def _cache_dir() -> Path:
    return Path(os.environ.get("RLSEG_CACHE", Path.home() / ".cache" / "rlseg")) / "continual"


def class_presence(dataset, split: str) -> torch.Tensor:
    """(N, 256) bool: image i's stored mask holds label value v (before any transform or crop)."""
    masks = getattr(dataset, "masks", None)
    if isinstance(masks, torch.Tensor):       # in memory: one scatter, no per-image loop
        flat = masks.reshape(len(masks), -1).long()
        return torch.zeros(len(masks), 256, dtype=torch.bool).scatter_(1, flat, True)
    key = _cache_key(dataset, split)
    if key in _PRESENCE:
        return _PRESENCE[key]
    path = _cache_dir() / f"{key}.npy"
    if path.is_file():
        present = torch.from_numpy(np.unpackbits(np.load(path), axis=1, count=256).astype(bool))
    else:
        if not hasattr(dataset, "load_mask") and not hasattr(dataset, "load"):
            raise ValueError(f"continual.task: {type(dataset).__name__} exposes neither a `masks` tensor nor "
                             "load_mask(i) / load(i), so the step's images cannot be filtered by class")
        read = getattr(dataset, "load_mask", None) or (lambda i: dataset.load(i)[1])
        present = torch.zeros(len(dataset), 256, dtype=torch.bool)
        for i in range(len(dataset)):         # one pass over the stored masks, then cached on disk
            present[i, torch.from_numpy(np.unique(np.asarray(read(i))).astype(np.int64))] = True
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, np.packbits(present.numpy(), axis=1))
        os.replace(tmp, path)
    _PRESENCE[key] = present
    return present


class ContinualSubset(torch.utils.data.Dataset):
    """PLOP's Subset(dataset, indices, transform, target_transform): the images of one step, masks relabelled by
    `lut` (256,) (raw label value -> model class index or 255). classes: the model's classes at this step."""

    def __init__(self, dataset, indices: torch.Tensor, lut: torch.Tensor, classes: list[str]):
        self.dataset = dataset
        self.indices = indices.tolist()
        self.lut = lut
        self.classes = classes
        self.num_classes = len(classes)
        self.ignore_index = dataset.ignore_index

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        image, mask = self.dataset[self.indices[i]]
        return image, self.lut[mask.long()]


def step_dataset(dataset, split: str, step: Step, family: str, overlap: bool) -> ContinualSubset:
    """The train split of `step` (PLOP's train_dst: filter_images(labels, labels_old, overlap), train LUT) or its
    evaluation split (PLOP's test_dst: every image with a seen class, the unseen ones -> background)."""
    space = plop_space_lut(dataset.num_classes, family)            # raw -> PLOP space
    # presence in PLOP space: image holds PLOP label space[v] for each raw value v it holds
    raw = class_presence(dataset, split)
    present = (raw.float() @ torch.nn.functional.one_hot(space, 256).float()) > 0
    if split == "train":
        indices = filter_images(present, step.labels, step.labels_old, overlap)
        lut = train_lut(step)
    else:
        indices = eval_images(present, step)
        lut = eval_lut(step)
    names = _plop_class_names(dataset, family)
    return ContinualSubset(dataset, indices, lut[space], [names[c] for c in step.order])


def _plop_class_names(dataset, family: str) -> list[str]:
    names = list(dataset.classes)
    if len(names) == 150 and family == "ade":      # reduce-zero-label loader: PLOP's ADE class 0 is "other"
        names = ["other"] + names
    return names
