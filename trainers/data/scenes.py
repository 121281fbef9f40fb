"""Scene parsing datasets of paper 002's Tables 2 and 4 in their published on-disk layouts: ADE20K, Cityscapes, and
the night-time sets evaluated with Cityscapes' label space, Dark Zurich (val) and Nighttime Driving (test).

Layouts (``data.root`` may be the folder named first or the folder holding it)::

    ADEChallengeData2016/                          ADE20K SceneParsing release (20,210 train / 2,000 val)
        images/{training,validation}/ADE_*.jpg
        annotations/{training,validation}/ADE_*.png   0 = "other" (ignored), k = class k - 1 (reduce_zero_label)
    cityscapes/                                    leftImg8bit_trainvaltest + gtFine_trainvaltest (2,975 / 500)
        leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
        gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png      34 label ids -> 19 train ids
                                                   (or *_gtFine_labelTrainIds.png from cityscapesscripts'
                                                   createTrainIdLabelImgs, used as stored when present)
    Dark_Zurich_val_anon/                          Dark Zurich val (50 night images, Sakaridis et al. 2019)
        rgb_anon/val/night/GOPR0356/*_rgb_anon.png
        gt/val/night/GOPR0356/*_gt_labelTrainIds.png
    NighttimeDrivingTest/                          Nighttime Driving test (50 images, Dai & Van Gool 2018)
        leftImg8bit/test/night/*_leftImg8bit.png
        gtCoarse_daytime_trainvaltest/test/night/*_gtCoarse_labelTrainIds.png

The lists are the folders' files, sorted (SSSegmentation reads its own generated lists of the same files:
ssseg/modules/datasets/{ade20k,cityscapes,darkzurich,nighttimedriving}.py). Dark Zurich and Nighttime Driving are
evaluation sets only: their one split is "val" (Nighttime Driving's published test set, as SSSegmentation's
NighttimeDrivingDataset reads it for set "val").
"""
from __future__ import annotations

from pathlib import Path

from trainers.data.folder import FolderSegmentation, find_top, lookup_table, relative_path, require_dir

__all__ = ["ADE20K_CLASSES", "CITYSCAPES_CLASSES", "CITYSCAPES_LABEL_TO_TRAIN", "ADE20K", "Cityscapes",
           "DarkZurich", "NighttimeDriving"]

# ADE20K SceneParsing objectInfo150 (the order of the annotation values 1..150), each entry's first name: the full
# names ("building, edifice", ...; SSSegmentation's ADE20kDataset.classnames) hold commas, which MLflow metric names
# (val/IoU/<class>) may not; mmseg's ADE20KDataset uses these same first names.
ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag"
)

# cityscapesscripts helpers/labels.py: the 19 evaluated classes in trainId order, and labelId -> trainId for them
# (every other label id, and license plate's -1, is ignored; SSSegmentation's CityScapesDataset.clsid2label).
CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation", "terrain",
    "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)
CITYSCAPES_LABEL_TO_TRAIN: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14,
    28: 15, 31: 16, 32: 17, 33: 18,
}
assert len(ADE20K_CLASSES) == len(set(ADE20K_CLASSES)) == 150 and len(CITYSCAPES_CLASSES) == 19


def _sorted_files(top: Path, folder: Path, pattern: str, layout: str) -> list[Path]:
    files = sorted(folder.glob(pattern))
    if not files:
        raise FileNotFoundError(f"data.root: {top} has no {pattern} in {relative_path(top, folder)}/ "
                                f"(expected {layout})")
    return files


class ADE20K(FolderSegmentation):
    """ADE20K SceneParsing: train = images/training, val = images/validation; reduce_zero_label (0 -> ignored,
    k -> k - 1), as SSSegmentation's clsid2label and mmseg's reduce_zero_label."""

    classes = ADE20K_CLASSES
    label_map = lookup_table({k: k - 1 for k in range(1, 151)})
    layout = "the ADE20K layout ADEChallengeData2016/{images,annotations}/{training,validation}/ADE_*.{jpg,png}"

    def __init__(self, root, split: str, image_size: int = 512, size: int | None = None, **pipeline):
        super().__init__(split, image_size=image_size, size=size, **pipeline)
        self.root = find_top(root, self.layout, ("ADEChallengeData2016",), ("images", "annotations"))
        sub = {"train": "training", "val": "validation"}[split]
        images = require_dir(self.root, self.root / "images" / sub, self.layout)
        masks = require_dir(self.root, self.root / "annotations" / sub, self.layout)
        files = self.first(_sorted_files(self.root, images, "ADE_*.jpg", self.layout))
        self.samples = [(f, masks / f"{f.stem}.png") for f in files]


