"""One trial = one whole continual task sequence (trainers.loop._train dispatches here when continual.task is set).

    for step t = 0..T:
        data      the step's images and labels (trainers.continual.data: PLOP's filter and background shift)
        model     t = 0: the method with the step's classes; t > 0: the same method with a classifier grown by the
                  step's classes (old rows kept, new ones PLOP's init or random), the step t-1 model frozen as
                  the teacher (strategy plop: trainers.continual.plop.Distiller, thresholds from one teacher pass)
        optimizer a fresh one per step (PLOP's run_step), lr = schedule.lr at t = 0, then later_lr (PLOP: / 10)
        epochs    continual.epochs_first / epochs_later, each trained by trainers.loop.train_one_epoch and scored by
                  trainers.evaluation.evaluate on the step's test images (every seen class; unseen ones background)

Reports once per epoch with a global epoch counter, `continual/step`, val/mIoU (all seen classes), val/mIoU_old
(step 0's classes, PLOP's "0-15") and val/mIoU_new (the later steps' classes); a step's last epoch adds
val/step_<t>/mIoU_old|mIoU_new|mIoU (under val/, which the sweep's recorder and MLflow keep). Checkpoints carry the
global epoch; the model state holds the teacher and the thresholds, so a trial resumes mid-sequence: inside a step,
or at a step boundary (the finished step's model is rebuilt and the next step starts as it would have).
"""
from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader, DistributedSampler

from trainers.accel import Accel, loader_kwargs, prepare_model
from trainers.checkpoint import RANK_RECORD, TrainingDiverged, rank_record, rng_state, set_rng_state
from trainers.continual.data import step_dataset
from trainers.continual.plop import Distiller, grow_state, student_state
from trainers.continual.tasks import Step, family_of, recipe, steps_of, DEFAULT_POD
from trainers.data import build_dataset
from trainers.evaluation import ShardSampler, build_eval_sets, build_val_loader, evaluate, evaluate_sets
from trainers.methods import build_method
from trainers.optim import build_lr_schedule, build_optimizer


def step_epochs(cfg) -> list[int]:
    """Epochs of each step: continual.epochs_first / epochs_later, else the task's PLOP script, else schedule.epochs."""
    c = cfg.continual
    steps = steps_of(c.task, cfg.data.name)
    r = recipe(c.task, cfg.data.name)
    first = c.epochs_first or (r.epochs_first if r else cfg.schedule.epochs)
    later = c.epochs_later or (r.epochs_later if r else cfg.schedule.epochs)
    return [first] + [later] * (len(steps) - 1)


def later_lr(cfg) -> float:
    """The lr of steps t >= 1: continual.lr_later, else schedule.lr times the task's scale (PLOP: 1/10)."""
    r = recipe(cfg.continual.task, cfg.data.name)
    return cfg.continual.lr_later or cfg.schedule.lr * (r.lr_later_scale if r else 0.1)


def total_epochs(cfg) -> int:
    """The epochs a continual trial reports (all steps); schedule.epochs for any other trial."""
    return sum(step_epochs(cfg)) if cfg.continual.task is not None else cfg.schedule.epochs


def build_step_model(cfg, steps: list[Step], t: int, ignore_index: int):
    """Step t's model as built before any weights arrive: the method with step t's classes and, for PLOP at t > 0,
    its Distiller around a teacher with step t-1's classes (weights from the previous model or a checkpoint)."""
    model = build_method(cfg, steps[t].num_classes, ignore_index)
    if cfg.continual.strategy == "plop" and t > 0:
        c, (pod, pod_logits) = cfg.continual.plop, _pod_factors(cfg)
        teacher = build_method(cfg, steps[t - 1].num_classes, ignore_index)
        Distiller(teacher, steps[t].num_old, steps[t].num_classes, steps[t].num_new, pod, pod_logits,
                  c.pod_schedule, c.spp_scales, c.threshold, c.bins, c.adaptive_factor).attach(model)
    return model


