"""The typed config tree (DESIGN.md, "The config tree").

Every field has a default (the embedded default: synthetic data, a small random-init encoder, CPU);
unknown keys are rejected with their key path. Method-specific keys live under `method.` and are
validated by the config class the method registered (trainers/methods/), chosen by `method.name`.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, field_validator, model_validator

from trainers.registry import DATASETS, DECODERS, ENCODERS, METHODS, load_all


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _registered(registry, value: str) -> str:
    load_all()
    registry.get(value)  # raises UnknownName listing the known names
    return value


class DataConfig(Strict):
    name: str = "synthetic_surgical"
    root: str | None = None          # dataset folder on disk (real datasets); unused by the synthetic one
    image_size: int = Field(64, ge=16)
    train_size: int | None = Field(512, ge=1)   # None: the whole split (real datasets)
    val_size: int | None = Field(128, ge=1)
    seed: int = 0                    # the scenes' seed: every trial of a sweep sees the same data
    num_workers: int = Field(0, ge=0)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        return _registered(DATASETS, v)


class ModelConfig(Strict):
    encoder: str = "tiny_cnn"
    pretrained: str | None = None    # None: random init; a local checkpoint path; or the library's tag when online
    decoder: str = "fcn"
    decoder_channels: int | None = Field(None, ge=1)   # None: the decoder's default for that encoder width

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


class MethodConfig(Strict):
    """Base of every method's config; subclasses add the method's own keys."""
    name: str
    seg_loss: SegLossConfig = Field(default_factory=SegLossConfig)


class ScheduleConfig(Strict):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0)
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    weight_decay: float = Field(1e-4, ge=0)
    momentum: float = Field(0.9, ge=0, le=1)      # sgd only
    lr_schedule: Literal["constant", "poly", "cosine"] = "poly"
    poly_power: float = Field(0.9, gt=0)
    grad_clip: float | None = Field(None, gt=0)
    eval_every: int = Field(1, ge=1)


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
