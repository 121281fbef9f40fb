"""PLOP's continual tasks (Douillard et al., CVPR 2021; github.com/arthurdouillard/CVPR2021_PLOP): the task
dictionaries of its tasks.py, its image filter (dataset/utils.py filter_images) and its label transforms
(dataset/voc.py, dataset/ade.py VOCSegmentationIncremental / AdeSegmentationIncremental), in "PLOP space":

    VOC        21 classes, 0 = background, 255 = ignore (the VOC masks as stored)
    ADE20K     151 classes, 0 = "other" (the unlabelled pixels of ADEChallengeData2016) as background; a
               reduce-zero-label loader (150 classes, void = 255) is shifted back: k -> k + 1, 255 -> 0
    synthetic  the 8 classes of trainers/data/synthetic.py, 0 = background-tissue (embedded tasks 5-3, 5-1)

A task is {step: [class ids]}; step 0's classes include the background 0. The model's class index of a label is
its position in `order` = [0] + classes of steps 0..t in step order (the identity for every task here whose
classes are listed in increasing order; the shuffled 15-5s_b.. orders of PLOP remap).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# PLOP tasks.py, tasks_voc (its "15-5s" is the paper's 15-1; the shuffled 15-5s_b .. 15-5s_w class orders too)
_VOC_SHUFFLED = {
    "b": [[0, 12, 9, 20, 7, 15, 8, 14, 16, 5, 19, 4, 1, 13, 2, 11], 17, 3, 6, 18, 10],
    "c": [[0, 13, 19, 15, 17, 9, 8, 5, 20, 4, 3, 10, 11, 18, 16, 7], 12, 14, 6, 1, 2],
    "d": [[0, 15, 3, 2, 12, 14, 18, 20, 16, 11, 1, 19, 8, 10, 7, 17], 6, 5, 13, 9, 4],
    "e": [[0, 7, 5, 3, 9, 13, 12, 14, 19, 10, 2, 1, 4, 16, 8, 17], 15, 18, 6, 11, 20],
    "f": [[0, 7, 13, 5, 11, 9, 2, 15, 12, 14, 3, 20, 1, 16, 4, 18], 8, 6, 10, 19, 17],
    "g": [[0, 7, 5, 9, 1, 15, 18, 14, 3, 20, 10, 4, 19, 11, 17, 16], 12, 8, 6, 2, 13],
    "h": [[0, 12, 9, 19, 6, 4, 10, 5, 18, 14, 15, 16, 3, 8, 7, 11], 13, 2, 20, 17, 1],
    "i": [[0, 13, 10, 15, 8, 7, 19, 4, 3, 16, 12, 14, 11, 5, 20, 6], 2, 18, 9, 17, 1],
    "j": [[0, 1, 14, 9, 5, 2, 15, 8, 20, 6, 16, 18, 7, 11, 10, 19], 3, 4, 17, 12, 13],
    "k": [[0, 16, 13, 1, 11, 12, 18, 6, 14, 5, 3, 7, 9, 20, 19, 15], 4, 2, 10, 8, 17],
    "l": [[0, 10, 7, 6, 19, 16, 8, 17, 1, 14, 4, 9, 3, 15, 11, 12], 2, 18, 20, 13, 5],
    "m": [[0, 18, 4, 14, 17, 12, 10, 7, 3, 9, 1, 8, 15, 6, 13, 2], 5, 11, 20, 16, 19],
    "n": [[0, 5, 4, 13, 18, 14, 10, 19, 15, 7, 9, 3, 2, 8, 16, 20], 1, 12, 11, 6, 17],
    "o": [[0, 9, 12, 13, 18, 7, 1, 15, 17, 10, 8, 4, 5, 20, 16, 6], 14, 19, 11, 2, 3],
    "p": [[0, 9, 12, 13, 18, 2, 11, 15, 17, 10, 8, 4, 5, 20, 16, 6], 14, 19, 1, 7, 3],
    "q": [[0, 3, 14, 13, 18, 2, 11, 15, 17, 10, 8, 4, 5, 20, 16, 6], 12, 19, 1, 7, 9],
    "r": [[0, 3, 14, 13, 1, 2, 11, 15, 17, 7, 8, 4, 5, 9, 16, 19], 12, 6, 18, 10, 20],
    "s": [[0, 3, 14, 6, 1, 2, 11, 12, 17, 7, 20, 4, 5, 9, 16, 19], 15, 13, 18, 10, 8],
    "t": [[0, 3, 15, 13, 1, 2, 11, 18, 17, 7, 20, 8, 5, 9, 16, 19], 14, 6, 12, 10, 4],
    "u": [[0, 3, 15, 13, 14, 6, 11, 18, 17, 7, 20, 8, 4, 9, 16, 10], 1, 2, 12, 19, 5],
    "v": [[0, 1, 2, 12, 14, 6, 19, 18, 17, 5, 20, 8, 4, 9, 16, 10], 3, 15, 13, 11, 7],
    "w": [[0, 1, 2, 12, 14, 13, 19, 18, 7, 11, 20, 8, 4, 9, 16, 10], 3, 15, 6, 5, 17],
}


def _one_by_one(base: int, last: int) -> dict[int, list[int]]:
    """{0: [0..base], 1: [base + 1], ..., last - base: [last]} (VOC 15-5s, 10-1)."""
    return {0: list(range(base + 1)), **{s: [base + s] for s in range(1, last - base + 1)}}


def _blocks(base: int, total: int, size: int) -> dict[int, list[int]]:
    """{0: [0..base], then blocks of `size` up to `total - 1`} (ADE 100-50, 100-10, 100-5, 50)."""
    steps = {0: list(range(base + 1))}
    for s, start in enumerate(range(base + 1, total, size), start=1):
        steps[s] = list(range(start, min(start + size, total)))
    return steps


TASKS: dict[str, dict[str, dict[int, list[int]]]] = {
    "voc": {
        "offline": {0: list(range(21))},
        "19-1": {0: list(range(20)), 1: [20]},
        "15-5": {0: list(range(16)), 1: [16, 17, 18, 19, 20]},
        "15-5s": _one_by_one(15, 20),
        **{f"15-5s_{k}": {0: v[0], **{s: [c] for s, c in enumerate(v[1:], start=1)}}
           for k, v in _VOC_SHUFFLED.items()},
        "10-1": _one_by_one(10, 20),
    },
    "ade": {
        "offline": {0: list(range(151))},
        "100-50": _blocks(100, 151, 50),
        "100-10": _blocks(100, 151, 10),
        "100-5": _blocks(100, 151, 5),
        "50": _blocks(50, 151, 50),
    },
    # embedded (ours): the 8 synthetic surgical classes (trainers/data/synthetic CLASSES) in a shuffled order, as
    # PLOP's 15-5s_b.. orders: old = background, instrument shaft, wrist, clasper, thread; new = kidney parenchyma,
    # suturing needle, clamps. At 48 px the embedded model learns background, shaft and kidney (IoU 85, 61, 39 after
    # step 0's 8 epochs on 128 scenes, seed 0) and the thin or small classes hardly at all, so each of old and new
    # holds a class it can learn: old-class forgetting and new-class learning both show. Kidney, a large region, is
    # labelled background in step 0 (the background shift PLOP's pseudo-labels address).
    "synthetic": {
        "offline": {0: list(range(8))},
        "5-3": {0: [0, 2, 3, 4, 5], 1: [1, 6, 7]},
        "5-1": {0: [0, 2, 3, 4, 5], 1: [1], 2: [6], 3: [7]},
    },
}
# the paper's names (Table 3) for PLOP's
ALIASES = {"voc": {"15-1": "15-5s"}}

# dataset name (trainers.registry.DATASETS) -> task family; PLOP-space class count of each family
FAMILIES = {"synthetic_surgical": "synthetic", "voc2012_aug": "voc", "voc2012": "voc", "ade20k": "ade"}
NUM_CLASSES = {"voc": 21, "ade": 151, "synthetic": 8}


@dataclass(frozen=True)
class Recipe:
    """PLOP's scripts (scripts/voc/plop_*.sh, scripts/ade/plop_ade_*.sh; argparser.py --method PLOP): epochs of
    step 0 and of later steps, the POD factors (features; logits, the `pod_options.switch.after.factor`) and the
    later steps' lr as a multiple of step 0's (--lr 0.01, then 0.001)."""
    epochs_first: int
    epochs_later: int
    pod_factor: float
    pod_logits_factor: float
    lr_later_scale: float = 0.1


RECIPES = {
    ("voc", "15-5"): Recipe(30, 30, 0.01, 0.0005),
    ("voc", "15-5s"): Recipe(30, 30, 0.01, 0.0005),
    ("voc", "10-1"): Recipe(30, 10, 0.01, 0.0005),
    ("voc", "19-1"): Recipe(30, 30, 0.01, 0.0005),
    ("ade", "100-50"): Recipe(60, 60, 0.001, 0.00001),
    ("ade", "100-10"): Recipe(60, 60, 0.001, 0.00001),
    ("ade", "100-5"): Recipe(60, 60, 0.001, 0.00001),
    ("ade", "50"): Recipe(60, 60, 0.001, 0.00001),      # no script in PLOP's repository: its other ADE20K tasks'
    # embedded (ours, not PLOP's): sized for ablations/continual.yaml on 2 CPU cores with the supervised preset's
    # schedule (AdamW 0.003, cosine, 128 scenes at 48 px): step 0 near its plateau, a few epochs per later step at
    # step 0's lr (AdamW's; at a tenth, 2 epochs leave the MiB-initialised rows of one step's class equal to the
    # background's, and the next step's lowered background bias hands the background to them: 5-1 PLOP old mIoU
    # 37.2 -> 19.8, against 37.4 -> 27.8 at the full lr, seed 0)
    # Later steps run long enough to learn kidney (the new class the model can learn): with 3 epochs neither
    # fine-tuning nor PLOP learned it (new mIoU 0.1 / 1.7, 5 seeds); with 8 (5-3) fine-tuning reaches kidney IoU 40
    # and forgets the shaft (61 -> 0) while PLOP keeps the shaft (62) and learns kidney to 10 (seed 0): the
    # stability / plasticity trade-off the table is about. 5-1: 6 per step (three later steps).
    ("synthetic", "5-3"): Recipe(8, 8, 0.01, 0.0005, lr_later_scale=1.0),
    ("synthetic", "5-1"): Recipe(8, 6, 0.01, 0.0005, lr_later_scale=1.0),
}
DEFAULT_POD = (0.01, 0.0005)      # PLOP's VOC factors (--method PLOP), for tasks without a script


def family_of(dataset: str) -> str:
    if dataset not in FAMILIES:
        raise ValueError(f"continual.task: no continual task family for data.name={dataset!r} (families: "
                         + ", ".join(f"{k} -> {v}" for k, v in FAMILIES.items()) + ")")
    return FAMILIES[dataset]


def task_name(task: str | dict[str, str], dataset: str) -> str:
    """continual.task as written (a name, or {data.name: name}) -> the PLOP task name for `dataset`."""
    family = family_of(dataset)
    if isinstance(task, dict):
        if dataset not in task:
            raise ValueError(f"continual.task: no task for data.name={dataset!r} in the mapping "
                             f"(keys: {', '.join(task)})")
        task = task[dataset]
    name = ALIASES.get(family, {}).get(task, task)
    if name not in TASKS[family]:
        known = sorted(TASKS[family]) + sorted(ALIASES.get(family, {}))
        raise ValueError(f"continual.task: unknown {family} task {task!r}; known: {', '.join(known)}")
    return name


def task_steps(task: str | dict[str, str], dataset: str) -> dict[int, list[int]]:
    return TASKS[family_of(dataset)][task_name(task, dataset)]


def recipe(task: str | dict[str, str], dataset: str) -> Recipe | None:
    return RECIPES.get((family_of(dataset), task_name(task, dataset)))


@dataclass(frozen=True)
class Step:
    """Step t of a task: its classes (`labels`), the earlier steps' (`labels_old`), all seen so far in model
    order (`order`: model class index -> PLOP-space label) and the step's class-count bookkeeping."""
    index: int
    labels: tuple[int, ...]           # PLOP get_task_labels: this step's classes (step 0: with background 0)
    labels_old: tuple[int, ...]       # the classes of steps < t
    first_classes: tuple[int, ...]    # step 0's classes: PLOP's "old" columns (0-15, 0-100, 0-4)

    @property
    def order(self) -> tuple[int, ...]:
        """PLOP's self.order = [0] + labels_old + labels (zeros stripped)."""
        return (0,) + tuple(c for c in self.labels_old + self.labels if c != 0)

    @property
    def num_classes(self) -> int:        # model outputs at this step (PLOP nb_current_classes)
        return len(self.order)

    @property
    def num_old(self) -> int:            # PLOP old_classes = index of the first new class
        return len(self.order) - len([c for c in self.labels if c != 0]) if self.index else 0

    @property
    def num_new(self) -> int:            # PLOP nb_new_classes (step 0: all its classes)
        return len(self.labels)


