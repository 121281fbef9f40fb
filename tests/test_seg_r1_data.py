"""Foreground data for Seg-R1: the embedded scenes (trainers/data/foreground.py) and the COD10K / CAMO / DUTS
loaders (trainers/data/cod.py) on tiny fixture folders in their published layouts."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import data_root_error
from trainers.config import DataConfig
from trainers.data import build_dataset
from trainers.data.foreground import render_foreground


def _write(image_path: Path, mask_path: Path, w: int, h: int, seed: int) -> np.ndarray:
    """A gradient image and a 0/255 mask whose left half is foreground rows [h/4, 3h/4); returns the 0/1 mask."""
    rng = np.random.default_rng(seed)
    image_path.parent.mkdir(parents=True, exist_ok=True)
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    img = (rng.uniform(0, 255, (h, w, 3))).astype(np.uint8)
    Image.fromarray(img).save(image_path, quality=95)
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4: 3 * h // 4, : w // 2] = 255
    Image.fromarray(mask, mode="L").save(mask_path)
    return (mask > 0).astype(np.uint8)


def make_cod10k(base: Path) -> Path:
    top = base / "COD10K-v3"
    for part, names in {"Train": ["COD10K-CAM-1-Aquatic-1-BatFish-1", "COD10K-CAM-2-Terrestrial-23-Cat-2",
                                  "COD10K-NonCAM-5-Background-1-Bird-3"],
                        "Test": ["COD10K-CAM-3-Flying-53-Bird-3058"]}.items():
        for k, n in enumerate(names):
            _write(top / part / "Image" / f"{n}.jpg", top / part / "GT_Object" / f"{n}.png", 40, 24, k)
    return base


def make_camo(base: Path) -> Path:
    top = base / "CAMO-V.1.0-CVIU2019"
    for k, (split, n) in enumerate([("Train", "camourflage_00001"), ("Train", "camourflage_00002"),
                                    ("Test", "camourflage_01001")]):
        _write(top / "Images" / split / f"{n}.jpg", top / "GT" / f"{n}.png", 30, 30, k)
    return base


def make_duts(base: Path) -> Path:
    for k, (name, n) in enumerate([("DUTS-TR", "n01443537_11099"), ("DUTS-TR", "ILSVRC2012_test_00000004"),
                                   ("DUTS-TE", "ILSVRC2012_test_00000003")]):
        _write(base / name / f"{name}-Image" / f"{n}.jpg", base / name / f"{name}-Mask" / f"{n}.png", 36, 20, k)
    return base


LAYOUTS = {"cod10k": (make_cod10k, 2, 1), "camo": (make_camo, 2, 1), "duts": (make_duts, 2, 1)}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_loader_reads_its_published_layout(tmp_path, name):
    make, n_train, n_val = LAYOUTS[name]
    root = make(tmp_path)
    cfg = DataConfig(name=name, root=str(root), image_size=16, train_size=None, val_size=None)
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert (len(train), len(val)) == (n_train, n_val)      # COD10K: the NonCAM image is left out
    torch.manual_seed(0)
    image, mask = val[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    assert mask.dtype == torch.int64 and set(mask.unique().tolist()) == {0, 1}   # binarised once: 0/255 -> 0/1
    expected = np.zeros((16, 16), np.int64)
    expected[4:12, :8] = 1                                  # the fixture's box, nearest-resized
    assert np.array_equal(mask.numpy(), expected)
    flips = {bool(train[0][1][:, 0].any()) for _ in range(16)}
    assert flips == {True, False}                           # training images flip (left half <-> right half)


def test_duts_te_alone_is_the_val_split(tmp_path):
    """data.root may name DUTS-TE itself: the val split reads it."""
    make_duts(tmp_path)
    cfg = DataConfig(name="duts", root=str(tmp_path / "DUTS-TE"), image_size=16, val_size=None)
    assert len(build_dataset(cfg, "val")) == 1


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_loader_errors_name_data_root(tmp_path, name):
    with pytest.raises(FileNotFoundError) as e:
        build_dataset(DataConfig(name=name, root=str(tmp_path / "nowhere")), "train")
    assert "does not exist" in data_root_error(e)
    with pytest.raises(FileNotFoundError) as e:
        build_dataset(DataConfig(name=name, root=str(tmp_path)), "val")
    assert "has no" in data_root_error(e)
    make, _, _ = LAYOUTS[name]
    make(tmp_path)
    victim = sorted(tmp_path.rglob("*.png"))[0]
    victim.unlink()
    with pytest.raises(FileNotFoundError) as e:
        for split in ("train", "val"):
            build_dataset(DataConfig(name=name, root=str(tmp_path), train_size=None, val_size=None), split)
    assert "is missing" in data_root_error(e) and victim.name in data_root_error(e)


def test_synthetic_scenes_are_deterministic_binary_and_camouflaged():
    image, mask = render_foreground(3, 7, 64)
    again = render_foreground(3, 7, 64)
    assert np.array_equal(image, again[0]) and np.array_equal(mask, again[1])
    assert not np.array_equal(image, render_foreground(3, 8, 64)[0])
    assert set(np.unique(mask)) == {0, 1} and 0.02 < mask.mean() < 0.3
    assert not mask[0].any() and not mask[-1].any() and not mask[:, 0].any() and not mask[:, -1].any()
    # camouflage: the object's mean colour is much closer to its background's than in the salient flavour
    gaps = {}
    for flavour in ("camouflaged", "salient"):
        d = []
        for i in range(16):
            img, m = render_foreground(0, i, 64, flavour)
            img = img.astype(np.float64) / 255
            d.append(np.abs(img[:, m == 1].mean(1) - img[:, m == 0].mean(1)).mean())
        gaps[flavour] = np.mean(d)
    assert gaps["camouflaged"] < 0.5 * gaps["salient"], gaps
    ds = build_dataset(DataConfig(name="synthetic_cod", image_size=32, train_size=4, val_size=2), "val")
    assert len(ds) == 2 and ds[0][0].shape == (3, 32, 32) and set(ds[0][1].unique().tolist()) <= {0, 1}
