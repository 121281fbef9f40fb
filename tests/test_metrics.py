"""Confusion matrix metrics and the Dice loss against hand-computed values."""
import math

import pytest
import torch

from trainers.losses import dice_loss, segmentation_loss
from trainers.metrics import ConfusionMatrix


def test_confusion_matrix_hand_checked():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 1]])
    cm = ConfusionMatrix(4, ignore_index=255).update(pred, target)
    # class 0: tp 1, fp 1 (a 2 predicted 0), fn 1 (a 0 predicted 1) -> 1/3
    # class 1: tp 3, fp 1, fn 0 -> 3/4 ; class 2: tp 1, fp 0, fn 1 -> 1/2 ; class 3: absent -> NaN
    iou = cm.iou()
    assert iou[:3].tolist() == pytest.approx([1 / 3, 3 / 4, 1 / 2])
    assert math.isnan(iou[3])
    assert cm.miou() == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)
    assert cm.pixel_acc() == pytest.approx(5 / 7)   # the ignored pixel does not count


def test_confusion_matrix_accumulates():
    a = ConfusionMatrix(3)
    t = torch.randint(0, 3, (2, 8, 8), generator=torch.Generator().manual_seed(0))
    p = torch.randint(0, 3, (2, 8, 8), generator=torch.Generator().manual_seed(1))
    a.update(p[:1], t[:1]).update(p[1:], t[1:])
    b = ConfusionMatrix(3).update(p, t)
    assert torch.equal(a.mat, b.mat)
    assert a.mat.sum() == 128


def test_dice_loss_perfect_and_wrong():
    target = torch.tensor([[[0, 1], [1, 255]]])
    perfect = torch.nn.functional.one_hot(target.clamp(max=1), 2).permute(0, 3, 1, 2).float() * 50
    assert dice_loss(perfect, target) == pytest.approx(0.0, abs=1e-6)
    wrong = -perfect
    # all mass on the wrong class: class 0 gets p-mass 2 (the two class-1 pixels), g-mass 1 -> (0+1)/(2+1+1);
    # class 1 gets p-mass 1, g-mass 2 -> 1/4; loss = 1 - (1/4 + 1/4)/2
    assert dice_loss(wrong, target) == pytest.approx(0.75, abs=1e-4)


def test_segmentation_loss_weights():
    from trainers.config import SegLossConfig

    W = SegLossConfig(ce=0.5, dice=2.0)
    logits = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    target = torch.randint(0, 3, (2, 4, 4), generator=torch.Generator().manual_seed(1))
    out = segmentation_loss(logits, target, W)
    ce = torch.nn.functional.cross_entropy(logits, target)
    assert out["loss_seg"] == pytest.approx(0.5 * ce + 2.0 * dice_loss(logits, target))
