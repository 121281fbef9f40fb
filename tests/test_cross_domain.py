"""Cross-domain evaluation (paper 002 Table 4): eval.datasets mapped into the trial's classes by name and scored at
every evaluation (trainers/evaluation.py), the shifted synthetic domain of data.shift (trainers/data/synthetic/
shift.py), and the synthetic package split that must render the same bytes as the single module it replaced."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from orchestrator.preflight import check_metric
from orchestrator.spec import SpecError, _apply_and_validate, load_preset, resolve
from trainers.config import Config, ShiftConfig
from trainers.data import build_dataset
from trainers.data.foreground import SyntheticForeground
from trainers.data.humans import CIHP_CLASSES, LIP_CLASSES
from trainers.data.scenes import CITYSCAPES_CLASSES
from trainers.data.synthetic import MEAN, VAL_INDEX_OFFSET, SyntheticSurgical, render_scene
from trainers.data.synthetic.shift import apply_shift
from trainers.evaluation import class_mapping
from trainers.loop import fit
from trainers.methods import build_method

from test_scene_datasets import roots  # noqa: F401  (the release-layout fixture folders)

NIGHT = {"low_light": 0.8, "noise": 0.8}
TRIAL = ["background-tissue", "kidney-parenchyma", "instrument-shaft"]


def _sha(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def test_synthetic_package_renders_the_bytes_of_the_single_module():
    """Hashes of the generator as it stands since the embedded benchmark was made learnable (thicker thread and
    needle, larger clamps; first taken from trainers/data/synthetic.py at commit 9af07fd before the split into scene /
    draw / render): a refactor that changes one pixel or one label fails here."""
    assert _sha(*render_scene(0, 0, 64)) == "f37103f28fcc895ab5b62090745020ebfed3aa0ff996b7c6bedcf2730a0ea559"
    assert _sha(*render_scene(3, VAL_INDEX_OFFSET + 5, 64)) == \
        "9bacc843475e9f386bdb661135f966538326f24d6c91a928fc9be6ba5793f959"
    assert _sha(*render_scene(-2, 11, 96)) == "b5072af8521be4f5df0406960ee12c2cefbd1923da7c45fad125279ee950bc95"
    ds = SyntheticSurgical("val", 16, 48, seed=1)            # shift None: the dataset as before
    assert _sha(ds.images.numpy(), ds.masks.numpy()) == "734b073aa1070f74bec78ceb7fcde50b4ed9ced8558ce638e6a5d370bde1b858"


def test_class_mapping_by_name_class_map_and_no_overlap():
    # a set with classes in another order, one the trial lacks, one renamed, and its own ignore label 200
    lut, shared = class_mapping(["instrument-shaft", "sky", "background-tissue", "kidney"], TRIAL,
                                {"kidney": "kidney-parenchyma"}, 255, 200, "eval.datasets.x")
    masks = torch.tensor([[0, 1, 2, 3, 200]])
    assert lut[masks].tolist() == [[2, 255, 0, 1, 255]]
    assert shared == [0, 1, 2]
    lut, shared = class_mapping(["road", "background-tissue"], TRIAL, {}, 255, 255, "eval.datasets.x")
    assert lut[torch.tensor([0, 1, 255])].tolist() == [255, 0, 255] and shared == [0]
    with pytest.raises(ValueError, match=r"eval.datasets.dz: no class in common with the trial's .*class_map"):
        class_mapping(["road", "sky"], TRIAL, {}, 255, 255, "eval.datasets.dz")
    with pytest.raises(ValueError, match=r"class_map: 'car' is not a class of this set"):
        class_mapping(["road"], TRIAL, {"car": "kidney-parenchyma"}, 255, 255, "eval.datasets.dz")
    with pytest.raises(ValueError, match=r"class_map: 'liver' is not a class of the trial"):
        class_mapping(["road"], TRIAL, {"road": "liver"}, 255, 255, "eval.datasets.dz")


def test_eval_set_config_errors_name_the_key():
    def error(datasets, **extra) -> str:
        with pytest.raises(ValidationError) as e:
            Config.model_validate({"eval": {"datasets": datasets}, **extra})
        return str(e.value)

    assert "label 'mIoU' is a word of the val/ metric names" in error({"mIoU": {}})
    assert "label 'dark-zurich'" in error({"dark-zurich": {}})
    assert "eval.datasets.night.shifts: not a data key" in error({"night": {"shifts": {}}})
    assert "eval.datasets.night.shift.noise: Input should be less than or equal to 1" in error(
        {"night": {"shift": {"noise": 2}}})
    assert "eval.datasets: method seg_r1 reports its own validation metrics" in error(
        {"night": {}}, method="seg_r1", data={"name": "synthetic_cod"})
    assert "eval.datasets: a continual task sequence" in error({"night": {}}, continual={"task": "5-3"})
    # keys left out are the trial's, resolved late: a data.* override after the set was written still reaches it
    cfg = Config.model_validate({"eval": {"datasets": {"night": {"shift": NIGHT}}}, "data": {"val_size": 7}})
    again = Config.model_validate({**cfg.model_dump(mode="json"), "data": {"val_size": 5, "image_size": 32}})
    assert (again.eval_set_data("night").val_size, again.eval_set_data("night").image_size) == (5, 32)
    with pytest.raises(ValueError, match="data.shift: only the generated synthetic_surgical scenes"):
        build_dataset(Config.model_validate({"data": {"name": "synthetic_sod", "shift": NIGHT}}).data, "val")


def test_shift_is_deterministic_and_shifts_the_statistics():
    plain = SyntheticSurgical("val", 12, 32, seed=0).images.numpy().astype(np.float64) / 255
    night = SyntheticSurgical("val", 12, 32, seed=0, shift=ShiftConfig(**NIGHT)).images.numpy()
    assert np.array_equal(night, SyntheticSurgical("val", 12, 32, seed=0, shift=ShiftConfig(**NIGHT)).images.numpy())
    assert night.astype(np.float64).mean() / 255 < 0.5 * plain.mean()      # low light: well under half the light
    # the noise term alone: residual std as the Poissonian-Gaussian model sqrt(a x + b^2) says (a = 0.012, b = 0.03),
    # checked on mid-tone pixels where neither bound of [0, 1] clips it
    img, idx = (plain[3] * 255).astype(np.uint8), VAL_INDEX_OFFSET + 3
    noisy = apply_shift(img, ShiftConfig(noise=1.0), 0, idx).astype(np.float64) / 255
    x = img.astype(np.float64) / 255
    mid = (x > 0.15) & (x < 0.85)
    expected = np.sqrt(np.mean(0.012 * x[mid] + 0.03 ** 2))
    assert abs((noisy - x)[mid].std() / expected - 1) < 0.1
    assert not np.array_equal(noisy, apply_shift(img, ShiftConfig(noise=1.0), 0, idx + 1).astype(np.float64) / 255)
    # the colour cast: red down against blue, luminance about kept (the channel means of the training domain, MEAN)
    cast = SyntheticSurgical("val", 12, 32, seed=0, shift=ShiftConfig(color_cast=1.0)).images.numpy() / 255
    r, b = (cast[:, 0].mean(), cast[:, 2].mean())
    assert r / b < 0.75 * plain[:, 0].mean() / plain[:, 2].mean() and abs(cast.mean() / plain.mean() - 1) < 0.15
    assert abs(plain[:, 0].mean() - MEAN[0]) < 0.05     # (a sanity check that plain is the training domain)


def test_fit_reports_each_eval_set_as_evaluated_by_hand():
    """Two extra sets: the trial's val scenes at night (same classes), and the salient-object scenes whose
    'background' is renamed onto background-tissue (their 'foreground' has no counterpart: ignored). Evaluated with
    the trial's protocol (flip TTA here) at the last epoch; the hand evaluation below recomputes both from the
    checkpointed model in numpy."""
    cfg = Config.model_validate({
        # 24 steps: enough for the BatchNorm running statistics to leave their init (else every pixel is class 0)
        "data": {"image_size": 32, "train_size": 48, "val_size": 8},
        "schedule": {"epochs": 1, "batch_size": 2},
        "eval": {"flip": True, "datasets": {
            "night": {"shift": NIGHT, "val_size": 6},
            "sod": {"name": "synthetic_sod", "class_map": {"background": "background-tissue"}}}},
    })
    states = []
    metrics = fit(cfg, lambda m, s: states.append(s))
    model = build_method(cfg, 8, 255)
    model.load_checkpoint_state(states[-1]["model"])
    model.eval()

    def predict(images: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            logits = model.predict(images) + model.predict(images.flip(-1)).flip(-1)
        return logits.argmax(1).numpy()

    night = SyntheticSurgical("val", 6, 32, seed=0, shift=ShiftConfig(**NIGHT))
    images, masks = zip(*(night[i] for i in range(len(night))))
    pred, gt = predict(torch.stack(images)), torch.stack(masks).numpy()
    assert len(np.unique(pred)) > 1      # a model that predicts one class everywhere would test little
    ious = [((pred == k) & (gt == k)).sum() / ((pred == k) | (gt == k)).sum() for k in range(8)
            if ((pred == k) | (gt == k)).any()]
    assert metrics["val/night/mIoU"] == pytest.approx(100 * np.mean(ious), abs=1e-9)
    assert metrics["val/night/pixel_acc"] == pytest.approx(100 * (pred == gt).mean(), abs=1e-9)
    assert {k for k in metrics if k.startswith("val/night/IoU/")} == {f"val/night/IoU/{c}" for c in
                                                                     SyntheticSurgical.classes}

    sod = SyntheticForeground("val", 8, 32, seed=0, flavour="salient")
    images, masks = zip(*(sod[i] for i in range(len(sod))))
    pred, gt = predict(torch.stack(images)), torch.stack(masks).numpy()
    valid = gt == 0                      # only 'background' maps (onto class 0); 'foreground' is ignored
    iou0 = (valid & (pred == 0)).sum() / valid.sum()   # every scored pixel is class 0: the union is all of them
    assert metrics["val/sod/mIoU"] == pytest.approx(100 * iou0, abs=1e-9)
    assert metrics["val/sod/IoU/background-tissue"] == pytest.approx(100 * iou0, abs=1e-9)
    assert [k for k in metrics if k.startswith("val/sod/IoU/")] == ["val/sod/IoU/background-tissue"]
    assert metrics["val/night/mIoU"] != metrics["val/mIoU"]


def test_preflight_knows_the_metrics_of_the_eval_sets():
    classes = lambda: ["background-tissue", "thread"]    # noqa: E731
    check_metric("s.yaml", "val/night/mIoU", classes, "synthetic_surgical", "latent_rl", ["night", "cast"])
    check_metric("s.yaml", "val/cast/IoU/thread", classes, "synthetic_surgical", "supervised", ["night", "cast"])
    with pytest.raises(SpecError, match=r"no trial reports 'val/dark_zurich/mIoU'.*eval.datasets night"):
        check_metric("s.yaml", "val/dark_zurich/mIoU", classes, "synthetic_surgical", "supervised", ["night"])
    with pytest.raises(SpecError, match=r"no trial reports 'val/night/mIoU'"):
        check_metric("s.yaml", "val/night/mIoU", classes, "synthetic_surgical", "supervised")


def test_cross_domain_spec_profiles_are_the_presets_plus_their_target_sets(repo):
    """ablations/cross_domain.yaml: each profile is its preset (latent_rl for the embedded run) with only its target
    sets added, the embedded sets dropped, and a target set's root reachable from the command line."""
    spec = repo / "ablations" / "cross_domain.yaml"
    latent_rl = _apply_and_validate(load_preset("latent_rl", spec), {}, "latent_rl")

    def without_sets(config: dict) -> dict:
        return {**config, "seed": 0, "eval": {**config["eval"], "datasets": {}}}

    for profile, preset, sets in ((None, None, ["night", "cast"]),
                                  ("paper", "paper_cityscapes_fcn_r50", ["dark_zurich", "nighttime_driving"]),
                                  ("paper_lip", "paper_lip_fcn_r50", ["cihp"])):
        expected = latent_rl if preset is None else _apply_and_validate(latent_rl, load_preset(preset, spec), preset)
        plan = resolve(spec, profile=profile, overrides=[f"eval.datasets.{sets[0]}.root=/data/x"] if preset else [])
        row = next(r for r in plan.rows if r.name == "FCN + Latent-Space RL").config
        assert without_sets(row) == without_sets(expected), profile
        assert list(row["eval"]["datasets"]) == sets
        assert row["eval"]["datasets"][sets[0]].get("root") == ("/data/x" if preset else None)   # the CLI reaches it
    # CIHP by value: its Torso-skin scored as LIP's Jumpsuits, all 20 classes shared
    _, shared = class_mapping(list(CIHP_CLASSES), list(LIP_CLASSES), {"Torso-skin": "Jumpsuits"}, 255, 255, "cihp")
    assert shared == list(range(20))