def steps_of(task: str | dict[str, str], dataset: str) -> list[Step]:
    steps = task_steps(task, dataset)
    out, seen = [], []
    for t in range(len(steps)):
        out.append(Step(t, tuple(steps[t]), tuple(seen), tuple(steps[0])))
        seen += steps[t]
    return out


# ---- image filter and label transforms, on a per-image class presence matrix (N, 256) bool in PLOP space --------

def filter_images(present: torch.Tensor, labels, labels_old=(), overlap: bool = True) -> torch.Tensor:
    """PLOP dataset/utils.py filter_images, vectorised: indices (ascending) of the images that hold a class of
    `labels` (background 0 excluded); disjoint (overlap False) also requires every class of the image to be in
    labels + labels_old + [0, 255]. present: (N, 256) bool, image i holds label value v."""
    labels = [c for c in labels if c != 0]
    keep = present[:, labels].any(1)
    if not overlap:
        allowed = torch.zeros(present.shape[1], dtype=torch.bool)
        allowed[list(labels) + list(labels_old) + [0, 255]] = True
        keep &= ~present[:, ~allowed].any(1)
    return keep.nonzero().flatten()


def train_lut(step: Step) -> torch.Tensor:
    """PLOP's train target transform (masking "current"): this step's classes -> their model index, 255 stays,
    everything else (old and future classes, background) -> 0: the background shift. (256,) int64."""
    lut = torch.zeros(256, dtype=torch.int64)
    lut[255] = 255
    for c in step.labels:
        lut[c] = step.order.index(c)
    return lut


