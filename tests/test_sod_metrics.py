"""trainers.sod_metrics against the reference implementation (pysodmetrics, py_sod_metrics.sod_metrics) on random
maps: smooth and noisy predictions, blobs, empty and full ground truths, and binary predictions."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from trainers.sod_metrics import binary_iou, foreground_metrics

sod = pytest.importorskip("py_sod_metrics", reason="pysodmetrics is in the `test` extra")


def _maps(n: int = 12, h: int = 24, w: int = 30, seed: int = 0):
    """uint8 predictions 0..255 and 0/255 ground truths as a COD test set stores them: smooth blobs, noise, a
    binary prediction, an empty gt and a full gt."""
    rng = np.random.default_rng(seed)
    preds, gts = [], []
    for i in range(n):
        field = ndimage.gaussian_filter(rng.standard_normal((h, w)), 2 + i % 3)
        gt = field > np.quantile(field, rng.uniform(0.5, 0.9))
        noisy = ndimage.gaussian_filter(field + rng.standard_normal((h, w)) * 0.3 * (i % 4), 1)
        pred = (noisy - noisy.min()) / (noisy.max() - noisy.min())
        if i % 5 == 3:
            pred = (pred > 0.6).astype(float)            # a binary mask, as a promptable segmenter returns
        if i == n - 2:
            gt[:] = False
        if i == n - 1:
            gt[:] = True
        preds.append((pred * 255).round().astype(np.uint8))
        gts.append(gt.astype(np.uint8) * 255)
    return np.stack(preds), np.stack(gts)


def test_foreground_metrics_match_pysodmetrics_on_random_maps():
    preds, gts = _maps()
    sm, wfm, em, mae_ = sod.Smeasure(), sod.WeightedFmeasure(), sod.Emeasure(), sod.MAE()
    ref = {"S_measure": [], "wF": [], "E_measure": [], "MAE": []}
    for p, g in zip(preds, gts):
        for metric in (sm, wfm, em, mae_):
            metric.step(p, g)
        ref["S_measure"].append(sm.sms[-1])
        ref["wF"].append(wfm.weighted_fms[-1])
        ref["E_measure"].append(np.mean(em.changeable_ems[-1]))
        ref["MAE"].append(mae_.maes[-1])
    # our side: the map in [0, 1] as a model gives it, the gt binarised once (0/255 -> 0/1)
    ours = foreground_metrics(torch.from_numpy(preds).double() / 255, torch.from_numpy(gts > 128))
    for key, values in ref.items():
        np.testing.assert_allclose(ours[key].numpy(), np.asarray(values, dtype=np.float64), rtol=1e-9, atol=1e-12,
                                   err_msg=key)
    # the dataset means, as a COD table reports them (meanEm: the mean of the mean curve)
    assert ours["S_measure"].mean().item() == pytest.approx(sm.get_results()["sm"], abs=1e-12)
    assert ours["wF"].mean().item() == pytest.approx(wfm.get_results()["wfm"], abs=1e-12)
    assert ours["E_measure"].mean().item() == pytest.approx(em.get_results()["em"]["curve"].mean(), abs=1e-12)
    assert ours["MAE"].mean().item() == pytest.approx(mae_.get_results()["mae"], abs=1e-12)


def test_s_measure_of_a_perfect_and_an_inverted_mask():
    """S = 1 for the exact mask; the inverted mask scores far below (S-measure is not symmetric in fg / bg)."""
    gt = torch.zeros(1, 16, 16, dtype=torch.bool)
    gt[:, 4:10, 3:12] = True
    perfect = foreground_metrics(gt.double(), gt)
    assert perfect["S_measure"].item() == pytest.approx(1.0, abs=1e-9)
    assert perfect["IoU"].item() == 1.0 and perfect["MAE"].item() == 0.0
    assert foreground_metrics((~gt).double(), gt)["S_measure"].item() < 0.1


def test_binary_iou_by_hand():
    pred = torch.zeros(3, 4, 4, dtype=torch.bool)
    gt = torch.zeros(3, 4, 4, dtype=torch.bool)
    pred[0, :2, :2] = True                  # 4 px, gt 8 px, overlap 4 -> 4 / 8
    gt[0, :2, :4] = True
    pred[1, 0, 0] = True                    # disjoint -> 0
    gt[1, 3, 3] = True
    # image 2: both empty -> 1
    assert binary_iou(pred, gt).tolist() == [0.5, 0.0, 1.0]