def _pod_factors(cfg) -> tuple[float, float]:
    c, r = cfg.continual.plop, recipe(cfg.continual.task, cfg.data.name)
    default = (r.pod_factor, r.pod_logits_factor) if r else DEFAULT_POD
    return (default[0] if c.pod_factor is None else c.pod_factor,
            default[1] if c.pod_logits_factor is None else c.pod_logits_factor)


def next_step_model(cfg, steps: list[Step], t: int, prev, ignore_index: int):
    """Step t's model from the step t-1 model `prev`: classifier grown (trainers.continual.plop.grow_state), the
    teacher a frozen copy of `prev`'s learner."""
    model = build_step_model(cfg, steps, t, ignore_index)
    init = cfg.continual.classifier_init
    init = ("mib" if cfg.continual.strategy == "plop" else "random") if init == "auto" else init
    old = student_state(prev)
    fresh = student_state(model)
    model.load_checkpoint_state({**model.checkpoint_state(),
                                 **grow_state(old, fresh, steps[t - 1].num_classes, steps[t].num_new, init)})
    distiller = getattr(model, Distiller.NAME, None)
    if distiller is not None:
        distiller.teacher.load_checkpoint_state(old)
    return model


def train_continual(cfg, rt, report, state: dict | None) -> dict[str, float]:
    from trainers.loop import seed_everything

    seed_everything(cfg.seed)
    torch.set_num_threads(max(1, int(cfg.resources.cpus_per_worker)))
    if cfg.continual.strategy == "plop" and cfg.method.seg_loss.dice > 0:
        raise ValueError("continual.strategy: plop replaces L_seg by PLOP's cross-entropy; set method.seg_loss.dice=0")
    base = {split: build_dataset(cfg.data, split) for split in ("train", "val")}
    steps = steps_of(cfg.continual.task, cfg.data.name)
    epochs = step_epochs(cfg)
    ends = [sum(epochs[:t + 1]) for t in range(len(steps))]
    start = state["epoch"] if state is not None else 0
    first = next((t for t in range(len(steps)) if ends[t] > start), len(steps))
    prev, metrics = None, {}
    if state is not None and first > 0 and start == ends[first - 1]:
        # at a step boundary: the finished step's model, then the next step begins as it would have
        prev = build_step_model(cfg, steps, first - 1, base["train"].ignore_index).to(rt.device)
        prev.load_checkpoint_state(state["model"])
        set_rng_state(state["rng"], rt.device)
        state = None
    for t in range(first, len(steps)):
        prev, metrics = _run_step(cfg, rt, report, steps, t, prev, base, epochs, ends, state, start)
        state = None
    return metrics


