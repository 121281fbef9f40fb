"""The typed config tree (DESIGN.md, "The config tree").

Every field has a default (the embedded default: synthetic data, a small random-init encoder, CPU);
unknown keys are rejected with their key path. Method-specific keys live under `method.` and are
validated by the config class the method registered (trainers/methods/), chosen by `method.name`.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, SerializeAsAny, ValidationError, field_validator, model_validator

# the evaluation protocol (eval.*) and the continual protocol (continual.*) live in their own module; re-exported
from trainers.config_protocols import (RESERVED_EVAL_LABELS, ContinualConfig, EvalConfig,  # noqa: F401
                                       EvalSetConfig, PLOPConfig)
from trainers.config_strict import Strict  # noqa: F401  (one Strict for every section; imported from here too)
from trainers.registry import DATASETS, DECODERS, ENCODERS, METHODS, load_all


def _registered(registry, value: str) -> str:
    load_all()
    registry.get(value)  # raises UnknownName listing the known names
    return value


class ShiftConfig(Strict):
    """data.shift: the generated scenes seen through another camera (trainers/data/synthetic/shift.py), for
    cross-domain evaluation (eval.datasets). Each term is a strength in [0, 1], 0 = off."""
    low_light: float = Field(0.0, ge=0, le=1)    # darkening: gamma up to 3, exposure down to 0.4 (Lv et al. 2021)
    noise: float = Field(0.0, ge=0, le=1)        # Poissonian-Gaussian sensor noise, shot + read (Foi et al. 2008)
    color_cast: float = Field(0.0, ge=0, le=1)   # white-balance error toward a cool illuminant


class DataConfig(Strict):
    name: str = "synthetic_surgical"
    root: str | None = None          # dataset folder on disk (real datasets); unused by the synthetic one
    image_size: int = Field(64, ge=16)
    train_size: int | None = Field(512, ge=1)   # None: the whole split (real datasets)
    val_size: int | None = Field(128, ge=1)
    seed: int = 0                    # the scenes' seed: every trial of a sweep sees the same data
    num_workers: int = Field(0, ge=0)
    # DataLoader worker processes kept between epochs. Off by default: a worker's RNG is seeded once per
    # lifetime, so with persistent workers a run resumed from a checkpoint draws other augmentations than the
    # uninterrupted one (restarting the workers each epoch costs about a second).
    persistent_workers: bool = False
    prefetch_factor: int = Field(2, ge=1)   # batches each worker loads ahead (num_workers > 0)
    # Train-time resize of the real datasets (VOC). None: the shorter side becomes image_size * ratio.
    # (long, short): SSSegmentation's Resize(output_size=(2048, 512), keep_ratio=True): the image is scaled by
    # min(long * ratio / its long side, short * ratio / its short side), ratio ~ U(scale_range).
    resize: tuple[int, int] | None = None
    scale_range: tuple[float, float] = (0.5, 2.0)   # the random ratio of the train resize (SSSegmentation: 0.5-2)
    # Random crop (image_size x image_size): retry up to 10 times until no class covers more than this fraction
    # of the crop's labelled pixels (SSSegmentation RandomCrop one_category_max_ratio, mmseg cat_max_ratio: 0.75)
    cat_max_ratio: float | None = Field(None, gt=0, le=1)
    photometric: bool = False        # SSSegmentation's PhotoMetricDistortion (brightness, contrast, saturation, hue)
    # Validation input: None: the dataset's own val transform (VOC: longer side image_size, padded, scored on the
    # resized mask). (long, short): SSSegmentation's test Resize((2048, 512), keep_ratio=True), no padding; the
    # logits are resampled to the original size and scored against the original mask (trainers.evaluation).
    val_resize: tuple[int, int] | None = None
    # The train crop (h, w) of the folder datasets (Cityscapes: [512, 1024], SSSegmentation's cityscapes_512x1024);
    # None: image_size x image_size. The val pad without val_resize fits the same box.
    crop_size: tuple[int, int] | None = None
    # SSSegmentation's Resize keep_ratio for data.resize and data.val_resize: false resizes to the target itself,
    # its longer side along the image's (LIP / CIHP: Resize((520, 520), keep_ratio=False), test (473, 473)).
    keep_ratio: bool = True
    # SSSegmentation's RandomRotation (prob, angle_upper): rotate the crop by randint(-angle, angle) degrees with
    # probability prob (LIP / CIHP: (0.6, 30)); None: no rotation.
    rotate: tuple[float, int] | None = None
    shift: ShiftConfig | None = None   # a shifted domain of the generated synthetic_surgical scenes (ShiftConfig)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        return _registered(DATASETS, v)

    @field_validator("crop_size")
    @classmethod
    def _positive_crop(cls, v):
        if v is not None and min(v) < 1:
            raise ValueError(f"expected [h, w] of positive sizes, got {list(v)}")
        return v

    @field_validator("rotate")
    @classmethod
    def _rotation(cls, v):
        if v is not None and not (0 <= v[0] <= 1 and v[1] >= 1):
            raise ValueError(f"expected [prob in 0..1, angle_upper >= 1 degree], got {list(v)}")
        return v


class AuxHeadConfig(Strict):
    """The auxiliary FCN head on the encoder's stage 3 (SSSegmentation FCN `auxiliary`: 3x3 conv 1024 -> 512,
    BN, ReLU, dropout 0.1, 1x1 classifier; its CE enters the training loss with weight 0.4). Training only: it
    never runs at evaluation."""
    enabled: bool = False
    weight: float = Field(0.4, ge=0)
    channels: int = Field(512, ge=1)


class ModelConfig(Strict):
    encoder: str = "tiny_cnn"
    pretrained: str | None = None    # None: random init; a local checkpoint path; or the library's tag when online
    decoder: str = "fcn"
    decoder_channels: int | None = Field(None, ge=1)   # None: the decoder's default for that encoder width
    aux_head: AuxHeadConfig = Field(default_factory=AuxHeadConfig)
    # BatchNorm -> SyncBatchNorm before DDP when a trial has more than one worker (SSSegmentation's norm_cfg
    # SyncBatchNorm: BN statistics over the global batch, 16 images, instead of each GPU's 8). torch's
    # SyncBatchNorm trains on CUDA only (trainers.accel.convert_sync_batchnorm).
    sync_bn: bool = False

    @field_validator("encoder")
    @classmethod
    def _known_encoder(cls, v: str) -> str:
        return _registered(ENCODERS, v)

    @field_validator("decoder")
    @classmethod
    def _known_decoder(cls, v: str) -> str:
        return _registered(DECODERS, v)


class SegLossConfig(Strict):
    """L_seg = ce * CE + dice * Dice (the supervised term every method keeps)."""
    ce: float = Field(1.0, ge=0)
    dice: float = Field(0.0, ge=0)
    # mean: over the batch's valid pixels (SSSegmentation, F.cross_entropy). image_sum: paper 002's Eq. 2 as written,
    # (1/N) sum_i sum_p CE, a sum over each image's pixels (H*W times larger: 262,144 at 512^2), mean over images.
    ce_reduction: Literal["mean", "image_sum"] = "mean"


class MethodConfig(Strict):
    """Base of every method's config; subclasses add the method's own keys."""
    name: str
    seg_loss: SegLossConfig = Field(default_factory=SegLossConfig)

    def trains_on_reward(self) -> bool:
        """Whether a policy of this config is trained on a reward (an RL row: the table reads it against the spec's
        spurious-reward control row, orchestrator.controls). False here; the RL methods say when."""
        return False


class ScheduleConfig(Strict):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0)
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    weight_decay: float = Field(1e-4, ge=0)
    momentum: float = Field(0.9, ge=0, le=1)      # sgd only
    lr_schedule: Literal["constant", "poly", "cosine"] = "poly"
    poly_power: float = Field(0.9, gt=0)
    # The schedule ends at lr * min_lr_ratio (SSSegmentation PolyScheduler min_lr: lr * 0.01 when unset, as in its FCN
    # and SETR configs; SegFormer 0). Linear warm-up over warmup_iters steps from warmup_ratio * lr (its warmup_cfg;
    # SegFormer: 1500 iters, ratio 1e-6). trainers/optim.py has the formulas.
    min_lr_ratio: float = Field(0.0, ge=0, lt=1)
    warmup_iters: int = Field(0, ge=0)
    warmup_ratio: float = Field(1e-6, gt=0, le=1)
    # SSSegmentation params_rules (trainers/optim.py): lr multipliers of the encoder's backbone and of the head
    # (decoder, aux head, the encoder's head parts); weight decay of the backbone's norm layers (None: weight_decay).
    # SegFormer: head_lr_mult 10, norm_weight_decay 0. SETR: backbone_lr_mult 0.1.
    backbone_lr_mult: float = Field(1.0, gt=0)
    head_lr_mult: float = Field(1.0, gt=0)
    norm_weight_decay: float | None = Field(None, ge=0)
    grad_clip: float | None = Field(None, gt=0)
    eval_every: int = Field(1, ge=1)
    # Mixed precision of the train step (trainers.accel): bf16 / fp16 autocast; fp16 adds a GradScaler. The
    # logits leave the segmentor in fp32 and the latent policy's mu / log_sigma too, so L_seg, the rewards and
    # the log-probs / KL of latent_rl are computed in fp32 (trainers.accel.fp32_islands).
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool = False       # NHWC model and input (tensor cores); a layout, the maths is unchanged
    cudnn_benchmark: bool = False     # cuDNN autotune for fixed input sizes (CUDA; nondeterministic algorithms)


class ResourcesConfig(Strict):
    """What each trial asks Ray for (orchestrator.trial.scaling_config turns it into a ScalingConfig)."""
    workers: int = Field(1, ge=0)     # Ray Train workers (DDP ranks); 0 = train inside the Tune trial process
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)   # fractional (0.5) lets two workers share a GPU; > 0 trains on CUDA
    # how Ray places the workers: pack = as few nodes as fit (fast collectives), spread = one per node where
    # it can (ScalingConfig placement_strategy PACK / SPREAD; both are best effort, as in Ray)
    placement: Literal["pack", "spread"] = "pack"
    # how many times Ray Train restarts a trial's workers after one of them fails (raised, or its process died),
    # each time from the trial's latest epoch checkpoint (ray.train.FailureConfig(max_failures)); 0 = fail at once.
    # Any worker error counts except TrainingDiverged: resuming is exact, so a diverged run would diverge again,
    # and the trial fails at once with it.
    max_failures: int = Field(2, ge=0)
    # which process trains (orchestrator.trial): auto = in the Tune trial itself for 0 or 1 worker (no Ray Train
    # controller and worker processes: seconds less per trial, same guarantees), a Ray Train TorchTrainer for DDP
    # (2 or more workers); torch_trainer forces a TorchTrainer for 1 worker too; in_process needs workers <= 1.
    trial_path: Literal["auto", "torch_trainer", "in_process"] = "auto"

    @model_validator(mode="after")
    def _path_fits_workers(self):
        if self.trial_path == "in_process" and self.workers > 1:
            raise ValueError(f"trial_path in_process trains in one process; workers={self.workers} needs "
                             f"torch_trainer (or auto)")
        if self.trial_path == "torch_trainer" and self.workers < 1:
            raise ValueError("trial_path torch_trainer needs workers >= 1")
        return self


class FaultConfig(Strict):
    """Test-only fault injection: make one rank fail at step `step` (0-based) of epoch `epoch` (1-based).

    kind: none (default) | raise (InjectedFaultError, an exception in the train loop) | exit (os._exit(1), as if
    the worker process were killed; under Ray it first waits until Ray Train has taken the previous epoch's report,
    so the retry starts from that checkpoint) | nan (that step's loss becomes NaN: TrainingDiverged at the epoch end,
    never retried).
    It fires only in an attempt that started without a checkpoint (a fresh fit, or the first Ray Train attempt):
    a retry resumes from the latest epoch checkpoint and runs on without it. So a fault in epoch e >= 2 fires once
    and is retried from the epoch e-1 checkpoint; a fault in epoch 1 has no checkpoint before it and fires in every
    attempt (a failure test, not a retry test).
    """
    kind: Literal["none", "raise", "exit", "nan"] = "none"
    epoch: int = Field(1, ge=1)
    step: int = Field(0, ge=0)
    rank: int = Field(0, ge=0)


class DebugConfig(Strict):
    """Test-only hooks; the defaults change nothing."""
    fault: FaultConfig = Field(default_factory=FaultConfig)


class Config(Strict):
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: SerializeAsAny[MethodConfig] = Field(default_factory=lambda: _method_config({"name": "supervised"}))
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    continual: ContinualConfig = Field(default_factory=ContinualConfig)
    debug: DebugConfig = Field(default_factory=DebugConfig)

    @field_validator("method", mode="before")
    @classmethod
    def _method(cls, v: Any) -> Any:
        if isinstance(v, MethodConfig):
            return v
        if isinstance(v, str):
            v = {"name": v}
        if not isinstance(v, dict):
            raise ValueError("expected a mapping with a method `name` (or a method name)")
        return _method_config(v)

    @model_validator(mode="after")
    def _fault_can_fire(self) -> "Config":
        f = self.debug.fault
        if f.kind != "none" and f.epoch > self.schedule.epochs:
            raise ValueError(f"debug.fault.epoch: {f.epoch} is after the last epoch (schedule.epochs = "
                             f"{self.schedule.epochs}), so the fault would never fire")
        if f.kind != "none" and f.rank >= max(self.resources.workers, 1):
            raise ValueError(f"debug.fault.rank: {f.rank} but there are only {max(self.resources.workers, 1)} "
                             "rank(s) (resources.workers)")
        return self

    @model_validator(mode="after")
    def _eval_sets_resolve(self) -> "Config":
        if self.eval.datasets and METHODS.get(self.method.name).build.VAL_METRICS is not None:
            raise ValueError(f"eval.datasets: method {self.method.name} reports its own validation metrics; extra "
                             "evaluation sets are scored as segmentation (mIoU)")
        if self.eval.datasets and self.continual.task is not None:
            raise ValueError("eval.datasets: a continual task sequence (continual.task) scores its own steps only; "
                             "extra evaluation sets are not evaluated there")
        for label in self.eval.datasets:
            self.eval_set_data(label)     # each set's data keys form a valid data config
        return self

    @model_validator(mode="after")
    def _continual_task_fits_data(self) -> "Config":
        if self.continual.task is not None:
            from trainers.continual.tasks import task_name
            task_name(self.continual.task, self.data.name)     # ValueError naming continual.task
            if METHODS.get(self.method.name).build.VAL_METRICS is not None:
                raise ValueError(f"continual.task: method {self.method.name} reports its own validation metrics; "
                                 "a continual sequence is scored by per-class IoU (old / new / all mIoU)")
        return self

    def eval_set_data(self, label: str) -> DataConfig:
        """The data config of eval.datasets.<label>: its own keys over the trial's data config."""
        keys = self.eval.datasets[label].data_keys()
        unknown = sorted(set(keys) - set(DataConfig.model_fields))
        if unknown:
            raise ValueError(f"eval.datasets.{label}.{unknown[0]}: not a data key (expected class_map or one of "
                             f"{', '.join(DataConfig.model_fields)})")
        try:
            return DataConfig.model_validate({**self.data.model_dump(), **keys})
        except ValidationError as e:
            err = e.errors()[0]
            path = ".".join(str(p) for p in err["loc"])
            raise ValueError(f"eval.datasets.{label}.{path}: {err['msg']}") from None


