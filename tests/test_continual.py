"""Continual segmentation (trainers/continual/): PLOP's task splits, Local POD, pseudo-labels, the classifier
growth, and whole task sequences on the embedded split (finetune, PLOP, resume mid-sequence)."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from trainers.continual import plop
from trainers.continual.tasks import (eval_images, eval_lut, filter_images, steps_of, task_steps, train_lut,
                                      plop_space_lut)

# PLOP tasks.py as released (github.com/arthurdouillard/CVPR2021_PLOP), the tasks of paper 002's Table 3
PLOP_TASKS = {
    ("voc", "15-5"): {0: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], 1: [16, 17, 18, 19, 20]},
    ("voc", "15-5s"): {0: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], 1: [16], 2: [17], 3: [18],
                       4: [19], 5: [20]},
    ("voc", "10-1"): {0: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 1: [11], 2: [12], 3: [13], 4: [14], 5: [15], 6: [16],
                      7: [17], 8: [18], 9: [19], 10: [20]},
    ("ade", "100-50"): {0: [x for x in range(0, 101)], 1: [x for x in range(101, 151)]},
    ("ade", "100-10"): {0: [x for x in range(0, 101)], 1: [x for x in range(101, 111)],
                        2: [x for x in range(111, 121)], 3: [x for x in range(121, 131)],
                        4: [x for x in range(131, 141)], 5: [x for x in range(141, 151)]},
    ("ade", "100-5"): {0: [x for x in range(0, 101)], 1: [x for x in range(101, 106)],
                       2: [x for x in range(106, 111)], 3: [x for x in range(111, 116)],
                       4: [x for x in range(116, 121)], 5: [x for x in range(121, 126)],
                       6: [x for x in range(126, 131)], 7: [x for x in range(131, 136)],
                       8: [x for x in range(136, 141)], 9: [x for x in range(141, 146)],
                       10: [x for x in range(146, 151)]},
}
DATASET = {"voc": "voc2012_aug", "ade": "ade20k"}
PAPER_NAME = {"15-5s": "15-1"}       # paper 002 Table 3 calls PLOP's 15-5s "15-1"


def plop_filter_images(label_sets, labels, labels_old=None, overlap=True):
    """PLOP dataset/utils.py filter_images, its loop over images (np.unique of each mask) as released."""
    idxs = []
    labels = list(labels)
    if 0 in labels:
        labels.remove(0)
    labels_old = labels_old or []
    labels_cum = labels + labels_old + [0, 255]
    for i, cls in enumerate(label_sets):
        if overlap:
            keep = any(x in labels for x in cls)
        else:
            keep = any(x in labels for x in cls) and all(x in labels_cum for x in cls)
        if keep:
            idxs.append(i)
    return idxs


def random_label_sets(n_classes: int, n: int, rng) -> list[np.ndarray]:
    """Per image, the unique labels of a mask: background often, 1-4 classes, 255 sometimes."""
    out = []
    for _ in range(n):
        k = rng.integers(1, 5)
        cls = set(rng.choice(np.arange(1, n_classes), size=k, replace=False).tolist())
        if rng.random() < 0.8:
            cls.add(0)
        if rng.random() < 0.5:
            cls.add(255)
        out.append(np.array(sorted(cls)))
    return out


@pytest.mark.parametrize("key", list(PLOP_TASKS))
def test_task_splits_equal_plops(key):
    family, name = key
    dataset = DATASET[family]
    assert task_steps(PAPER_NAME.get(name, name), dataset) == PLOP_TASKS[key]
    rng = np.random.default_rng(len(name))
    n_classes = 21 if family == "voc" else 151
    sets = random_label_sets(n_classes, 400, rng)
    present = torch.zeros(len(sets), 256, dtype=torch.bool)
    for i, cls in enumerate(sets):
        present[i, torch.from_numpy(cls)] = True
    steps = steps_of(name, dataset)
    task = PLOP_TASKS[key]
    for t, step in enumerate(steps):
        # PLOP tasks.get_task_labels, then VOCSegmentationIncremental strips the zeros from labels_old
        labels, labels_old = list(task[t]), [c for s in range(t) for c in task[s] if c != 0]
        for overlap in (False, True):
            ours = filter_images(present, step.labels, step.labels_old, overlap).tolist()
            assert ours == plop_filter_images(sets, labels, labels_old, overlap), (name, t, overlap)
        # PLOP's test set: every image with a seen class (labels_cum, overlap)
        assert eval_images(present, step).tolist() == plop_filter_images(sets, labels_old + labels, None, True)
        # target transforms: train = masking "current" (old and future -> 0), test = seen kept, unseen -> 0
        order = [0] + [c for c in labels_old + labels if c != 0]
        inv = {c: order.index(c) for c in order}
        inv[255] = 255
        values = torch.arange(256)
        cur = [0] + [c for c in labels if c != 0] + [255]
        assert train_lut(step)[values].tolist() == [inv[x] if x in cur else 0 for x in range(256)]
        assert eval_lut(step)[values].tolist() == [inv.get(x, 0) for x in range(256)]
        assert step.num_classes == len(order)
    assert sum(s.num_new for s in steps) == n_classes


def test_embedded_tasks_and_ade_shift():
    assert task_steps("5-3", "synthetic_surgical") == {0: [0, 2, 3, 4, 5], 1: [1, 6, 7]}
    assert task_steps("5-1", "synthetic_surgical") == {0: [0, 2, 3, 4, 5], 1: [1], 2: [6], 3: [7]}
    # a reduce-zero-label ADE20K loader (150 classes, void 255) back in PLOP's space: void -> 0 "other", k -> k + 1
    lut = plop_space_lut(150, "ade")
    assert lut[255] == 0 and lut[0] == 1 and lut[149] == 150
    assert torch.equal(plop_space_lut(21, "voc"), torch.arange(256))
    with pytest.raises(ValueError, match="continual.task"):
        from trainers.config import Config
        Config.model_validate({"continual": {"task": "15-5"}})       # not a synthetic task


def test_local_pod_hand_computed():
    # one image, one channel, 4 x 4; scales [1, 2]. Region means by hand.
    x = torch.arange(16.0).view(1, 1, 4, 4)
    emb = plop.local_pod(x, scales=(1, 2))
    rows = [1.5, 5.5, 9.5, 13.5]                 # scale 1: mean over w of each row
    cols = [6.0, 7.0, 8.0, 9.0]                  # mean over h of each column
    # scale 2, region (0, 0) = [[0, 1], [4, 5]]: rows 0.5, 4.5; cols 2, 3. (0, 1) = [[2, 3], [6, 7]]: 2.5, 6.5; 4, 5
    # (1, 0) = [[8, 9], [12, 13]]: 8.5, 12.5; 10, 11. (1, 1) = [[10, 11], [14, 15]]: 10.5, 14.5; 12, 13
    s2_rows = [0.5, 4.5, 2.5, 6.5, 8.5, 12.5, 10.5, 14.5]
    s2_cols = [2, 3, 4, 5, 10, 11, 12, 13]
    assert sorted(emb.flatten().tolist()) == sorted(rows + cols + s2_rows + s2_cols)
    # the loss: layer_loss = ||POD(a^2) - POD(b^2)||_2, times factor and sqrt(classes / new), / layers
    a, b = torch.ones(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)
    # POD(1) has 8 + 16 = 24 entries of 1 at scales (1, 2): distance sqrt(24)
    loss = plop.pod_loss([a, a], [b, a], [0.5, 0.5], num_old=1, schedule=2.0, scales=(1, 2))
    assert loss.item() == pytest.approx(0.5 * 2.0 * math.sqrt(24) / 2)
    # the logits layer: the new classes' logits summed into the background channel
    new = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1).expand(1, 4, 2, 2)
    merged = plop.merge_new_logits(new, num_old=2)
    assert merged[0, :, 0, 0].tolist() == [1 + 3 + 4, 2]


def test_pseudo_labels_and_thresholds():
    # 1 image, 1 x 4 pixels, 3 classes at this step: old = {0, 1}, new = {2}
    labels = torch.tensor([[[0, 0, 2, 255]]])
    confident = torch.tensor([10.0, -10.0])         # class 0, entropy ~ 0
    unsure = torch.tensor([0.0, 0.1])               # class 1, entropy ~ log 2
    logits = torch.stack([unsure, confident, confident, confident], 1).view(1, 2, 1, 4)
    probs = torch.softmax(logits, 1)
    ent = plop.plop_entropy(probs) / math.log(3)
    # PLOP's entropy: -mean_c p log p / log C (C = 2 old classes)
    p = torch.softmax(unsure, 0)
    assert ent[0, 0, 0].item() == pytest.approx(-(p * torch.log(p + 1e-8)).mean().item() / math.log(2) / math.log(3))
    thresholds = torch.tensor([0.01, 0.01])
    out, factor = plop.pseudo_label(labels, logits, thresholds, num_old=2, num_classes=3)
    # pixel 0: background, unsure -> 255; pixel 1: background, confident class 0 -> 0; new class and ignore stay
    assert out.tolist() == [[[255, 0, 2, 255]]]
    assert factor.item() == pytest.approx(1 / 2, rel=1e-5)     # 1 of 2 background pixels pseudo-labelled
    # per-class median of a histogram: class 0 values in bins 0, 0, 1, 3 -> half = 2 at the end of bin 0 -> 0.01;
    # class 1 empty -> the floor; the floor also lifts a small median
    hist = torch.zeros(2, 100, dtype=torch.int64)
    hist[0, 0], hist[0, 1], hist[0, 3] = 2, 1, 1
    th = plop.median_thresholds(hist, floor=0.001)
    assert th[0].item() == pytest.approx(0.01) and th[1].item() == pytest.approx(0.001)
    hist[0, 0] = 0                    # values in bins 1, 3 -> half = 1 inside bin 1 (1 of 1) -> 0.01 + 0.01
    assert plop.median_thresholds(hist, floor=0.001)[0].item() == pytest.approx(0.02)


def test_classifier_grows_with_old_weights_and_plop_init():
    from trainers.config import Config
    from trainers.continual.loop import next_step_model
    cfg = Config.model_validate({"continual": {"task": "5-3", "strategy": "plop"}})
    steps = steps_of("5-3", "synthetic_surgical")
    from trainers.methods import build_method
    torch.manual_seed(0)
    prev = build_method(cfg, 5, 255)
    model = next_step_model(cfg, steps, 1, prev, 255)
    w_old, b_old = prev.segmentor.decoder.classifier.weight, prev.segmentor.decoder.classifier.bias
    w, b = model.segmentor.decoder.classifier.weight, model.segmentor.decoder.classifier.bias
    assert w.shape[0] == 8 and torch.equal(w[:5], w_old)
    assert torch.equal(w[5:], w_old[:1].expand(3, -1, -1, -1))                  # MiB: the background's weights
    new_bias = b_old[0] - math.log(3 + 1)
    assert torch.allclose(b[5:], new_bias.expand(3)) and torch.allclose(b[0], new_bias)
    assert torch.equal(b[1:5], b_old[1:5])
    body = {k: v for k, v in prev.state_dict().items() if "classifier" not in k}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in body.items())
    # the teacher is the previous model, frozen
    teacher = model.plop.teacher
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in prev.state_dict().items())
    assert not any(p.requires_grad for p in teacher.parameters())
    # finetune: random rows, no teacher
    cfg_ft = Config.model_validate({"continual": {"task": "5-3"}})
    ft = next_step_model(cfg_ft, steps, 1, prev, 255)
    assert torch.equal(ft.segmentor.decoder.classifier.weight[:5], w_old) and not hasattr(ft, "plop")
    assert not torch.equal(ft.segmentor.decoder.classifier.weight[5:], w_old[:1].expand(3, -1, -1, -1))


TINY = {"data": {"image_size": 32, "train_size": 48, "val_size": 24}, "model": {"encoder": "tiny_cnn"},
        "schedule": {"batch_size": 8, "lr": 0.003, "lr_schedule": "cosine"},
        "continual": {"task": "5-1", "strategy": "plop", "epochs_first": 1, "epochs_later": 2}}


@pytest.fixture(scope="module")
def plop_run():
    from trainers.loop import fit
    reports = []      # states copied as a checkpoint file would hold them (the live tensors keep training)
    final = fit(TINY, lambda m, s: reports.append((dict(m), copy.deepcopy(s))))
    return final, reports


def test_sequence_reports_steps_and_old_new(plop_run):
    final, reports = plop_run
    assert [m["epoch"] for m, _ in reports] == list(range(1, 8))          # 1 + 2 + 2 + 2 epochs, one counter
    assert [m["continual/step"] for m, _ in reports] == [0, 1, 1, 2, 2, 3, 3]
    for t, i in ((0, 0), (1, 2), (2, 4), (3, 6)):                           # each step's last epoch
        assert f"val/step_{t}/mIoU_old" in reports[i][0]
    assert "val/mIoU_new" in final and "val/mIoU_old" in final and final == reports[-1][0]
    assert "train/loss_pod" in reports[1][0] and "train/loss_pod" not in reports[0][0]
    state = reports[-1][1]
    assert state["continual"]["step"] == 3 and any(k.startswith("plop.teacher.") for k in state["model"])


@pytest.mark.parametrize("resume_after", [3, 4])      # at the end of step 1, and inside step 2
def test_resume_mid_sequence_equals_uninterrupted(plop_run, resume_after):
    from trainers.loop import fit
    final, reports = plop_run
    state = reports[resume_after - 1][1]
    resumed = []
    out = fit(TINY, lambda m, s: resumed.append((dict(m), s)), state=state)
    assert [m["epoch"] for m, _ in resumed] == list(range(resume_after + 1, 8))
    timing = ("time/epoch_s", "train/images_per_s")
    assert {k: v for k, v in out.items() if k not in timing} == {k: v for k, v in final.items() if k not in timing}
    last = resumed[-1][1]["model"]
    assert all(torch.equal(v, reports[-1][1]["model"][k]) for k, v in last.items())


def test_finetune_sequence_runs():
    from trainers.loop import fit
    cfg = {**TINY, "continual": {"task": "5-3", "epochs_first": 1, "epochs_later": 1}}
    reports = []
    out = fit(cfg, lambda m, s: reports.append(m))
    assert [m["continual/step"] for m in reports] == [0, 1]
    assert "train/loss_pod" not in out and math.isfinite(out["val/mIoU_old"]) and math.isfinite(out["val/mIoU"])


def test_class_sets_of_a_disk_dataset_are_read_once_and_cached(tmp_path, monkeypatch):
    from trainers.continual import data as cdata
    monkeypatch.setenv("RLSEG_CACHE", str(tmp_path))
    monkeypatch.setattr(cdata, "_PRESENCE", {})

    class OnDisk:      # the loader protocol of VOC / ADE20K: load(i) -> (image, stored mask)
        classes, num_classes, ignore_index, root = tuple("abcdefgh"), 8, 255, "/data/x"
        ids = ["i0", "i1", "i2"]
        loads = 0

        def __len__(self):
            return 3

        def load(self, i):
            OnDisk.loads += 1
            return None, np.array([[0, 5], [255, 5]] if i == 1 else [[0, 1], [2, 2]], dtype=np.uint8)

    present = cdata.class_presence(OnDisk(), "train")
    assert OnDisk.loads == 3 and present[1].nonzero().flatten().tolist() == [0, 5, 255]
    monkeypatch.setattr(cdata, "_PRESENCE", {})            # a new process: the file cache answers
    assert torch.equal(cdata.class_presence(OnDisk(), "train"), present) and OnDisk.loads == 3
    step = steps_of("5-3", "synthetic_surgical")[1]
    subset = cdata.step_dataset(OnDisk(), "train", step, "synthetic", overlap=True)
    # step 1 of 5-3 adds classes 1, 6, 7: images 0, 2 (0, 1, 2) hold one, image 1 (0, 5) none; the model's class order
    # is [0] + old [2, 3, 4, 5] + new [1, 6, 7] (PLOP's order), and the stored labels follow it
    assert subset.indices == [0, 2] and subset.classes == list("acdefbgh")
    # 1 -> its position 5; old classes -> background in a train step; ignore stays
    assert subset.lut[torch.tensor([0, 1, 2, 5, 255])].tolist() == [0, 5, 0, 0, 255]
