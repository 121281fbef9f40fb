"""The paper profile is SSSegmentation's FCN-R50-D8 VOC recipe (issue 14), switch by switch: each switch is a
config key, the VOC paper preset sets SSSegmentation's value, and each does what SSSegmentation's does."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainers.config import Config, ModelConfig, recipe_line
from trainers.data.voc import IGNORE_INDEX, crop_origin, keep_ratio_size, photometric_distortion
from trainers.methods import build_method
from trainers.registry import ENCODERS


def paper_row(repo, row: int = -1, **over) -> dict:
    from orchestrator.spec import resolve

    plan = resolve(repo / "ablations" / "reward.yaml", profile="paper", overrides=["data.root=/data/VOCdevkit"])
    return plan.rows[row].config


def test_paper_preset_is_sssegmentations_recipe(repo):
    """Values from SSSegmentation configs/fcn/fcn_resnet50os8_voc.py, _base_/segmentors/fcn.py and
    _base_/datasets/vocaug_512x512.py."""
    cfg = Config.model_validate(paper_row(repo))
    d, m, s, e = cfg.data, cfg.model, cfg.schedule, cfg.eval
    assert m.encoder == "resnet50c_d8" and m.pretrained == "gluon_in1k" and m.decoder == "fcn"
    assert m.sync_bn and m.aux_head.enabled and (m.aux_head.weight, m.aux_head.channels) == (0.4, 512)
    assert d.resize == (2048, 512) and d.scale_range == (0.5, 2.0) and d.image_size == 512
    assert d.cat_max_ratio == 0.75 and d.photometric and d.val_resize == (2048, 512)
    assert (e.scales, e.flip, e.mode) == ([1.0], False, "whole")
    assert (s.precision, s.channels_last, s.cudnn_benchmark) == ("bf16", True, True)
    line = recipe_line(paper_row(repo))
    for part in ("resnet50c_d8", "aux head 0.4", "SyncBN", "photometric", "cat_max_ratio 0.75", "(2048, 512)", "bf16"):
        assert part in line


def test_defaults_leave_the_embedded_recipe_alone():
    cfg = Config()
    assert not cfg.model.aux_head.enabled and not cfg.model.sync_bn and not cfg.data.photometric
    assert cfg.data.cat_max_ratio is None and cfg.data.resize is None and cfg.data.val_resize is None
    assert cfg.schedule.precision == "fp32" and not cfg.schedule.channels_last
    from trainers.data import build_dataset
    with pytest.raises(ValueError, match="data.cat_max_ratio: only the VOC loaders"):
        build_dataset(Config.model_validate({"data": {"cat_max_ratio": 0.75}}).data, "train")


# ---------------------------------------------------------------- encoder


def test_resnet50c_d8_is_the_v1c_deep_stem_at_output_stride_8():
    enc = ENCODERS.get("resnet50c_d8")(ModelConfig(encoder="resnet50c_d8"))
    stem = [mod for mod in enc.net.conv1 if isinstance(mod, torch.nn.Conv2d)]
    # SSSegmentation use_conv3x3_stem: 3x3 convs 3 -> 32 (stride 2) -> 32 -> 64
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in stem] == \
        [(3, 32, (3, 3), (2, 2)), (32, 32, (3, 3), (1, 1)), (32, 64, (3, 3), (1, 1))]
    # dilations 2 and 4 in stages 3 and 4, the first block of each at half (contract_dilation=True)
    dil = {n: mod.dilation[0] for n, mod in enc.net.named_modules() if n.endswith(".conv2")}
    assert (dil["layer3.0.conv2"], dil["layer3.1.conv2"], dil["layer4.0.conv2"], dil["layer4.2.conv2"]) == (1, 2, 2, 4)
    enc.eval()
    with torch.no_grad():
        stage3, z = enc.forward_stages(torch.randn(1, 3, 64, 48))
    assert stage3.shape == (1, 1024, 8, 6) and z.shape == (1, 2048, 8, 6)
    assert enc.out_channels == 2048 and enc.aux_channels == 1024
    assert "resnet50_d8" in ENCODERS      # the torchvision 7x7 stem stays an option


def test_resnet50c_pretrained_from_a_local_file_in_timm_or_sssegmentation_layout(tmp_path):
    import timm

    full = timm.create_model("resnet50c", pretrained=False)      # a stand-in for ImageNet weights (with its fc)
    state = full.state_dict()
    timm_file = tmp_path / "resnet50c.pth"
    torch.save(state, timm_file)
    inverse = {"conv1.0.": "stem.0.", "conv1.1.": "stem.1.", "conv1.3.": "stem.3.", "conv1.4.": "stem.4.",
               "conv1.6.": "stem.6.", "bn1.": "stem.7."}
    mmseg = {next((new + k[len(old):] for old, new in inverse.items() if k.startswith(old)), k): v
             for k, v in state.items()}
    mmseg_file = tmp_path / "resnet50_v1c.pth"
    torch.save({"state_dict": mmseg, "meta": {}}, mmseg_file)
    for path in (timm_file, mmseg_file):
        enc = ENCODERS.get("resnet50c_d8")(ModelConfig(encoder="resnet50c_d8", pretrained=str(path)))
        loaded = enc.net.state_dict()
        assert all(torch.equal(loaded[k], state[k]) for k in loaded), path
    torch.save({k: v for k, v in state.items() if not k.startswith("layer4.")}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="missing"):
        ENCODERS.get("resnet50c_d8")(ModelConfig(encoder="resnet50c_d8", pretrained=str(tmp_path / "partial.pth")))
    with pytest.raises(ValueError, match="neither a local checkpoint file nor a timm tag"):
        ENCODERS.get("resnet50c_d8")(ModelConfig(encoder="resnet50c_d8", pretrained="no_such_tag"))


# ---------------------------------------------------------------- auxiliary head


def _aux_method(weight: float, method: str = "supervised", **method_keys):
    cfg = Config.model_validate({"model": {"encoder": "resnet18_d8", "aux_head": {"enabled": True, "weight": weight,
                                                                                  "channels": 16}},
                                 "method": {"name": method, **method_keys}})
    torch.manual_seed(0)
    model = build_method(cfg, 5, IGNORE_INDEX)
    model.segmentor.aux_head.dropout.p = 0.0      # so the test can recompute the aux logits
    return model


def test_aux_head_loss_enters_the_total_with_its_weight_and_is_absent_at_eval():
    images = torch.randn(2, 3, 32, 32)
    masks = torch.randint(0, 5, (2, 32, 32))
    masks[:, :4] = IGNORE_INDEX
    model = _aux_method(0.4)
    out = model(images, masks)
    # independently: SSSegmentation's aux CE = CE(upsample(aux_head(stage 3)), mask), ignore pixels excluded
    with torch.no_grad():
        stage3 = model.segmentor.encoder.forward_stages(images)[0]
        aux = F.interpolate(model.segmentor.aux_head(stage3), size=(32, 32), mode="bilinear", align_corners=False)
        expected = F.cross_entropy(aux, masks, ignore_index=IGNORE_INDEX)
    assert torch.allclose(out["loss_aux"], expected, atol=1e-5)
    assert torch.allclose(out["loss"], out["loss_seg"] + 0.4 * expected, atol=1e-5)
    out["loss"].backward()
    assert model.segmentor.aux_head.classifier.weight.grad.abs().sum() > 0

    calls = []
    model.segmentor.aux_head.register_forward_hook(lambda *a: calls.append(1))
    model.eval()
    with torch.no_grad():
        logits = model.predict(images)
        eval_out = model(images, masks)
    assert logits.shape == (2, 5, 32, 32) and not calls and "loss_aux" not in eval_out
    assert torch.allclose(eval_out["loss"], eval_out["loss_seg"])


def test_aux_head_in_latent_rl_and_only_for_encoders_with_stages():
    model = _aux_method(0.4, "latent_rl", policy={"pool": [2, 2], "blocks": 1}, attention_heads=4)
    out = model(torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2, 32, 32)))
    assert torch.isfinite(out["loss_aux"]) and out["loss_aux"] > 0
    with pytest.raises(ValueError, match="model.aux_head: encoder 'tiny_cnn' has no stage-3"):
        build_method(Config.model_validate({"model": {"aux_head": {"enabled": True}}}), 5, IGNORE_INDEX)


# ---------------------------------------------------------------- data pipeline


def test_keep_ratio_resize_is_sssegmentations():
    # VOC's 500 x 375: the short side reaches 512 first; an elongated image is bounded by the long side 2048
    assert keep_ratio_size(500, 375, (2048, 512)) == (683, 512)
    assert keep_ratio_size(375, 500, (2048, 512)) == (512, 683)
    assert keep_ratio_size(2000, 100, (2048, 512)) == (2048, 102)
    # train: int(2048 * 0.5), int(512 * 0.5) = (1024, 256), then the ratio-kept scale
    assert keep_ratio_size(500, 375, (2048, 512), 0.5) == (341, 256)
    assert keep_ratio_size(500, 375, (2048, 512), 0.75) == (512, 384)


def _dominated_mask() -> np.ndarray:
    """64 x 64: class 1 everywhere, a 28 x 28 class-2 block top-left, an ignore band on the right."""
    m = np.ones((64, 64), np.uint8)
    m[:28, :28] = 2
    m[:, 56:] = IGNORE_INDEX
    return m


def _ok(mask: np.ndarray, top: int, left: int, size: int, ratio: float) -> bool:
    crop = mask[top:top + size, left:left + size]
    labels = crop[crop != IGNORE_INDEX]
    counts = np.bincount(labels)[np.unique(labels)]
    return len(counts) > 1 and counts.max() / counts.sum() < ratio


def test_random_crop_respects_cat_max_ratio():
    mask = _dominated_mask()
    torch.manual_seed(0)
    plain = [crop_origin(mask, 32) for _ in range(300)]
    torch.manual_seed(0)
    capped = [crop_origin(mask, 32, 0.75) for _ in range(300)]
    plain_ok = np.mean([_ok(mask, t, l, 32, 0.75) for t, l in plain])
    capped_ok = np.mean([_ok(mask, t, l, 32, 0.75) for t, l in capped])
    # 24 % of all 33 x 33 crop origins hold < 75 % of one class; with 10 retries 1 - 0.76^10 = 93 % do
    assert 0.15 < plain_ok < 0.35 and capped_ok > 0.85
    # the first acceptable of up to 10 draws, replayed from the same RNG state by hand
    for seed in range(20):
        torch.manual_seed(seed)
        draws = [(int(torch.randint(0, 33, ()).item()), int(torch.randint(0, 33, ()).item())) for _ in range(10)]
        expected = next((d for d in draws if _ok(mask, *d, 32, 0.75)), draws[-1])
        torch.manual_seed(seed)
        assert crop_origin(mask, 32, 0.75) == expected


def test_photometric_distortion_is_sssegmentations_ranges_and_reproducible():
    rng = np.random.default_rng(0)
    img = rng.integers(60, 200, size=(16, 16, 3)).astype(np.uint8)
    torch.manual_seed(3)
    a = photometric_distortion(img)
    torch.manual_seed(3)
    b = photometric_distortion(img)
    assert a.dtype == np.uint8 and a.shape == img.shape and np.array_equal(a, b)
    changed, shifts = 0, []
    for seed in range(40):
        torch.manual_seed(seed)
        out = photometric_distortion(img)
        changed += not np.array_equal(out, img)
        shifts.append(float(out.astype(np.float32).mean() - img.mean()))
    # every step fires with probability 1/2: 1/16 of the draws leave the image alone
    assert 25 <= changed <= 40
    # brightness +-32 and contrast x[0.5, 1.5] around mean ~130 bound the mean shift
    assert max(abs(s) for s in shifts) < 32 + 0.5 * 200


def test_voc_train_items_under_the_recipe(tmp_path):
    from test_voc import make_voc

    from trainers.data.voc import VOCSegmentation

    root = make_voc(tmp_path / "data")
    ds = VOCSegmentation(root, "train", image_size=32, aug=True, resize=(128, 32), cat_max_ratio=0.75,
                         photometric=True)
    torch.manual_seed(0)
    image, mask = ds[0]
    torch.manual_seed(0)
    image2, mask2 = ds[0]
    assert image.shape == (3, 32, 32) and mask.shape == (32, 32)
    assert torch.equal(image, image2) and torch.equal(mask, mask2)
    val = VOCSegmentation(root, "val", image_size=32, val_resize=(128, 32))
    image, mask = val[2]                         # stored 64 x 32: resized to (64, 32) keep ratio, mask as stored
    assert image.shape == (3, 32, 64) and mask.shape == (32, 64)
