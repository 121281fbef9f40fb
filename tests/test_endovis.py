"""EndoVis 2018 loader (trainers/data/endovis.py) against tiny on-disk fixture trees in the real layout."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import data_root_error
from trainers.data import endovis
from trainers.data.endovis import (
    CLASSES,
    IGNORE_INDEX,
    MEAN,
    PALETTE,
    STD,
    VAL_SEQUENCES,
    EndoVis2018,
    apply_train_transform,
    colour_to_class,
)

S = 32
UNKNOWN = (1, 2, 3)  # a colour that is not in the palette
# split folder -> sequence -> frame names; seq_10 and frame10 test the numeric sort.
SPLIT_TREE = {
    "train": {1: ["frame000", "frame001"], 10: ["frame000"], 2: ["frame10", "frame9", "frame000"]},
    "val": {3: ["frame000", "frame001"], 1: ["frame005"]},
}
TRAIN_IDS = ["seq_1/frame000", "seq_1/frame001", "seq_2/frame000", "seq_2/frame9", "seq_2/frame10",
             "seq_10/frame000"]
VAL_IDS = ["seq_1/frame005", "seq_3/frame000", "seq_3/frame001"]
# sequences directly under root (the sequence split): val = 2, 5, 9, 15
SEQ_TREE = {n: ["frame000"] for n in (1, 2, 3, 5, 9, 10, 15, 16)}


def _ids_grid(seed: int, h: int, w: int) -> np.ndarray:
    """Random class ids 0..11 with some unknown-colour (255) cells."""
    rng = np.random.default_rng(seed)
    grid = rng.integers(0, len(CLASSES), size=(h, w)).astype(np.uint8)
    grid[rng.random((h, w)) < 0.1] = IGNORE_INDEX
    return grid


def _colour(ids: np.ndarray) -> np.ndarray:
    """Class ids -> the colour label image (255 -> UNKNOWN)."""
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(PALETTE)] = PALETTE
    lut[IGNORE_INDEX] = UNKNOWN
    return lut[ids]


def _image(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(1000 + seed)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _labels_json(entries=None) -> str:
    if entries is None:
        entries = [{"name": n, "color": list(c), "classid": i} for i, (n, c) in enumerate(zip(CLASSES, PALETTE))]
    return json.dumps(entries)


def write_seq(seq_dir: Path, frames: list[str], seed: int, size=(16, 16), block=(2, 2), with_json=True) -> dict:
    """Write frames (w, h = size) whose labels are random `block`-sized (w, h) cells of class ids;
    return {frame name: (image uint8 (h, w, 3), ids uint8 (h, w))}."""
    (seq_dir / "left_frames").mkdir(parents=True)
    (seq_dir / "labels").mkdir()
    if with_json:
        (seq_dir / "labels.json").write_text(_labels_json())
    w, h = size
    bw, bh = block
    out = {}
    for k, name in enumerate(frames):
        ids = np.kron(_ids_grid(seed * 100 + k, h // bh, w // bw), np.ones((bh, bw), np.uint8))
        img = _image(h, w, seed * 100 + k)
        Image.fromarray(img).save(seq_dir / "left_frames" / f"{name}.png")
        Image.fromarray(_colour(ids)).save(seq_dir / "labels" / f"{name}.png")
        out[name] = (img, ids)
    return out


def make_split_tree(base: Path, **kw) -> tuple[Path, dict]:
    """base/{train,val}/seq_<n>/...; returns (base, {(split, "seq_<n>/<frame>"): (image, ids)})."""
    written = {}
    for split, seqs in SPLIT_TREE.items():
        for n, frames in seqs.items():
            got = write_seq(base / split / f"seq_{n}", frames, seed=n + (50 if split == "val" else 0), **kw)
            written.update({(split, f"seq_{n}/{f}"): v for f, v in got.items()})
    return base, written


def make_seq_tree(base: Path) -> Path:
    for n, frames in SEQ_TREE.items():
        write_seq(base / f"seq_{n}", frames, seed=n, with_json=(n % 2 == 0))
    return base


@pytest.fixture
def tree(tmp_path):
    return make_split_tree(tmp_path / "endovis2018")


def _normalised(rgb: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(rgb.astype(np.float32)).permute(2, 0, 1) / 255.0
    return (t - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


# ------------------------------------------------------------------ constants / colours


def test_constants():
    assert len(CLASSES) == 12 and CLASSES[0] == "background-tissue" and CLASSES[11] == "ultrasound-probe"
    assert CLASSES[3] == "instrument-wrist" and CLASSES[8] == "suturing-needle"
    assert EndoVis2018.num_classes == 12 and EndoVis2018.classes == CLASSES
    assert EndoVis2018.ignore_index == IGNORE_INDEX == 255 and EndoVis2018.splits == ("train", "val")
    assert EndoVis2018.palette == PALETTE and len(set(PALETTE)) == 12
    assert PALETTE[1] == (0, 255, 0) and PALETTE[5] == (24, 55, 125) and PALETTE[9] == (123, 15, 175)
    assert PALETTE[11] == (12, 255, 141) and VAL_SEQUENCES == (2, 5, 9, 15)
    assert MEAN == (0.485, 0.456, 0.406) and STD == (0.229, 0.224, 0.225)


def test_colour_to_class_every_colour():
    # each palette colour, the unknown one, and near misses of palette colours (one channel off by one)
    colours = [*PALETTE, UNKNOWN, (0, 255, 1), (255, 255, 124), (255, 255, 255), (12, 255, 142)]
    rgb = np.array([colours, colours[::-1]], dtype=np.uint8)  # (2, 17, 3)
    ids = colour_to_class(rgb)
    assert ids.dtype == np.uint8 and ids.shape == (2, len(colours))
    expected = [*range(12), *[IGNORE_INDEX] * 5]
    assert ids[0].tolist() == expected and ids[1].tolist() == expected[::-1]
    with pytest.raises(ValueError, match="shape"):
        colour_to_class(np.zeros((4, 4), np.uint8))


def test_every_colour_read_from_a_label_file(tmp_path):
    seq = tmp_path / "r" / "val" / "seq_1"
    write_seq(seq, ["frame000"], seed=0)
    row = np.array([[*PALETTE, UNKNOWN, (0, 0, 1), (0, 0, 0), (0, 0, 0)]], dtype=np.uint8)  # 1 x 16
    Image.fromarray(np.repeat(row, 16, axis=0)).save(seq / "labels" / "frame000.png")
    image, mask = EndoVis2018(tmp_path / "r", "val", 16).load(0)
    assert mask.dtype == np.uint8 and mask.shape == (16, 16) and image.size == (16, 16)
    assert (mask == mask[0]).all()
    assert mask[0].tolist() == [*range(12), 255, 255, 0, 0]
    # an RGBA label image (alpha dropped) maps the same
    Image.fromarray(np.dstack([np.repeat(row, 16, axis=0), np.full((16, 16), 255, np.uint8)])).save(
        seq / "labels" / "frame000.png")
    assert EndoVis2018(tmp_path / "r", "val", 16).load(0)[1][0].tolist() == [*range(12), 255, 255, 0, 0]


# ------------------------------------------------------------------ listing / layouts


def test_lengths_sorting_and_truncation(tree):
    root, _ = tree
    train, val = EndoVis2018(root, "train", S), EndoVis2018(root, "val", S)
    assert train.ids == TRAIN_IDS and train.sequences == [1, 2, 10] and len(train) == 6
    assert val.ids == VAL_IDS and val.sequences == [1, 3] and len(val) == 3
    assert train.folder == root / "train" and val.folder == root / "val"
    assert EndoVis2018(root, "train", S, size=4).ids == TRAIN_IDS[:4]
    assert EndoVis2018(root, "val", S, size=1).ids == VAL_IDS[:1]
    assert len(EndoVis2018(root, "train", S, size=100)) == 6
    with pytest.raises(ValueError, match="unknown split 'test'"):
        EndoVis2018(root, "test", S)


def test_frames_without_label_are_not_listed(tree):
    root, _ = tree
    Image.fromarray(_image(16, 16, 0)).save(root / "val" / "seq_3" / "left_frames" / "frame002.png")
    assert EndoVis2018(root, "val", S).ids == VAL_IDS


def test_sequence_split_when_root_holds_seq_folders(tmp_path):
    root = make_seq_tree(tmp_path / "seqs")
    val, train = EndoVis2018(root, "val", S), EndoVis2018(root, "train", S)
    assert val.sequences == [2, 5, 9, 15] and train.sequences == [1, 3, 10, 16]
    assert val.ids == [f"seq_{n}/frame000" for n in (2, 5, 9, 15)]
    assert train.ids == [f"seq_{n}/frame000" for n in (1, 3, 10, 16)]
    assert val.folder == root and len(val[0]) == 2
    # root pointing at a train/ folder: its sequences are split the same way
    split_root, _ = make_split_tree(tmp_path / "split")
    inner = EndoVis2018(split_root / "train", "val", S)
    assert inner.sequences == [2] and inner.ids == ["seq_2/frame000", "seq_2/frame9", "seq_2/frame10"]


def test_sequence_split_without_val_sequences(tmp_path):
    root = tmp_path / "seqs"
    write_seq(root / "seq_1", ["frame000"], seed=1)
    assert len(EndoVis2018(root, "train", S)) == 1
    with pytest.raises(FileNotFoundError) as e:
        EndoVis2018(root, "val", S)
    msg = data_root_error(e)
    assert str(root) in msg and "seq_2, seq_5, seq_9, seq_15" in msg


# ------------------------------------------------------------------ items / transforms


def test_val_items_exact_without_resize(tmp_path):
    root, written = make_split_tree(tmp_path / "r", size=(S, S))
    ds = EndoVis2018(root, "val", S)
    for i, sid in enumerate(VAL_IDS):
        image, mask = ds[i]
        assert image.shape == (3, S, S) and image.dtype == torch.float32
        assert mask.shape == (S, S) and mask.dtype == torch.int64
        img, ids = written[("val", sid)]
        assert torch.equal(mask, torch.from_numpy(ids.astype(np.int64)))
        assert torch.allclose(image, _normalised(img), atol=1e-6)
        assert (mask == 255).any() and (mask != 255).any()


def test_val_upscale_is_nearest_for_the_mask(tree):
    root, written = tree  # 16 x 16 frames, S = 32: each pixel becomes a 2 x 2 block
    ds = EndoVis2018(root, "val", S)
    for i, sid in enumerate(VAL_IDS):
        _, ids = written[("val", sid)]
        expected = np.kron(ids, np.ones((2, 2), np.uint8)).astype(np.int64)
        assert torch.equal(ds[i][1], torch.from_numpy(expected))


def test_whole_5_4_frame_is_resized_to_a_square(tmp_path):
    # a 40 x 32 frame (the 5:4 aspect of 1280 x 1024) of 5 x 4 cells -> S = 8: one pixel per cell
    seq = tmp_path / "r" / "val" / "seq_4"
    written = write_seq(seq, ["frame000"], seed=4, size=(40, 32), block=(5, 4))
    img, ids = written["frame000"]
    image, mask = EndoVis2018(tmp_path / "r", "val", 8)[0]
    assert image.shape == (3, 8, 8) and mask.shape == (8, 8)
    assert torch.equal(mask, torch.from_numpy(ids[::4, ::5].astype(np.int64)))
    ref = _normalised(np.asarray(Image.fromarray(img).resize((8, 8), Image.BILINEAR)))
    assert torch.allclose(image, ref, atol=1e-6)


def test_label_size_mismatch(tree):
    root, _ = tree
    Image.fromarray(_colour(np.zeros((8, 16), np.uint8))).save(root / "val" / "seq_1" / "labels" / "frame005.png")
    with pytest.raises(ValueError, match="frame005.png: label size"):
        EndoVis2018(root, "val", S)[0]


def test_train_is_val_or_its_flip_reproducibly(tree):
    root, _ = tree
    train, val = EndoVis2018(root, "train", S), EndoVis2018(root, "train", S)
    val.split = "val"  # same frames, deterministic transform

    def epoch(seed):
        torch.manual_seed(seed)
        return [train[i] for i in range(len(train))]

    a, b = epoch(0), epoch(0)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
    flips = []
    for seed in range(4):
        for i, (image, mask) in enumerate(epoch(seed)):
            ref_img, ref_mask = val[i]
            flipped = torch.equal(mask, ref_mask.flip(-1)) and torch.equal(image, ref_img.flip(-1))
            assert flipped or (torch.equal(mask, ref_mask) and torch.equal(image, ref_img))
            flips.append(flipped)
    assert 0 < sum(flips) < len(flips)  # both outcomes happen (24 draws at p = 0.5)
    # resuming from a saved torch RNG state replays the same flips
    torch.manual_seed(5)
    train[0]
    state = torch.get_rng_state()
    first = [train[i] for i in range(len(train))]
    torch.set_rng_state(state)
    again = [train[i] for i in range(len(train))]
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(first, again))


def test_val_is_deterministic(tree):
    root, _ = tree
    ds = EndoVis2018(root, "val", S)
    torch.manual_seed(0)
    a = ds[1]
    torch.manual_seed(1)
    b = ds[1]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_apply_train_transform_flip():
    img = np.zeros((16, 20, 3), np.uint8)
    img[:, 10:] = 255
    ids = np.ones((16, 20), np.uint8)
    ids[:, 10:] = 2
    im0, m0 = apply_train_transform(Image.fromarray(img), ids, 8, False)
    im1, m1 = apply_train_transform(Image.fromarray(img), ids, 8, True)
    assert (m0[:, :4] == 1).all() and (m0[:, 4:] == 2).all()
    assert torch.equal(m1, m0.flip(-1)) and torch.equal(im1, im0.flip(-1))
    assert im0[0, 0, 0] < 0 < im0[0, 0, -1]


def test_batches_with_default_collate(tree):
    root, _ = tree
    torch.manual_seed(0)
    for split in ("train", "val"):
        ds = EndoVis2018(root, split, S)
        images, masks = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
        assert images.shape == (3, 3, S, S) and images.dtype == torch.float32
        assert masks.shape == (3, S, S) and masks.dtype == torch.int64
        assert set(masks.unique().tolist()) <= set(range(12)) | {255}


# ------------------------------------------------------------------ labels.json


def test_labels_json_mismatch_names_the_file(tree):
    root, _ = tree
    entries = json.loads(_labels_json())
    entries[5]["color"] = [24, 55, 126]
    bad = root / "train" / "seq_10" / "labels.json"
    bad.write_text(json.dumps(entries))
    EndoVis2018(root, "val", S)  # other splits are unaffected
    with pytest.raises(ValueError) as e:
        EndoVis2018(root, "train", S)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{bad}:") and "covered-kidney" in msg
    # a swapped class id, a missing class, malformed JSON: all name the file
    entries = json.loads(_labels_json())
    entries[1]["classid"], entries[2]["classid"] = 2, 1
    for text in (json.dumps(entries), _labels_json(json.loads(_labels_json())[:-1]), "{not json", "{}"):
        bad.write_text(text)
        with pytest.raises(ValueError, match=f"^{bad}: "):
            EndoVis2018(root, "train", S)
    # key order and extra whitespace do not matter
    entries = json.loads(_labels_json())[::-1]
    bad.write_text(json.dumps(entries, indent=2))
    assert len(EndoVis2018(root, "train", S)) == 6


# ------------------------------------------------------------------ errors


def test_root_not_set():
    with pytest.raises(FileNotFoundError) as e:
        EndoVis2018(None, "train", S)
    msg = data_root_error(e)
    assert "not set" in msg and "seq_<n>/{left_frames,labels}" in msg


def test_root_missing_or_empty(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as e:
        EndoVis2018(missing, "val", S)
    assert str(missing) in data_root_error(e)
    (tmp_path / "other").mkdir()
    with pytest.raises(FileNotFoundError) as e:
        EndoVis2018(tmp_path, "val", S)
    msg = data_root_error(e)
    assert str(tmp_path) in msg and "{train,val}/seq_<n>" in msg


def test_missing_split_labels_and_frames(tree):
    root, _ = tree
    shutil.rmtree(root / "val")
    EndoVis2018(root, "train", S)
    with pytest.raises(FileNotFoundError) as e:
        EndoVis2018(root, "val", S)
    assert "has no val/" in data_root_error(e)
    shutil.rmtree(root / "train" / "seq_2" / "labels")
    with pytest.raises(FileNotFoundError) as e:
        EndoVis2018(root, "train", S)
    assert "train/seq_2/labels/" in data_root_error(e)


def test_missing_frame_is_reported_lazily(tree):
    root, _ = tree
    (root / "val" / "seq_3" / "left_frames" / "frame000.png").unlink()
    ds = EndoVis2018(root, "val", S)  # files are not read eagerly
    ds[0]
    with pytest.raises(FileNotFoundError) as e:
        ds[1]
    assert "val/seq_3/left_frames/frame000.png" in data_root_error(e)


def test_no_labelled_frames(tmp_path):
    (tmp_path / "r" / "train" / "seq_1" / "labels").mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as e:
        EndoVis2018(tmp_path / "r", "train", S)
    assert "no labelled frames" in data_root_error(e)


# ------------------------------------------------------------------ registry / config


def test_registry_config_and_build_dataset(tree):
    from trainers.config import Config
    from trainers.data import build_dataset
    from trainers.registry import DATASETS, load_all

    root, _ = tree
    load_all()
    assert callable(DATASETS.get("endovis2018"))
    cfg = Config(data={"name": "endovis2018", "root": str(root)})
    train = build_dataset(cfg.data, "train")
    assert isinstance(train, EndoVis2018) and train.split == "train" and len(train) == 6
    assert train.num_classes == 12 and train.ignore_index == 255 and train.image_size == cfg.data.image_size
    cfg = Config(data={"name": "endovis2018", "root": str(root), "image_size": S, "train_size": 2, "val_size": None})
    train, val = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "val")
    assert train.ids == TRAIN_IDS[:2] and val.ids == VAL_IDS
    image, mask = val[0]
    assert image.shape == (3, S, S) and mask.shape == (S, S)
    with pytest.raises(FileNotFoundError, match="^data.root: not set"):
        build_dataset(Config(data={"name": "endovis2018"}).data, "train")
    with pytest.raises(FileNotFoundError) as e:
        build_dataset(Config(data={"name": "endovis2018", "root": str(root / "missing")}).data, "val")
    assert str(root / "missing") in data_root_error(e) and endovis.LAYOUT in str(e.value)