def _method_config(v: dict) -> MethodConfig:
    load_all()
    name = v.get("name", "supervised")
    if not isinstance(name, str):
        raise ValueError("method.name: expected a method name")
    entry = METHODS.get(name)
    return entry.config.model_validate({**v, "name": name})


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def recipe_line(tree: dict) -> str:
    """One line naming the recipe switches of a resolved config tree (for a dry run next to its `base:` line):
    `recipe: resnet50c_d8 (pretrained gluon_in1k), aux head 0.4, SyncBN, photometric, crop 512 cat_max_ratio 0.75,
    resize (2048, 512) x [0.5, 2.0]; eval val_resize (2048, 512) scales [1.0] whole; bf16 channels_last`."""
    cfg = Config.model_validate(tree)
    d, m, s, e = cfg.data, cfg.model, cfg.schedule, cfg.eval
    parts = [f"{m.encoder} (pretrained {m.pretrained or 'none'})"]
    if m.aux_head.enabled:
        parts.append(f"aux head {m.aux_head.weight:g}")
    if m.sync_bn:
        parts.append("SyncBN")
    if d.photometric:
        parts.append("photometric")
    crop = (f"crop {d.crop_size[0]}x{d.crop_size[1]}" if d.crop_size else f"crop {d.image_size}") + (f" cat_max_ratio {d.cat_max_ratio:g}" if d.cat_max_ratio else "")
    resize = f"resize {tuple(d.resize)}" if d.resize else f"short side {d.image_size}"
    resize += "" if d.keep_ratio else " keep_ratio false"
    if d.rotate:
        parts.append(f"rotate p {d.rotate[0]:g} +-{d.rotate[1]}")
    parts.append(f"{crop}, {resize} x {list(d.scale_range)}")
    val = f"val_resize {tuple(d.val_resize)}" if d.val_resize else "val as the dataset's"
    flip = " flip" if e.flip else ""
    speed = s.precision + (" channels_last" if s.channels_last else "") + (" cudnn_benchmark" if s.cudnn_benchmark else "")
    return f"recipe: {', '.join(parts)}; eval {val} scales {e.scales}{flip} {e.mode}; {speed}"
