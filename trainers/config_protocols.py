"""The evaluation protocol (eval.*: TTA, slide windows, extra evaluation sets) and the continual protocol
(continual.*: PLOP's task sequences) of the config tree; trainers.config re-exports them."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from trainers.config_strict import Strict


# words of the val/ metric names that a label of eval.datasets would collide with
RESERVED_EVAL_LABELS = ("IoU", "mIoU", "pixel_acc", "aAcc")


class EvalSetConfig(BaseModel):
    """One extra evaluation set (eval.datasets.<label>): data keys (DataConfig's) over the trial's own data config,
    e.g. {shift: {low_light: 0.7}} (the trial's val scenes in another domain) or {name: dark_zurich, root: /data/dz}.
    Keys left out are the trial's, resolved when the set is built (eval_set_data), so a later data.* override
    reaches them. Its classes are matched to the trial's by name; class_map renames ({its name: trial's name})."""
    model_config = ConfigDict(extra="allow", validate_assignment=True)
    class_map: dict[str, str] = Field(default_factory=dict)

    def data_keys(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class EvalConfig(Strict):
    """How validation predicts (trainers.evaluation), named after SSSegmentation's `inference` config:
    tta.multiscale -> scales, tta.flip -> flip, forward.mode/cropsize/stride -> mode/crop_size/stride.
    Logits of every scale and flip are resampled to the mask's size and averaged before the argmax.
    datasets: extra evaluation sets by label (cross-domain, paper 002 Table 4), each evaluated with this same
    protocol at every evaluation: val/<label>/mIoU, val/<label>/pixel_acc, val/<label>/IoU/<class>."""
    scales: list[float] = Field(default_factory=lambda: [1.0], min_length=1)
    flip: bool = False
    mode: Literal["whole", "slide"] = "whole"
    crop_size: tuple[int, int] | None = None    # slide: (h, w) window (e.g. Cityscapes 512x1024 crops)
    stride: tuple[int, int] | None = None       # slide: (h, w) step between windows
    batch_size: int | None = Field(None, ge=1)  # None: schedule.batch_size; data.val_resize forces 1 (sizes vary)
    datasets: dict[str, EvalSetConfig] = Field(default_factory=dict)

    @field_validator("datasets", mode="before")
    @classmethod
    def _dropped(cls, v: Any) -> Any:
        # `<label>: null` drops a set given earlier (a spec profile or the command line over its base)
        return {k: s for k, s in v.items() if s is not None} if isinstance(v, dict) else v

    @field_validator("datasets")
    @classmethod
    def _labels(cls, v: dict[str, EvalSetConfig]) -> dict[str, EvalSetConfig]:
        for label in v:
            if not label.isidentifier() or not label.isascii():
                raise ValueError(f"label {label!r}: a label names metrics (val/<label>/mIoU): expected an "
                                 "identifier (letters, digits, _)")
            if label.lower() in {w.lower() for w in RESERVED_EVAL_LABELS}:
                raise ValueError(f"label {label!r} is a word of the val/ metric names "
                                 f"({', '.join(RESERVED_EVAL_LABELS)}); choose another label")
        return v

    @field_validator("scales")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(s <= 0 for s in v):
            raise ValueError(f"scales must be > 0, got {v}")
        return v

    @model_validator(mode="after")
    def _slide_needs_window(self) -> "EvalConfig":
        if self.mode == "slide" and (self.crop_size is None or self.stride is None):
            raise ValueError("mode: slide needs crop_size and stride, e.g. crop_size: [512, 1024], stride: [341, 341]")
        return self


class PLOPConfig(Strict):
    """PLOP's loss weights (trainers/continual/plop.py; its argparser --method PLOP and scripts). None: the task's
    own value (VOC: pod 0.01, logits 0.0005; ADE20K: 0.001, 1e-5; embedded tasks: VOC's)."""
    pod_factor: float | None = Field(None, ge=0)          # Local POD on the encoder stages and decoder features
    pod_logits_factor: float | None = Field(None, ge=0)   # Local POD on the low-resolution logits (pod_logits)
    pod_schedule: bool = True                             # times sqrt(classes so far / new classes)
    spp_scales: list[int] = Field(default_factory=lambda: [1, 2, 4], min_length=1)
    threshold: float = Field(0.001, ge=0)                 # floor of the per-class median entropy (--threshold)
    bins: int = Field(100, ge=2)                          # of find_median's entropy histogram
    adaptive_factor: bool = True                          # classif_adaptive_factor


class ContinualConfig(Strict):
    """Continual semantic segmentation (paper 002 Table 3, the PLOP protocol; trainers/continual/): one trial runs a
    whole task sequence, each step from the previous step's model with a grown classifier. `method` stays each
    step's learner, so PLOP + Latent-Space RL is method latent_rl with strategy plop."""
    # null: off. A task name of the dataset's family (VOC 15-5, 15-1 (PLOP's 15-5s), 10-1, 19-1; ADE20K 100-50,
    # 100-10, 100-5, 50; synthetic 5-3, 5-1), or {data.name: task} so one spec row names a task per dataset
    task: str | dict[str, str] | None = None
    setting: Literal["disjoint", "overlap"] = "overlap"   # PLOP's scripts all pass --overlap
    strategy: Literal["finetune", "plop"] = "finetune"
    # epochs of step 0 and of each later step; None: the task's PLOP script (VOC 30 / 30, 10-1 30 / 10; ADE20K
    # 60 / 60), else schedule.epochs
    epochs_first: int | None = Field(None, ge=1)
    epochs_later: int | None = Field(None, ge=1)
    lr_later: float | None = Field(None, gt=0)   # lr of the later steps; None: schedule.lr x the task's scale (PLOP's
    # scripts: / 10, 0.01 then 0.001; embedded tasks: x 1, trainers/continual/tasks.py RECIPES)
    # the new classes' classifier rows: mib (PLOP's init_balanced), random (the fresh model's), auto: mib with plop
    classifier_init: Literal["auto", "mib", "random"] = "auto"
    plop: PLOPConfig = Field(default_factory=PLOPConfig)
