"""PASCAL VOC 2012 (+ SBD aug) loader (trainers/data/voc.py) against tiny on-disk fixture trees."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import data_root_error
from trainers.data import voc
from trainers.data.voc import (
    CLASSES,
    IGNORE_INDEX,
    MEAN,
    PALETTE,
    STD,
    VOCSegmentation,
    apply_train_transform,
)

S = 32
# id -> (width, height); val sizes make the val resize exact (longer side already S, or exactly 2 S).
VAL = {"2008_000001": (32, 16), "2008_000002": (16, 32), "2008_000003": (64, 32)}
TRAIN = {"2007_000001": (40, 30), "2007_000002": (30, 50), "2007_000003": (40, 30)}
AUG_EXTRA = {"2010_000001": (30, 50), "2010_000002": (40, 30), "2010_000003": (36, 36)}
# SegmentationClass masks use these object classes, SegmentationClassAug masks the others, so a test
# can tell which folder a mask came from.
VOC_CLASSES = np.arange(1, 11)
AUG_CLASSES = np.arange(11, 21)
VALID = set(range(21)) | {IGNORE_INDEX}


def _mask(w: int, h: int, classes: np.ndarray, seed: int) -> np.ndarray:
    """Random 2x2-block class map (background + objects from `classes`) with a 2 px 255 border
    (also block aligned for even sizes, so an exact 2x nearest downscale is mask[::2, ::2])."""
    rng = np.random.default_rng(seed)
    small = rng.choice(np.concatenate([[0], classes]), size=((h + 1) // 2, (w + 1) // 2))
    m = np.kron(small, np.ones((2, 2), dtype=np.int64))[:h, :w].astype(np.uint8)
    m[:2, :] = m[-2:, :] = m[:, :2] = m[:, -2:] = IGNORE_INDEX
    return m


def _image(w: int, h: int, seed: int) -> np.ndarray:
    """A smooth colour gradient (survives JPEG well), different per image."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 40 + 150 * x / max(w - 1, 1)
    g = 60 + 120 * y / max(h - 1, 1)
    b = np.full_like(x, 30 + 20 * (seed % 8))
    return np.stack([r, g, b], axis=-1).round().astype(np.uint8)


def _palette_png(mask: np.ndarray, path: Path) -> None:
    """Save as VOC does: a mode "P" PNG whose pixel values are the class indices."""
    im = Image.fromarray(mask, mode="L").copy()
    im.putpalette([v for c in voc.voc_palette(256) for v in c])  # L -> P, indices unchanged
    assert im.mode == "P"
    im.save(path)


def make_voc(base: Path, aug_list: str = "train_aug.txt", deeplab_lines: bool = False) -> Path:
    """Write a tiny VOC 2012 + SBD aug tree under base; return base (the folder holding VOCdevkit)."""
    v = base / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "ImageSets/Segmentation"):
        (v / d).mkdir(parents=True, exist_ok=True)
    for k, (sid, (w, h)) in enumerate({**VAL, **TRAIN, **AUG_EXTRA}.items()):
        Image.fromarray(_image(w, h, k)).save(v / "JPEGImages" / f"{sid}.jpg", quality=95)
        if sid in VAL or sid in TRAIN:
            _palette_png(_mask(w, h, VOC_CLASSES, k), v / "SegmentationClass" / f"{sid}.png")
        if sid in TRAIN or sid in AUG_EXTRA:
            Image.fromarray(_mask(w, h, AUG_CLASSES, 100 + k), mode="L").save(
                v / "SegmentationClassAug" / f"{sid}.png")
    sets = v / "ImageSets" / "Segmentation"
    sets.joinpath("val.txt").write_text("".join(f"{i}\n" for i in VAL))
    sets.joinpath("train.txt").write_text("".join(f"{i}\n" for i in TRAIN))
    aug_ids = [*TRAIN, *AUG_EXTRA]
    if deeplab_lines:
        text = "".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n" for i in aug_ids)
    else:
        text = "".join(f"{i}\n" for i in aug_ids) + "\n"  # a trailing blank line is tolerated
    sets.joinpath(aug_list).write_text(text)
    return base


@pytest.fixture
def root(tmp_path) -> Path:
    return make_voc(tmp_path / "data")


def _voc_dir(root: Path) -> Path:
    return root / "VOCdevkit" / "VOC2012"


