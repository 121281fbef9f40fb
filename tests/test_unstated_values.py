"""Values the papers leave unstated are config keys that do what their README line says."""
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny
from trainers.config import Config, SegLossConfig
from trainers.losses import segmentation_loss
from trainers.methods import build_method


def test_ce_reduction_image_sum_is_eq2_as_written():
    """image_sum: (1/N) sum_i sum_p CE over valid pixels (Eq. 2); mean: the mean over the batch's valid pixels."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 5, 6, generator=g)
    target = torch.randint(0, 4, (3, 5, 6), generator=g)
    target[0, :2] = 255
    per_pixel = F.cross_entropy(logits, target, ignore_index=255, reduction="none")
    mean = segmentation_loss(logits, target, SegLossConfig())
    summed = segmentation_loss(logits, target, SegLossConfig(ce_reduction="image_sum"))
    assert float(mean["loss_seg"]) == pytest.approx(float(per_pixel.sum() / (target != 255).sum()), rel=1e-6)
    assert float(summed["loss_seg"]) == pytest.approx(float(per_pixel.sum() / 3), rel=1e-6)


def test_alpha_init_sets_the_modulation_scale():
    cfg = Config.model_validate(tiny(method={"name": "latent_rl", "policy": {"pool": [2, 2]}, "alpha_init": 0.5}))
    assert float(build_method(cfg, 8, 255).modulation.alpha.detach()) == 0.5


def test_clip_rl_seg_loss_refined_weighs_l_seg_of_o():
    """The (1 - f) part is w_O L_seg(O) + lambda_RL L_RL: with w_O = 0 and lambda_RL = 0 only f L_seg(s_L) is left."""
    def run(w):
        cfg = Config.model_validate({
            "data": {"image_size": 64, "train_size": 16, "val_size": 8},
            "model": {"encoder": "clip_vit_tiny", "decoder": "tconv3"},
            "method": {"name": "clip_rl", "rl": {"seg_loss_refined": w, "lambda_rl": 0.0}},
        })
        torch.manual_seed(0)
        model = build_method(cfg, num_classes=8, ignore_index=255).train()
        model.on_epoch_start(1, 4)
        g = torch.Generator().manual_seed(1)
        torch.manual_seed(2)
        return model(torch.randn(2, 3, 64, 64, generator=g), torch.randint(0, 8, (2, 64, 64), generator=g)), model.f

    (zero, f), (one, _) = run(0.0), run(1.0)
    assert 0 < f < 1
    assert float(zero["loss"]) == pytest.approx(f * float(zero["loss_seg_sL"]), rel=1e-5)
    assert float(one["loss"]) == pytest.approx(f * float(one["loss_seg_sL"]) + (1 - f) * float(one["loss_seg_O"]),
                                               rel=1e-5)
