"""Human parsing datasets of paper 002's Table 4 in their published on-disk layouts: LIP (train) and CIHP (eval).

Layouts (``data.root`` may be the folder named first or the folder holding it)::

    LIP/                                           Look Into Person (Gong et al. 2017; 30,462 train / 10,000 val)
        TrainVal_images/{train_id,val_id}.txt      one image id a line
        TrainVal_images/{train_images,val_images}/<id>.jpg
        TrainVal_parsing_annotations/{train_segmentations,val_segmentations}/<id>.png    values 0..19
    instance-level_human_parsing/                  CIHP (Gong et al. 2018; 28,280 train / 5,000 val)
        {Training,Validation}/{train_id,val_id}.txt
        {Training,Validation}/Images/<id>.jpg
        {Training,Validation}/Category_ids/<id>.png                                      values 0..19

The releases' zips nest a second TrainVal_images/ (TrainVal_parsing_annotations/) folder; that is accepted, and so is
SSSegmentation's flattened LIP folder ({train,val}_images, {train,val}_segmentations, {train,val}_id.txt; its
ssseg/modules/datasets/{lip,cihp}.py).
"""
from __future__ import annotations

from pathlib import Path

from trainers.data.folder import FolderSegmentation, find_top, read_ids, relative_path

__all__ = ["LIP_CLASSES", "CIHP_CLASSES", "FLIP_PAIRS", "LIP", "CIHP"]

# LIP's 20 labels as its release names them (background + 19 parts; stored values 0..19).
LIP_CLASSES: tuple[str, ...] = (
    "Background", "Hat", "Hair", "Glove", "Sunglasses", "Upper-clothes", "Dress", "Coat", "Socks", "Pants",
    "Jumpsuits", "Scarf", "Skirt", "Face", "Left-arm", "Right-arm", "Left-leg", "Right-leg", "Left-shoe", "Right-shoe",
)
# CIHP uses LIP's values with one part renamed: 10 is Torso-skin, not Jumpsuits (Gong et al. 2018; SSSegmentation's
# CIHPDataset 'torsoSkin'). A LIP model scored on CIHP (Table 4) predicts Jumpsuits where CIHP labels Torso-skin.
CIHP_CLASSES: tuple[str, ...] = LIP_CLASSES[:10] + ("Torso-skin",) + LIP_CLASSES[11:]
# A horizontal flip turns a left arm / leg / shoe into a right one (SSSegmentation RandomFlip fixed_seg_target_pairs).
FLIP_PAIRS: tuple[tuple[int, int], ...] = ((14, 15), (16, 17), (18, 19))
assert len(LIP_CLASSES) == len(CIHP_CLASSES) == 20


def _first_existing(top: Path, candidates: list[Path], layout: str, kind: str = "/") -> Path:
    for c in candidates:
        if (c.is_dir() if kind == "/" else c.is_file()):
            return c
    raise FileNotFoundError(f"data.root: {top} has no {relative_path(top, candidates[0])}"
                            f"{kind if kind == '/' else ''} (expected {layout})")


class _ListedParsing(FolderSegmentation):
    """Ids from a list file; <id>.jpg images and <id>.png masks of part values 0..19."""

    flip_pairs = FLIP_PAIRS

    def _listed(self, list_file: Path, images: Path, masks: Path) -> None:
        self.list_file = list_file
        self.ids = self.first(read_ids(list_file))
        self.samples = [(images / f"{i}.jpg", masks / f"{i}.png") for i in self.ids]

    def paths(self, i: int) -> tuple[Path, Path]:
        for p in self.samples[i]:
            if not p.is_file():
                raise FileNotFoundError(f"data.root: {self.root} has no {relative_path(self.root, p)} (listed in "
                                        f"{relative_path(self.root, self.list_file)}; expected {self.layout})")
        return self.samples[i]


class LIP(_ListedParsing):
    """LIP single-person parsing: train = train_id.txt, val = val_id.txt; 20 classes."""

    classes = LIP_CLASSES
    layout = ("the LIP layout TrainVal_images/{train_images,val_images}/<id>.jpg with TrainVal_images/"
              "{train_id,val_id}.txt and TrainVal_parsing_annotations/{train_segmentations,val_segmentations}/<id>.png")

    def __init__(self, root, split: str, image_size: int = 473, size: int | None = None, **pipeline):
        super().__init__(split, image_size=image_size, size=size, **pipeline)
        top = self.root = find_top(root, self.layout, ("LIP",),
                                   ("TrainVal_images", "TrainVal_parsing_annotations", f"{split}_images"))
        imgs, anns = top / "TrainVal_images", top / "TrainVal_parsing_annotations"
        images = _first_existing(top, [imgs / f"{split}_images", imgs / "TrainVal_images" / f"{split}_images",
                                       top / f"{split}_images"], self.layout)
        masks = _first_existing(top, [anns / f"{split}_segmentations",
                                      anns / "TrainVal_parsing_annotations" / f"{split}_segmentations",
                                      top / f"{split}_segmentations"], self.layout)
        list_file = _first_existing(top, [imgs / f"{split}_id.txt", top / f"{split}_id.txt"], self.layout, "file")
        self._listed(list_file, images, masks)


class CIHP(_ListedParsing):
    """CIHP multi-person parsing (its semantic part labels, Category_ids): train = Training, val = Validation."""

    classes = CIHP_CLASSES
    layout = ("the CIHP layout instance-level_human_parsing/{Training,Validation}/{Images/<id>.jpg,"
              "Category_ids/<id>.png,train_id.txt / val_id.txt}")

    def __init__(self, root, split: str, image_size: int = 473, size: int | None = None, **pipeline):
        super().__init__(split, image_size=image_size, size=size, **pipeline)
        top = self.root = find_top(root, self.layout, ("instance-level_human_parsing", "CIHP"),
                                   ("Training", "Validation"))
        part = {"train": "Training", "val": "Validation"}[split]
        images = _first_existing(top, [top / part / "Images"], self.layout)
        masks = _first_existing(top, [top / part / "Category_ids"], self.layout)
        list_file = _first_existing(top, [top / part / f"{split}_id.txt"], self.layout, "file")
        self._listed(list_file, images, masks)