def _run_step(cfg, rt, report, steps, t, prev, base, epochs, ends, state, start_epoch):
    step, family = steps[t], family_of(cfg.data.name)
    overlap = cfg.continual.setting == "overlap"
    train_set = step_dataset(base["train"], "train", step, family, overlap)
    val_set = step_dataset(base["val"], "val", step, family, overlap)
    ignore = base["train"].ignore_index
    if state is not None:          # resumed inside this step: the checkpoint holds the teacher and thresholds
        model = build_step_model(cfg, steps, t, ignore)
        model.load_checkpoint_state(state["model"])
    elif t == 0:
        model = build_method(cfg, step.num_classes, ignore)
    else:
        model = next_step_model(cfg, steps, t, prev, ignore)
    model = prepare_model(model.to(rt.device), cfg, rt.world_size, rt.device)
    accel = Accel.from_config(cfg.schedule, rt.device)

    bs = cfg.schedule.batch_size
    sampler = DistributedSampler(train_set, num_replicas=rt.world_size, rank=rt.rank, shuffle=True, seed=cfg.seed)
    train_loader = DataLoader(train_set, batch_size=bs, sampler=sampler, drop_last=True,
                              **loader_kwargs(cfg.data, rt.device))
    if len(train_loader) == 0:
        raise ValueError(f"schedule.batch_size {bs} is larger than a rank's share of step {t}'s "
                         f"{len(train_set)} training images (continual.task {cfg.continual.task})")
    val_loader = build_val_loader(val_set, cfg, rt)
    eval_sets = build_eval_sets(cfg, val_set.classes, ignore, rt)
    lr = cfg.schedule.lr if t == 0 else later_lr(cfg)
    schedule = cfg.schedule.model_copy(update={"lr": lr})
    optimizer = build_optimizer(schedule, model)
    n_epochs, begin = epochs[t], ends[t] - epochs[t]
    lr_schedule = build_lr_schedule(schedule, optimizer, n_epochs * len(train_loader))
    distiller = getattr(model, Distiller.NAME, None)
    first_epoch = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        lr_schedule.load_state_dict(state["lr_schedule"])
        set_rng_state(state["rng"], rt.device)
        accel.load_state_dict(state.get("grad_scaler"))
        first_epoch = state["epoch"] - begin
    elif distiller is not None:     # PLOP's find_median, once per step, before its first epoch
        sweep = DataLoader(train_set, batch_size=bs, sampler=ShardSampler(len(train_set), rt.rank, rt.world_size),
                           **loader_kwargs(cfg.data, rt.device))
        distiller.fit_thresholds(sweep, rt, accel)

    fault = cfg.debug.fault
    fault_armed = fault.kind != "none" and state is None and start_epoch == 0 and rt.rank == fault.rank
    ddp_model = rt.prepare_model(model)
    train_loader, val_loader = rt.prepare_loader(train_loader), rt.prepare_loader(val_loader)
    names, n_first = list(val_set.classes), len(step.first_classes)
    from trainers.loop import train_one_epoch

    metrics: dict[str, float] = {}
    drawn: dict[int, list[int]] = {}
    for e in range(first_epoch, n_epochs):
        epoch = begin + e + 1                  # global, 1-based
        sampler.set_epoch(epoch - 1)
        drawn[epoch] = list(sampler)[:len(train_loader) * bs]
        model.on_epoch_start(e, n_epochs)
        metrics = {"epoch": epoch, "continual/step": t}
        fault_step = fault.step if fault_armed and epoch == fault.epoch else -1
        metrics.update(train_one_epoch(ddp_model, model, train_loader, optimizer, lr_schedule, cfg, rt, fault_step,
                                       accel))
        if not math.isfinite(metrics["train/loss"]):
            raise TrainingDiverged(f"training loss became {metrics['train/loss']} in epoch {epoch} (step {t})")
        last = e + 1 == n_epochs
        if epoch % cfg.schedule.eval_every == 0 or last:
            metrics.update(evaluate(model, val_loader, names, rt, cfg.eval, accel))
            metrics.update(evaluate_sets(model, eval_sets, names, rt, cfg.eval, accel))
            metrics.update(old_new_miou(metrics, names, n_first))
            if last:
                metrics.update({f"val/step_{t}/{k.split('/')[-1]}": metrics[k]
                                for k in ("val/mIoU_old", "val/mIoU_new", "val/mIoU") if k in metrics})
        new_state = {"epoch": epoch, "model": model.checkpoint_state(), "optimizer": optimizer.state_dict(),
                     "lr_schedule": lr_schedule.state_dict(), "rng": rng_state(rt.device),
                     "grad_scaler": accel.state_dict(), "continual": {"step": t, "task": cfg.continual.task}}
        if last and t == len(steps) - 1:
            new_state[RANK_RECORD] = rank_record(rt, model, drawn, start_epoch)
        report(metrics, new_state)
    return model, metrics


def old_new_miou(metrics: dict[str, float], names: list[str], n_first: int) -> dict[str, float]:
    """PLOP's columns from the per-class IoU (percent): val/mIoU_old over step 0's classes (background included,
    PLOP's "0-15"), val/mIoU_new over the later steps' classes (none at step 0); classes absent from prediction and
    target are left out, as val/mIoU leaves them out."""
    iou = torch.tensor([metrics[f"val/IoU/{n}"] for n in names], dtype=torch.float64)
    out = {"val/mIoU_old": float(iou[:n_first].nanmean())}
    if len(names) > n_first:
        out["val/mIoU_new"] = float(iou[n_first:].nanmean())
    return out