def test_table4_sets_on_their_release_layouts(roots):
    """The paper profiles' path on fixture folders (tests/test_scene_datasets.py): a Cityscapes model scored on Dark
    Zurich and Nighttime Driving (the 19 classes by name, original-size masks one image per batch), a LIP model on
    CIHP by value (class_map) and by name (Torso-skin has no LIP counterpart: 19 classes)."""
    def run(name, data, sets):
        return fit({"method": "supervised", "schedule": {"epochs": 1, "batch_size": 2}, "eval": {"datasets": sets},
                    "data": {"name": name, "root": str(roots[name]), "image_size": 16, "train_size": None,
                             "val_size": None, **data}})

    def ious(metrics, label):
        return [k.split("/")[-1] for k in metrics if k.startswith(f"val/{label}/IoU/")]

    m = run("cityscapes", {"crop_size": [16, 32], "resize": [64, 32], "val_resize": [64, 32]},
            {s: {"name": s, "root": str(roots[s])} for s in ("dark_zurich", "nighttime_driving")})
    assert ious(m, "dark_zurich") == ious(m, "nighttime_driving") == list(CITYSCAPES_CLASSES)
    assert all(0 <= m[f"val/{s}/mIoU"] <= 100 for s in ("dark_zurich", "nighttime_driving"))
    m = run("lip", {"resize": [20, 20], "keep_ratio": False, "val_resize": [20, 20]},
            {"cihp": {"name": "cihp", "root": str(roots["cihp"]), "class_map": {"Torso-skin": "Jumpsuits"}},
             "cihp_by_name": {"name": "cihp", "root": str(roots["cihp"])}})
    assert ious(m, "cihp") == list(LIP_CLASSES)
    assert ious(m, "cihp_by_name") == [c for c in LIP_CLASSES if c != "Jumpsuits"]