class Cityscapes(FolderSegmentation):
    """Cityscapes fine annotations: train (2,975) / val (500) over every city folder; 19 train ids."""

    classes = CITYSCAPES_CLASSES
    label_map = lookup_table(CITYSCAPES_LABEL_TO_TRAIN)
    layout = ("the Cityscapes layout leftImg8bit/{train,val}/<city>/*_leftImg8bit.png with "
              "gtFine/{train,val}/<city>/*_gtFine_labelIds.png (or *_gtFine_labelTrainIds.png)")

    def __init__(self, root, split: str, image_size: int = 512, size: int | None = None, **pipeline):
        super().__init__(split, image_size=image_size, size=size, **pipeline)
        self.root = find_top(root, self.layout, ("cityscapes", "CityScapes"), ("leftImg8bit", "gtFine"))
        images = require_dir(self.root, self.root / "leftImg8bit" / split, self.layout)
        masks = require_dir(self.root, self.root / "gtFine" / split, self.layout)
        files = self.first(_sorted_files(self.root, images, "*/*_leftImg8bit.png", self.layout))
        self.samples = [(f, masks / f.parent.name / f.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png"))
                        for f in files]

    def paths(self, i: int) -> tuple[Path, Path]:
        image, label_ids = self.samples[i]
        train_ids = label_ids.with_name(label_ids.name.replace("_labelIds.png", "_labelTrainIds.png"))
        if train_ids.is_file():
            return image, train_ids
        return super().paths(i)

    def table_for(self, mask_path: Path):
        """labelTrainIds files are train ids already; labelIds files go through CITYSCAPES_LABEL_TO_TRAIN."""
        return None if mask_path.name.endswith("_labelTrainIds.png") else self.label_map


class _NightEval(FolderSegmentation):
    """A night-time evaluation set in Cityscapes' 19 train ids (stored as *_labelTrainIds.png, 255 ignored)."""

    classes = CITYSCAPES_CLASSES
    splits = ("val",)
    eval_only = True
    names: tuple[str, ...] = ()          # the release's top folder
    marks: tuple[str, ...] = ()          # its top-level folders (data.root may be the top folder itself)
    image_glob = mask_dir = image_suffix = mask_suffix = ""
    image_dir = ""

    def __init__(self, root, split: str = "val", image_size: int = 512, size: int | None = None, **pipeline):
        super().__init__(split, image_size=image_size, size=size, **pipeline)
        self.root = find_top(root, self.layout, self.names, self.marks)
        images = require_dir(self.root, self.root / self.image_dir, self.layout)
        masks = self.root / self.mask_dir
        require_dir(self.root, masks, self.layout)
        files = self.first(_sorted_files(self.root, images, self.image_glob, self.layout))
        self.samples = [(f, masks / f.relative_to(images).parent / f.name.replace(self.image_suffix, self.mask_suffix))
                        for f in files]


class DarkZurich(_NightEval):
    """Dark Zurich val: night images of sequence GOPR0356 with fine Cityscapes-trainId labels."""

    layout = ("the Dark Zurich val layout rgb_anon/val/night/GOPR0356/*_rgb_anon.png with "
              "gt/val/night/GOPR0356/*_gt_labelTrainIds.png")
    data_name = "dark_zurich"
    names, marks = ("Dark_Zurich_val_anon",), ("rgb_anon", "gt")
    image_dir, image_glob, image_suffix = "rgb_anon/val/night", "*/*_rgb_anon.png", "_rgb_anon.png"
    mask_dir, mask_suffix = "gt/val/night", "_gt_labelTrainIds.png"


class NighttimeDriving(_NightEval):
    """Nighttime Driving test: 50 night images with coarse Cityscapes-trainId labels (split "val" reads them)."""

    layout = ("the Nighttime Driving layout NighttimeDrivingTest/leftImg8bit/test/night/*_leftImg8bit.png with "
              "gtCoarse_daytime_trainvaltest/test/night/*_gtCoarse_labelTrainIds.png")
    data_name = "nighttime_driving"
    names, marks = ("NighttimeDrivingTest",), ("leftImg8bit", "gtCoarse_daytime_trainvaltest")
    image_dir, image_glob, image_suffix = "leftImg8bit/test/night", "*_leftImg8bit.png", "_leftImg8bit.png"
    mask_dir, mask_suffix = "gtCoarse_daytime_trainvaltest/test/night", "_gtCoarse_labelTrainIds.png"
