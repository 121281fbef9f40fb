"""EndoVis 2018 robotic scene segmentation (MICCAI 2018 challenge), 12 classes.

Layout on disk, as released::

    <split>/seq_<n>/left_frames/frame<k>.png   RGB frames (1280 x 1024)
    <split>/seq_<n>/labels/frame<k>.png        colour-coded RGB label images (PALETTE below)
    <split>/seq_<n>/labels.json                optional: [{"name", "color", "classid"}, ...]

``data.root`` is either

* the dataset folder holding ``train/`` and ``val/`` (many papers call the released test set
  ``val``): split ``s`` reads the sequences under ``root/s``; or
* a folder holding ``seq_<n>`` folders directly: a sequence split, val = ``VAL_SEQUENCES``
  (seq_2, 5, 9, 15: the ISINet / MATIS split of the released training data), train = the rest.

A sample is a frame of ``labels/`` (frames without a label image are not listed); its image is
``left_frames/`` with the same name. Samples are sorted by sequence number, then frame number
(numerically, so seq_10 comes after seq_2). Label colours are mapped to class ids with a vectorised
lookup; a colour that is not in PALETTE maps to 255 (IGNORE_INDEX) silently, so e.g. anti-aliased
edges never count in the loss or the metrics. A sequence's ``labels.json``, when present, must
list exactly CLASSES / PALETTE with ids 0..11, otherwise the dataset raises a ValueError naming it.

Transforms at S = ``image_size`` (as CLIP-RL, which resizes to 224 x 224):

* train: resize the whole frame to S x S (bilinear image, nearest mask; the 5:4 aspect ratio is
  not kept), normalise with the ImageNet mean/std, horizontal flip with probability 0.5 drawn from
  the torch global RNG (reproducible from ``torch.manual_seed``, resumable from
  ``torch.get_rng_state()``).
* val: the same resize and normalisation, no flip.

``__getitem__`` returns ``(image float32 (3, S, S), mask int64 (S, S))``; files are read lazily.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trainers.data.voc import IGNORE_INDEX, MEAN, STD, relative_path, resize_pair, to_tensors

__all__ = [
    "CLASSES",
    "PALETTE",
    "IGNORE_INDEX",
    "MEAN",
    "STD",
    "VAL_SEQUENCES",
    "colour_to_class",
    "check_labels_json",
    "find_endovis2018",
    "apply_train_transform",
    "train_transform",
    "val_transform",
    "EndoVis2018",
]

CLASSES: tuple[str, ...] = (
    "background-tissue", "instrument-shaft", "instrument-clasper", "instrument-wrist",
    "kidney-parenchyma", "covered-kidney", "thread", "clamps", "suturing-needle",
    "suction-instrument", "small-intestine", "ultrasound-probe",
)

# The dataset's labels.json colours (RGB), in CLASSES order (class id = index).
PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0),        # background-tissue
    (0, 255, 0),      # instrument-shaft
    (0, 255, 255),    # instrument-clasper
    (125, 255, 12),   # instrument-wrist
    (255, 55, 0),     # kidney-parenchyma
    (24, 55, 125),    # covered-kidney
    (187, 155, 25),   # thread
    (0, 255, 125),    # clamps
    (255, 255, 125),  # suturing-needle
    (123, 15, 175),   # suction-instrument
    (124, 155, 5),    # small-intestine
    (12, 255, 141),   # ultrasound-probe
)

# Sequences held out for val when data.root holds seq_<n> folders directly.
VAL_SEQUENCES: tuple[int, ...] = (2, 5, 9, 15)

LAYOUT = ("the EndoVis 2018 layout {train,val}/seq_<n>/{left_frames,labels}/frame<k>.png, "
          "or seq_<n>/{left_frames,labels}/frame<k>.png directly under data.root "
          f"(val = seq_{', '.join(map(str, VAL_SEQUENCES))})")

_SEQ = re.compile(r"seq_(\d+)")
_NUM = re.compile(r"(\d+)")

# 24-bit colour codes of PALETTE, sorted, with the class id of each (for np.searchsorted).
_CODES = np.array([(r << 16) | (g << 8) | b for r, g, b in PALETTE], dtype=np.int64)
_ORDER = np.argsort(_CODES)
_SORTED_CODES = _CODES[_ORDER]
_SORTED_IDS = _ORDER.astype(np.uint8)


# --------------------------------------------------------------------------------------------
# labels
# --------------------------------------------------------------------------------------------


def colour_to_class(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 colour label image -> (H, W) uint8 class ids; colours not in PALETTE -> 255."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) colour label image, got shape {rgb.shape}")
    rgb = rgb.astype(np.int64)
    codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    pos = np.minimum(np.searchsorted(_SORTED_CODES, codes), len(_SORTED_CODES) - 1)
    return np.where(_SORTED_CODES[pos] == codes, _SORTED_IDS[pos], IGNORE_INDEX).astype(np.uint8)


def check_labels_json(path: Path) -> None:
    """Raise a one-line ValueError naming ``path`` unless it lists exactly CLASSES / PALETTE / ids."""
    try:
        entries = json.loads(Path(path).read_text())
        found = {(int(e["classid"]), str(e["name"]), tuple(int(c) for c in e["color"])) for e in entries}
        if len(found) != len(entries):
            raise ValueError("duplicate entries")
    except (ValueError, KeyError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"{path}: not a labels.json list of {{name, color, classid}} ({e})") from None
    expected = {(i, name, colour) for i, (name, colour) in enumerate(zip(CLASSES, PALETTE))}
    if found != expected:
        diff = sorted(found ^ expected)[0]
        what = "unexpected" if diff in found else "missing"
        raise ValueError(f"{path}: does not match the EndoVis 2018 classes ({what} entry classid={diff[0]} "
                         f"name={diff[1]!r} color={list(diff[2])}); expected {len(CLASSES)} classes "
                         f"with the ids and colours of trainers.data.endovis.CLASSES / PALETTE")


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------


def _seq_dirs(folder: Path) -> dict[int, Path]:
    """seq_<n> folders of ``folder`` by sequence number."""
    out = {}
    for p in folder.iterdir():
        m = _SEQ.fullmatch(p.name)
        if m and p.is_dir():
            out[int(m.group(1))] = p
    return out


def find_endovis2018(root, split: str) -> tuple[Path, list[Path]]:
    """(the folder whose seq_<n> folders were used, the split's sequence folders sorted numerically)."""
    if root is None:
        raise FileNotFoundError(f"data.root: not set (expected a folder holding {LAYOUT})")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data.root: {root} does not exist or is not a folder (expected {LAYOUT})")
    if (root / "train").is_dir() or (root / "val").is_dir():
        folder = root / split
        if not folder.is_dir():
            raise FileNotFoundError(f"data.root: {root} has no {split}/ folder (expected {LAYOUT})")
        seqs = _seq_dirs(folder)
        if not seqs:
            raise FileNotFoundError(f"data.root: {root} has no {split}/seq_<n> folders (expected {LAYOUT})")
        return folder, [seqs[n] for n in sorted(seqs)]
    seqs = _seq_dirs(root)
    if not seqs:
        raise FileNotFoundError(f"data.root: {root} has no train/, val/ or seq_<n> folders (expected {LAYOUT})")
    chosen = sorted(n for n in seqs if (n in VAL_SEQUENCES) == (split == "val"))
    if not chosen:
        which = ", ".join(f"seq_{n}" for n in VAL_SEQUENCES)
        what = f"none of the val sequences {which}" if split == "val" else f"no train sequences (besides {which})"
        raise FileNotFoundError(f"data.root: {root} has {what} (expected {LAYOUT})")
    return root, [seqs[n] for n in chosen]


def _frame_key(path: Path) -> tuple:
    nums = _NUM.findall(path.stem)
    return (int(nums[-1]) if nums else -1, path.name)


# --------------------------------------------------------------------------------------------
# transforms (image: PIL RGB; mask: uint8 (H, W) numpy array of class indices)
# --------------------------------------------------------------------------------------------


def apply_train_transform(image: Image.Image, mask: np.ndarray, size: int,
                          flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The training transform with its random draw given: resize to size x size, normalise, flip."""
    img_t, mask_t = val_transform(image, mask, size)
    if flip:
        img_t, mask_t = img_t.flip(-1), mask_t.flip(-1)
    return img_t, mask_t


def train_transform(image: Image.Image, mask: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize to size x size, normalise, random horizontal flip (p = 0.5, torch global RNG)."""
    flip = bool(torch.rand(()).item() < 0.5)
    return apply_train_transform(image, mask, size, flip)


def val_transform(image: Image.Image, mask: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize the whole frame to size x size (bilinear image, nearest mask), normalise."""
    return to_tensors(*resize_pair(image, mask, size, size), size)


# --------------------------------------------------------------------------------------------
# torch dataset
# --------------------------------------------------------------------------------------------


class EndoVis2018(torch.utils.data.Dataset):
    """EndoVis 2018 robotic scene segmentation.

    ``split="train"`` / ``"val"``: the sequences of ``root/<split>`` or, when ``root`` holds
    ``seq_<n>`` folders directly, the sequence split (val = VAL_SEQUENCES). ``size``: the first
    ``size`` frames in (sequence, frame) order (None: all). Frames are read in ``__getitem__``;
    the sequences' optional labels.json files are checked in ``__init__``.
    """

    classes = CLASSES
    num_classes = len(CLASSES)
    ignore_index = IGNORE_INDEX
    palette = PALETTE
    splits = ("train", "val")

    def __init__(self, root, split: str, image_size: int = 224, size: int | None = None):
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; valid splits are {', '.join(map(repr, self.splits))}")
        if size is not None and int(size) < 0:
            raise ValueError(f"size must be >= 0 or None, got {size}")
        self.split = split
        self.image_size = int(image_size)
        self.folder, seq_dirs = find_endovis2018(root, split)
        self.root = Path(root).expanduser()
        self.sequences = [int(_SEQ.fullmatch(d.name).group(1)) for d in seq_dirs]
        self.ids: list[str] = []  # "seq_<n>/frame<k>" relative to self.folder
        for d in seq_dirs:
            labels = d / "labels"
            if not labels.is_dir():
                raise FileNotFoundError(f"data.root: {self.root} has no {relative_path(self.root, labels)}/ "
                                        f"(expected {LAYOUT})")
            if (d / "labels.json").is_file():
                check_labels_json(d / "labels.json")
            frames = sorted(labels.glob("*.png"), key=_frame_key)
            self.ids += [f"{d.name}/{p.stem}" for p in frames]
        if not self.ids:
            raise FileNotFoundError(f"data.root: {self.root} has no labelled frames in "
                                    f"{relative_path(self.root, self.folder / 'seq_<n>' / 'labels')}/*.png "
                                    f"for split {split!r} (expected {LAYOUT})")
        if size is not None:
            self.ids = self.ids[: int(size)]

    def __len__(self) -> int:
        return len(self.ids)

    def _path(self, sample_id: str, kind: str) -> Path:
        seq, frame = sample_id.split("/")
        p = self.folder / seq / kind / f"{frame}.png"
        if not p.is_file():
            raise FileNotFoundError(f"data.root: {self.root} has no {relative_path(self.root, p)} (expected {LAYOUT})")
        return p

    def load(self, i: int) -> tuple[Image.Image, np.ndarray]:
        """The i-th frame (PIL RGB) and its mask (uint8 (H, W) class ids, unknown colours 255)."""
        sample_id = self.ids[i]
        image_path = self._path(sample_id, "left_frames")
        label_path = self._path(sample_id, "labels")
        with Image.open(image_path) as im:
            image = im.convert("RGB")
        with Image.open(label_path) as lab:
            mask = colour_to_class(np.asarray(lab.convert("RGB")))
        if mask.shape != (image.size[1], image.size[0]):
            raise ValueError(f"{label_path}: label size {mask.shape[::-1]} differs from the frame size {image.size}")
        return image, mask

    def __getitem__(self, i):
        image, mask = self.load(i)
        if self.split == "train":
            return train_transform(image, mask, self.image_size)
        return val_transform(image, mask, self.image_size)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, "
            f"sequences={self.sequences}, size={len(self)}, image_size={self.image_size})"
        )