def _normalised(rgb: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(rgb.astype(np.float32)).permute(2, 0, 1) / 255.0
    return (t - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


# ------------------------------------------------------------------ constants


def test_constants():
    assert len(CLASSES) == 21 and CLASSES[0] == "background" and CLASSES[-1] == "tvmonitor"
    assert CLASSES[15] == "person" and CLASSES[11] == "diningtable"
    assert VOCSegmentation.num_classes == 21 and VOCSegmentation.classes == CLASSES
    assert VOCSegmentation.ignore_index == IGNORE_INDEX == 255
    assert VOCSegmentation.splits == ("train", "val")
    assert len(PALETTE) == 21 and len(set(PALETTE)) == 21 and VOCSegmentation.palette == PALETTE
    assert PALETTE[0] == (0, 0, 0) and PALETTE[1] == (128, 0, 0) and PALETTE[2] == (0, 128, 0)
    assert PALETTE[15] == (192, 128, 128) and PALETTE[20] == (0, 64, 128)
    assert voc.voc_palette(256)[255] == (224, 224, 192)


# ------------------------------------------------------------------ lists / lengths


def test_lengths_and_size_truncation(root):
    assert len(VOCSegmentation(root, "train", S, aug=True)) == 6
    assert len(VOCSegmentation(root, "train", S, aug=False)) == 3
    assert len(VOCSegmentation(root, "val", S, aug=True)) == 3
    assert len(VOCSegmentation(root, "val", S, aug=False)) == 3
    ds = VOCSegmentation(root, "train", S, size=4, aug=True)
    assert len(ds) == 4 and ds.ids == [*TRAIN, *AUG_EXTRA][:4]
    assert VOCSegmentation(root, "val", S, size=1).ids == ["2008_000001"]
    assert len(VOCSegmentation(root, "val", S, size=100)) == 3


def test_unknown_split(root):
    with pytest.raises(ValueError, match="unknown split 'test'"):
        VOCSegmentation(root, "test", S)


@pytest.mark.parametrize("sub", ["", "VOCdevkit", "VOCdevkit/VOC2012"])
def test_root_may_point_at_any_level(root, sub):
    ds = VOCSegmentation(root / sub if sub else root, "val", S)
    assert ds.voc == _voc_dir(root)
    assert ds.ids == list(VAL)
    ref = VOCSegmentation(root, "val", S)
    assert torch.equal(ds[0][1], ref[0][1])


def test_aug_txt_and_deeplab_list_format(tmp_path):
    r = make_voc(tmp_path / "a", aug_list="aug.txt", deeplab_lines=True)
    ds = VOCSegmentation(r, "train", S, aug=True)
    assert ds.list_file.name == "aug.txt"
    assert ds.ids == [*TRAIN, *AUG_EXTRA]
    # train_aug.txt wins over aug.txt when both exist
    sets = _voc_dir(r) / "ImageSets" / "Segmentation"
    sets.joinpath("train_aug.txt").write_text("2010_000001\n")
    ds = VOCSegmentation(r, "train", S, aug=True)
    assert ds.list_file.name == "train_aug.txt" and ds.ids == ["2010_000001"]


# ------------------------------------------------------------------ reading masks


def test_palette_png_read_as_indices(root):
    sid = "2008_000001"
    path = _voc_dir(root) / "SegmentationClass" / f"{sid}.png"
    with Image.open(path) as im:
        assert im.mode == "P"
        rgb = np.array(im.convert("RGB"))
    written = _mask(*VAL[sid], VOC_CLASSES, 0)
    assert rgb.shape == (*written.shape, 3) and not np.array_equal(rgb[..., 0], written)
    image, mask = VOCSegmentation(root, "val", S).load(0)
    assert mask.shape == written.shape and mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, written)
    assert image.mode == "RGB" and image.size == VAL[sid]


def test_masks_come_from_the_right_folder(root):
    aug = VOCSegmentation(root, "train", S, aug=True)
    plain = VOCSegmentation(root, "train", S, aug=False)
    val = VOCSegmentation(root, "val", S, aug=True)
    objects = lambda ds: {int(v) for i in range(len(ds)) for v in np.unique(ds.load(i)[1])} - {0, 255}
    assert objects(aug) and objects(aug) <= set(AUG_CLASSES.tolist())     # SegmentationClassAug
    assert objects(plain) and objects(plain) <= set(VOC_CLASSES.tolist())  # SegmentationClass
    assert objects(val) and objects(val) <= set(VOC_CLASSES.tolist())      # val always from SegmentationClass
    assert aug.mask_dir.name == "SegmentationClassAug" and val.mask_dir.name == "SegmentationClass"


# ------------------------------------------------------------------ val transform


def test_val_items_exact(root):
    ds = VOCSegmentation(root, "val", S)
    jpeg = lambda sid: np.array(Image.open(_voc_dir(root) / "JPEGImages" / f"{sid}.jpg").convert("RGB"))
    for i, (sid, (w, h)) in enumerate(VAL.items()):
        image, mask = ds[i]
        assert image.shape == (3, S, S) and image.dtype == torch.float32
        assert mask.shape == (S, S) and mask.dtype == torch.int64
        written = torch.from_numpy(_mask(w, h, VOC_CLASSES, i).astype(np.int64))
        if max(w, h) == 2 * S:  # exact factor 2 of a 2x2-block mask: nearest picks one pixel per block
            written = written[::2, ::2]
            assert torch.equal(image[:, : h // 2, : w // 2], _normalised(np.array(
                Image.fromarray(jpeg(sid)).resize((w // 2, h // 2), Image.BILINEAR))))
        else:  # longer side already S: no resize, the image is the decoded JPEG, normalised
            assert torch.allclose(image[:, :h, :w], _normalised(jpeg(sid)), atol=1e-6)
        hh, ww = written.shape
        assert torch.equal(mask[:hh, :ww], written)
        # the padded area (bottom or right) is ignored and mean-coloured
        assert (mask[hh:, :] == 255).all() and (mask[:, ww:] == 255).all()
        assert (image[:, hh:, :] == 0).all() and (image[:, :, ww:] == 0).all()
        assert (mask != 255).sum() > 0


def test_val_is_deterministic(root):
    ds = VOCSegmentation(root, "val", S)
    torch.manual_seed(0)
    a = ds[2]
    torch.manual_seed(1)
    b = ds[2]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ------------------------------------------------------------------ train transform


def test_train_shapes_and_labels(root):
    torch.manual_seed(0)
    for aug in (True, False):
        ds = VOCSegmentation(root, "train", S, aug=aug)
        for _ in range(3):
            for i in range(len(ds)):
                image, mask = ds[i]
                assert image.shape == (3, S, S) and image.dtype == torch.float32
                assert mask.shape == (S, S) and mask.dtype == torch.int64
                assert {int(v) for v in mask.unique()} <= VALID
    val = VOCSegmentation(root, "val", S)
    assert all({int(v) for v in val[i][1].unique()} <= VALID for i in range(len(val)))


def test_train_reproducible_and_resumable(root):
    ds = VOCSegmentation(root, "train", S, aug=True)

    def epoch(seed):
        torch.manual_seed(seed)
        return [ds[i] for i in range(len(ds))]

    a, b, c = epoch(0), epoch(0), epoch(1)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
    assert any(not torch.equal(x[0], y[0]) for x, y in zip(a, c))
    # resuming from a saved torch RNG state replays the same augmentation
    torch.manual_seed(5)
    ds[0]
    state = torch.get_rng_state()
    first = ds[1]
    torch.set_rng_state(state)
    again = ds[1]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_train_random_scale_covers_padding_and_cropping(root):
    ds = VOCSegmentation(root, "train", S, aug=False, size=1)  # a 40 x 30 image: shorter side 30
    torch.manual_seed(0)
    padded = []
    for _ in range(40):
        ignored = ds[0][1] == 255
        padded.append(bool(ignored.all(dim=0).any() or ignored.all(dim=1).any()))
    # ratio < ~0.97 (about a third of the draws) leaves whole padded rows/columns; larger ratios don't
    assert 0 < sum(padded) < len(padded)


def _halves(w=40, h=40):
    """Image black left / white right; mask class 1 left / class 2 right."""
    img = np.zeros((h, w, 3), np.uint8)
    img[:, w // 2:] = 255
    mask = np.ones((h, w), np.uint8)
    mask[:, w // 2:] = 2
    return Image.fromarray(img), mask


def test_apply_train_transform_flip():
    image, mask = _halves()
    # ratio 1: shorter side 40 -> 32, a 32 x 32 result, no crop, no pad
    im0, m0 = apply_train_transform(image, mask, S, 1.0, 0, 0, False)
    im1, m1 = apply_train_transform(image, mask, S, 1.0, 0, 0, True)
    assert (m0[:, :16] == 1).all() and (m0[:, 16:] == 2).all()
    assert (m1[:, :16] == 2).all() and (m1[:, 16:] == 1).all()
    assert torch.equal(im1, im0.flip(-1)) and torch.equal(m1, m0.flip(-1))
    assert im0[0, 0, 0] < 0 < im0[0, 0, -1]  # black left, white right before the flip


def test_apply_train_transform_pad_and_crop():
    image, mask = _halves()
    # ratio 0.5: 16 x 16, padded bottom/right (image 0, mask 255); flipped, the pad is on the left
    im, m = apply_train_transform(image, mask, S, 0.5, 0, 0, False)
    assert (m[:16, :8] == 1).all() and (m[:16, 8:16] == 2).all()
    assert (m[16:] == 255).all() and (m[:, 16:] == 255).all()
    assert (im[:, 16:] == 0).all() and (im[:, :, 16:] == 0).all()
    _, mf = apply_train_transform(image, mask, S, 0.5, 0, 0, True)
    assert (mf[:, :16] == 255).all() and (mf[:16, 16:24] == 2).all()
    # ratio 2: 64 x 64 (nearest: columns 0-31 class 1, 32-63 class 2); crops pick the quadrants
    _, left = apply_train_transform(image, mask, S, 2.0, 32, 0, False)
    _, right = apply_train_transform(image, mask, S, 2.0, 0, 32, False)
    assert (left == 1).all() and (right == 2).all()


def test_apply_train_transform_scales_the_shorter_side():
    image, mask = _halves(w=40, h=20)
    assert voc.rescaled_size(40, 20, S, 1.0) == (64, 32) and voc.rescaled_size(30, 50, S, 0.5) == (16, 27)
    # ratio 1: the shorter side (20) becomes S, so 64 x 32; the left crop sees only class 1, no padding
    _, left = apply_train_transform(image, mask, S, 1.0, 0, 0, False)
    _, right = apply_train_transform(image, mask, S, 1.0, 0, 32, False)
    assert (left == 1).all() and (right == 2).all()


def test_train_batches_with_default_collate(root):
    torch.manual_seed(0)
    for split in ("train", "val"):
        ds = VOCSegmentation(root, split, S, aug=True)
        images, masks = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
        assert images.shape == (3, 3, S, S) and masks.shape == (3, S, S) and masks.dtype == torch.int64


# ------------------------------------------------------------------ errors


def test_root_not_set():
    with pytest.raises(FileNotFoundError) as e:
        VOCSegmentation(None, "train", S, aug=True)
    assert "not set" in data_root_error(e)


def test_root_missing(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as e:
        VOCSegmentation(missing, "val", S)
    assert str(missing) in data_root_error(e)
    with pytest.raises(FileNotFoundError) as e:
        VOCSegmentation(tmp_path, "val", S)  # exists, but holds no VOC tree
    msg = data_root_error(e)
    assert str(tmp_path) in msg and "VOCdevkit/VOC2012" in msg


def test_missing_list_and_folders(root):
    sets = _voc_dir(root) / "ImageSets" / "Segmentation"
    (sets / "train_aug.txt").unlink()
    with pytest.raises(FileNotFoundError) as e:
        VOCSegmentation(root, "train", S, aug=True)
    msg = data_root_error(e)
    assert str(root) in msg and "VOCdevkit/VOC2012/ImageSets/Segmentation/train_aug.txt" in msg
    assert "aug" in msg.split("expected", 1)[1]
    VOCSegmentation(root, "train", S, aug=False)  # the plain VOC train list is still there
    shutil.rmtree(_voc_dir(root) / "SegmentationClass")
    with pytest.raises(FileNotFoundError) as e:
        VOCSegmentation(root, "val", S)
    assert "VOCdevkit/VOC2012/SegmentationClass" in data_root_error(e)


def test_missing_file_is_reported_lazily(root):
    (_voc_dir(root) / "JPEGImages" / "2008_000002.jpg").unlink()
    ds = VOCSegmentation(root, "val", S)  # files are not read eagerly
    ds[0]
    with pytest.raises(FileNotFoundError) as e:
        ds[1]
    msg = data_root_error(e)
    assert "VOCdevkit/VOC2012/JPEGImages/2008_000002.jpg" in msg and "val.txt" in msg


# ------------------------------------------------------------------ registry / config


def test_registry_config_and_build_dataset(root):
    from trainers.config import Config
    from trainers.data import build_dataset
    from trainers.registry import DATASETS, load_all

    load_all()
    assert callable(DATASETS.get("voc2012_aug")) and callable(DATASETS.get("voc2012"))
    cfg = Config(data={"name": "voc2012_aug", "root": str(root), "image_size": S, "train_size": 4, "val_size": None})
    train, val = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "val")
    assert isinstance(train, VOCSegmentation) and train.aug and train.split == "train"
    assert len(train) == 4 and len(val) == 3 and train.num_classes == 21 and train.ignore_index == 255
    image, mask = train[0]
    assert image.shape == (3, S, S) and mask.shape == (S, S)
    plain = Config(data={"name": "voc2012", "root": str(root), "image_size": S, "train_size": None})
    assert len(build_dataset(plain.data, "train")) == 3
    assert build_dataset(plain.data, "train").mask_dir.name == "SegmentationClass"
    with pytest.raises(FileNotFoundError, match="^data.root: not set"):
        build_dataset(Config(data={"name": "voc2012_aug"}).data, "train")