def eval_lut(step: Step) -> torch.Tensor:
    """PLOP's test set (labels = all seen classes): seen -> model index, 255 stays, unseen (future) -> 0."""
    lut = torch.zeros(256, dtype=torch.int64)
    lut[255] = 255
    for c in step.order:
        lut[c] = step.order.index(c)
    return lut


def eval_images(present: torch.Tensor, step: Step) -> torch.Tensor:
    """PLOP's test images at step t: filter_images(labels_cum, overlap=True): any seen class besides 0."""
    return filter_images(present, list(step.labels_old) + list(step.labels), overlap=True)


def plop_space_lut(dataset_classes: int, family: str) -> torch.Tensor:
    """Raw label value -> PLOP-space label (256,): the identity, or ADE's reduce-zero-label shift back (the loader's
    150 classes k -> k + 1, its void 255 -> 0 "other", PLOP's ADE background)."""
    lut = torch.arange(256, dtype=torch.int64)
    if family == "ade" and dataset_classes == NUM_CLASSES["ade"] - 1:
        lut[:dataset_classes] += 1
        lut[255] = 0
    elif dataset_classes != NUM_CLASSES[family]:
        raise ValueError(f"continual.task: a {family} task expects {NUM_CLASSES[family]} classes, the dataset has "
                         f"{dataset_classes}")
    return lut
