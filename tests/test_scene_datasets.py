"""ADE20K, Cityscapes, Dark Zurich, Nighttime Driving, LIP and CIHP loaders (trainers/data/scenes.py, humans.py) on
tiny fixture folders written in each release's own layout; the shared pipeline's non-square crop, flip pairs and
rotation (trainers/data/transforms.py); the paper presets of Tables 2 and 4 resolved as a spec profile."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import data_root_error
from trainers.config import Config
from trainers.data import build_dataset
from trainers.data.humans import CIHP_CLASSES, FLIP_PAIRS, LIP_CLASSES
from trainers.data.scenes import ADE20K_CLASSES, CITYSCAPES_CLASSES
from trainers.data.transforms import IGNORE_INDEX, rotate_pair, train_transform

H, W = 32, 64            # every fixture image is 64 wide, 32 high


def _image(path: Path, seed: int) -> None:
    """A random H x W RGB image (.jpg or .png by the path's suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)


def _mask(path: Path, values) -> np.ndarray:
    """A mask of vertical stripes cycling through `values`, saved as a single-channel PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stripes = np.resize(np.asarray(values, dtype=np.uint8), W)
    mask = np.broadcast_to(stripes, (H, W)).copy()
    Image.fromarray(mask, "L").save(path)
    return mask


def _stored(values) -> np.ndarray:
    return np.broadcast_to(np.resize(np.asarray(values, dtype=np.uint8), W), (H, W))


ADE_VALUES = [0, 1, 2, 150]                      # 0 = other -> ignored; k -> k - 1
CITY_LABEL_IDS = [0, 7, 8, 9, 26, 33]            # unlabeled, road, sidewalk, parking (ignored), car, bicycle
NIGHT_TRAIN_IDS = [0, 10, 18, 255]
PARSING_VALUES = [0, 5, 14, 15, 19]


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """One folder per dataset in its release layout: 2 train images and 1 val image (night sets: 2 val)."""
    base = tmp_path_factory.mktemp("scenes")
    ade = base / "ade" / "ADEChallengeData2016"
    for sub, names in (("training", ["ADE_train_00000002", "ADE_train_00000001"]),
                       ("validation", ["ADE_val_00000001"])):
        for k, name in enumerate(names):
            _image(ade / "images" / sub / f"{name}.jpg", k)
            _mask(ade / "annotations" / sub / f"{name}.png", ADE_VALUES)
    city = base / "city"
    for split, city_name, frame in (("train", "aachen", "000000_000019"), ("train", "bochum", "000001_000019"),
                                    ("val", "frankfurt", "000000_000294")):
        stem = f"{city_name}_{frame}"
        _image(city / "leftImg8bit" / split / city_name / f"{stem}_leftImg8bit.png", 1)
        _mask(city / "gtFine" / split / city_name / f"{stem}_gtFine_labelIds.png", CITY_LABEL_IDS)
    # bochum also has cityscapesscripts' train-id file: it wins over the label ids (values deliberately distinct)
    _mask(city / "gtFine" / "train" / "bochum" / "bochum_000001_000019_gtFine_labelTrainIds.png", [3, 4, 255])
    dz = base / "dz"
    for frame in ("GOPR0356_frame_000321", "GOPR0356_frame_000454"):
        _image(dz / "rgb_anon" / "val" / "night" / "GOPR0356" / f"{frame}_rgb_anon.png", 2)
        _mask(dz / "gt" / "val" / "night" / "GOPR0356" / f"{frame}_gt_labelTrainIds.png", NIGHT_TRAIN_IDS)
    nd = base / "nd" / "NighttimeDrivingTest"
    for frame in ("0_frame_0030", "0_frame_0101"):
        _image(nd / "leftImg8bit" / "test" / "night" / f"{frame}_leftImg8bit.png", 3)
        _mask(nd / "gtCoarse_daytime_trainvaltest" / "test" / "night" / f"{frame}_gtCoarse_labelTrainIds.png",
              NIGHT_TRAIN_IDS)
    lip = base / "lip"
    for split, ids in (("train", ["77_471474", "100034_483681"]), ("val", ["100034_483681"])):
        (lip / "TrainVal_images").mkdir(parents=True, exist_ok=True)
        (lip / "TrainVal_images" / f"{split}_id.txt").write_text("\n".join(ids) + "\n")
        for i in ids:
            _image(lip / "TrainVal_images" / f"{split}_images" / f"{i}.jpg", 4)
            _mask(lip / "TrainVal_parsing_annotations" / f"{split}_segmentations" / f"{i}.png", PARSING_VALUES)
    cihp = base / "cihp" / "instance-level_human_parsing"
    for part, split, ids in (("Training", "train", ["0000006", "0000009"]), ("Validation", "val", ["0000001"])):
        (cihp / part).mkdir(parents=True, exist_ok=True)
        (cihp / part / f"{split}_id.txt").write_text("\n".join(ids) + "\n")
        for i in ids:
            _image(cihp / part / "Images" / f"{i}.jpg", 5)
            _mask(cihp / part / "Category_ids" / f"{i}.png", PARSING_VALUES)
    return {"ade20k": base / "ade", "cityscapes": city, "dark_zurich": dz, "nighttime_driving": base / "nd",
            "lip": lip, "cihp": base / "cihp"}


def _build(roots, name, split, **data):
    cfg = Config.model_validate({"data": {"name": name, "root": str(roots[name]), "image_size": 16,
                                          "train_size": None, "val_size": None, **data}})
    return build_dataset(cfg.data, split)


# (name, classes, number of train / val samples, stored values -> the train ids load() must give)
CASES = [
    ("ade20k", ADE20K_CLASSES, (2, 1), {0: 255, 1: 0, 2: 1, 150: 149}),
    ("cityscapes", CITYSCAPES_CLASSES, (2, 1), {0: 255, 7: 0, 8: 1, 9: 255, 26: 13, 33: 18}),
    ("dark_zurich", CITYSCAPES_CLASSES, (None, 2), {0: 0, 10: 10, 18: 18, 255: 255}),
    ("nighttime_driving", CITYSCAPES_CLASSES, (None, 2), {0: 0, 10: 10, 18: 18, 255: 255}),
    ("lip", LIP_CLASSES, (2, 1), {v: v for v in PARSING_VALUES}),
    ("cihp", CIHP_CLASSES, (2, 1), {v: v for v in PARSING_VALUES}),
]


@pytest.mark.parametrize("name,classes,lengths,mapping", CASES, ids=[c[0] for c in CASES])
def test_loader_reads_its_release_layout_and_maps_labels(roots, name, classes, lengths, mapping):
    n_train, n_val = lengths
    val = _build(roots, name, "val")
    assert val.classes == classes and val.num_classes == len(classes) and val.ignore_index == IGNORE_INDEX
    assert len(val) == n_val
    image, mask = val.load(0)
    assert image.size == (W, H) and mask.dtype == np.uint8
    stored = np.resize(np.asarray(list(mapping), dtype=np.uint8), W)
    expected = np.array([mapping[v] for v in stored], dtype=np.uint8)
    assert np.array_equal(mask, np.broadcast_to(expected, (H, W)))
    x, y = val[0]                                  # val without val_resize: fitted into 16 x 16, padded
    assert x.shape == (3, 16, 16) and y.shape == (16, 16) and (y[8:] == IGNORE_INDEX).all()
    if n_train is None:
        with pytest.raises(ValueError, match=f"^data.name: {name} is an evaluation set"):
            _build(roots, name, "train")
        return
    train = _build(roots, name, "train")
    assert len(train) == n_train
    train_files = {p for pair in train.samples for p in pair}
    assert not train_files & {p for pair in val.samples for p in pair}   # the splits read different files
    assert len(_build(roots, name, "train", train_size=1)) == 1


def test_split_files_and_cityscapes_train_ids_file(roots):
    ade = _build(roots, "ade20k", "train")
    assert [p.name for p, _ in ade.samples] == ["ADE_train_00000001.jpg", "ADE_train_00000002.jpg"]   # sorted
    assert [p.name for p, _ in _build(roots, "ade20k", "val").samples] == ["ADE_val_00000001.jpg"]
    city = _build(roots, "cityscapes", "train")
    assert [p.parent.name for p, _ in city.samples] == ["aachen", "bochum"]
    assert city.paths(0)[1].name == "aachen_000000_000019_gtFine_labelIds.png"
    assert city.paths(1)[1].name == "bochum_000001_000019_gtFine_labelTrainIds.png"
    assert np.array_equal(city.load(1)[1], _stored([3, 4, 255]))           # train ids as stored, not remapped
    assert _build(roots, "lip", "train").ids == ["77_471474", "100034_483681"]   # the list's order
    assert _build(roots, "cihp", "val").ids == ["0000001"]


def test_lip_accepts_the_nested_zip_and_sssegmentation_flat_layouts(roots, tmp_path):
    nested = tmp_path / "nested" / "LIP"
    (nested / "TrainVal_images" / "TrainVal_images").mkdir(parents=True)
    (nested / "TrainVal_images" / "val_id.txt").write_text("a\n")
    _image(nested / "TrainVal_images" / "TrainVal_images" / "val_images" / "a.jpg", 0)
    _mask(nested / "TrainVal_parsing_annotations" / "TrainVal_parsing_annotations" / "val_segmentations" / "a.png",
          [1, 2])
    ds = _build({"lip": tmp_path / "nested"}, "lip", "val")
    assert np.array_equal(ds.load(0)[1], _stored([1, 2]))
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "val_id.txt").write_text("b\n")
    _image(flat / "val_images" / "b.jpg", 0)
    _mask(flat / "val_segmentations" / "b.png", [3])
    assert np.array_equal(_build({"lip": flat}, "lip", "val").load(0)[1], _stored([3]))


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_bad_root_is_one_line_naming_data_root_and_the_layout(roots, tmp_path, name):
    split = "val"
    layout_word = {"ade20k": "ADEChallengeData2016", "cityscapes": "leftImg8bit", "dark_zurich": "rgb_anon",
                   "nighttime_driving": "NighttimeDrivingTest", "lip": "TrainVal_images",
                   "cihp": "instance-level_human_parsing"}[name]
    with pytest.raises(FileNotFoundError) as e:
        build_dataset(Config.model_validate({"data": {"name": name}}).data, split)
    assert data_root_error(e).startswith("data.root: not set") and layout_word in str(e.value)
    with pytest.raises(FileNotFoundError) as e:
        _build({name: tmp_path / "missing"}, name, split)
    assert "does not exist" in data_root_error(e) and layout_word in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError) as e:
        _build({name: tmp_path / "empty"}, name, split)     # a folder, but not the dataset's
    assert str(tmp_path / "empty") in data_root_error(e) and layout_word in str(e.value)


def test_missing_mask_of_a_listed_image_names_the_file(roots, tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    _image(root / "images" / "validation" / "ADE_val_00000009.jpg", 0)
    (root / "annotations" / "validation").mkdir(parents=True)
    ds = _build({"ade20k": tmp_path}, "ade20k", "val")
    with pytest.raises(FileNotFoundError) as e:
        ds.load(0)
    assert "annotations/validation/ADE_val_00000009.png" in data_root_error(e)


# ------------------------------------------------------------------ the shared pipeline


def test_cityscapes_non_square_crop_and_original_size_val(roots):
    torch.manual_seed(0)
    train = _build(roots, "cityscapes", "train", crop_size=[16, 32], resize=[64, 32], cat_max_ratio=0.75,
                   photometric=True)
    x, y = train[0]
    assert x.shape == (3, 16, 32) and y.shape == (16, 32)
    assert set(y.unique().tolist()) <= {0, 1, 13, 18, IGNORE_INDEX}
    val = _build(roots, "cityscapes", "val", crop_size=[16, 32], val_resize=[32, 16])
    x, y = val[0]
    assert x.shape == (3, 16, 32) and y.shape == (H, W)             # scored at the stored size
    padded = _build(roots, "cityscapes", "val", crop_size=[8, 32])[0]     # fitted into 8 x 32: 8 x 16, padded right
    assert padded[0].shape == (3, 8, 32) and (padded[1][:, 16:] == IGNORE_INDEX).all()
    assert (padded[1][:, :16] != IGNORE_INDEX).any()


def test_lip_fixed_size_resize_rotation_and_flip_pairs(roots):
    torch.manual_seed(0)
    lip = _build(roots, "lip", "train", image_size=24, resize=[26, 26], keep_ratio=False, scale_range=[0.75, 1.25],
                 rotate=[0.6, 30], photometric=True)
    x, y = lip[0]
    assert x.shape == (3, 24, 24) and y.shape == (24, 24)
    val = _build(roots, "lip", "val", resize=[26, 26], keep_ratio=False, val_resize=[24, 24])
    x, y = val[0]
    assert x.shape == (3, 24, 24) and y.shape == (H, W)             # keep_ratio false: the target itself
    # a flip swaps left / right parts (14 <-> 15, 16 <-> 17, 18 <-> 19); a crop of the whole image, no rescale
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    mask = np.zeros((8, 8), np.uint8)
    mask[:, :2], mask[:, 2:4], mask[:, 4:6] = 14, 17, 19
    swapped = {0: 0, 14: 15, 17: 16, 19: 18}
    flipped = torch.from_numpy(np.vectorize(swapped.get)(mask[:, ::-1]).astype(np.int64))
    seen = set()
    for seed in range(8):
        torch.manual_seed(seed)
        _, m = train_transform(image, mask, 8, ratio_range=(1.0, 1.0), resize=(8, 8), flip_pairs=FLIP_PAIRS)
        if torch.equal(m, torch.from_numpy(mask.astype(np.int64))):
            seen.add("kept")
        else:
            assert torch.equal(m, flipped)
            seen.add("flipped")
    assert seen == {"kept", "flipped"}


def test_rotation_is_counter_clockwise_and_fills_ignore():
    img = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    mask = np.arange(64, dtype=np.uint8).reshape(8, 8)
    r_img, r_mask = rotate_pair(img, mask, 90)
    assert np.array_equal(r_mask, np.rot90(mask)) and np.array_equal(r_img, np.rot90(img))
    _, m45 = rotate_pair(img, mask, 45)
    assert m45[0, 0] == m45[0, -1] == m45[-1, 0] == m45[-1, -1] == IGNORE_INDEX


# ------------------------------------------------------------------ presets and the registry


PRESETS = {"paper_ade20k_fcn_r50": ("ade20k", 512, None, 130, 8),
           "paper_cityscapes_fcn_r50": ("cityscapes", 512, (512, 1024), 220, 4),
           "paper_lip_fcn_r50": ("lip", 473, None, 150, 16)}


def test_presets_resolve_as_paper_profiles_and_build_through_the_registry(roots, tmp_path):
    """Each preset as the paper profile of a latent_rl spec (as the ablation specs use them): a valid Config with
    SSSegmentation's values; its data config builds the fixture through the registry, and one epoch of latent RL
    trains and evaluates on the Cityscapes fixture at a non-square crop."""
    from orchestrator.spec import resolve
    from trainers.loop import fit

    for preset, (name, size, crop, epochs, batch) in PRESETS.items():
        spec = tmp_path / f"{preset}.yaml"
        spec.write_text(f"name: t\nmetric: {{name: val/mIoU, mode: max}}\nseeds: [0]\nbase: latent_rl\n"
                        f"profiles: {{paper: {preset}}}\nrows:\n  - name: r\n    set: {{}}\n")
        cfg = Config.model_validate(resolve(spec, profile="paper").rows[0].config)
        d, s = cfg.data, cfg.schedule
        assert (d.name, d.image_size, d.crop_size, s.epochs, s.batch_size) == (name, size, crop, epochs, batch)
        assert cfg.method.name == "latent_rl" and cfg.model.encoder == "resnet50c_d8" and cfg.model.aux_head.enabled
        assert (s.optimizer, s.lr, s.weight_decay, cfg.resources.workers) == ("sgd", 0.01, 0.0005, 2)
        small = d.model_copy(update={"root": str(roots[name]), "crop_size": None, "image_size": 16,
                                     "resize": (64, 16) if d.keep_ratio else (20, 20)})
        x, y = build_dataset(small, "train")[0]
        assert x.shape == (3, 16, 16) and y.shape == (16, 16)
        x, y = build_dataset(small, "val")[0]
        assert y.shape == (H, W)                                   # val_resize: the stored mask
    lip = Config.model_validate(resolve(tmp_path / "paper_lip_fcn_r50.yaml", profile="paper").rows[0].config).data
    assert (lip.keep_ratio, lip.rotate, lip.resize, lip.val_resize) == (False, (0.6, 30), (520, 520), (473, 473))

    tree = {"method": {"name": "latent_rl"}, "model": {"encoder": "tiny_cnn", "decoder": "fcn"},
            "data": {"name": "cityscapes", "root": str(roots["cityscapes"]), "image_size": 16, "crop_size": [16, 32],
                     "resize": [64, 32], "cat_max_ratio": 0.75, "photometric": True, "val_resize": [64, 32],
                     "train_size": None, "val_size": None},
            "schedule": {"epochs": 1, "batch_size": 2}}
    metrics = fit(tree)
    assert 0 <= metrics["val/mIoU"] <= 100 and "val/IoU/traffic light" in metrics


def test_pipeline_keys_are_checked_and_rejected_where_no_loader_applies_them():
    for key, value in (("crop_size", [16, 32]), ("keep_ratio", False), ("rotate", [0.6, 30])):
        cfg = Config.model_validate({"data": {key: value, "val_size": 1, "image_size": 16}})
        with pytest.raises(ValueError, match=f"^data.{key}: only the VOC loaders and the other SSSegmentation"):
            build_dataset(cfg.data, "val")                   # synthetic_surgical would silently ignore it
    for key, value in (("crop_size", [0, 32]), ("rotate", [1.5, 30]), ("rotate", [0.5, 0])):
        with pytest.raises(ValueError, match=f"data.{key}"):
            Config.model_validate({"data": {key: value}})
