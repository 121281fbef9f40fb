"""One Tune trial = one (row, seed) cell, trained on one of two paths (`trial_path`, in trials.parquet and MLflow):

in_process     (`resources.trial_path: auto` with 0 or 1 worker, the default) the Tune trial calls
               trainers.loop.fit in its own process and reports with ray.tune.report / ray.tune.Checkpoint. One
               process per trial instead of four (Tune trial, Train controller, worker, and Train's helper actors,
               each importing torch): measured on 2 cores, ~4 s fixed cost per trial instead of ~22 s
               (benchmarks/overhead.py). Ray Train's own local mode does not work inside Tune (DESIGN.md).
torch_trainer  (2 or more workers, or `trial_path: torch_trainer`) a Ray Train TorchTrainer(train_worker) with a
               ScalingConfig: DDP over `workers` ranks; per-epoch metrics reach Tune through TuneReportCallback.

The guarantees are the same on both paths. A failure is retried up to `resources.max_failures` times from the
latest epoch checkpoint, exactly (every RNG state is in it): a TorchTrainer's workers by Ray Train
(ray.train.FailureConfig), an in-process trial by Tune (the Tuner's FailureConfig restarts the trial, its process
too if it died, and fit resumes from ray.tune.get_checkpoint()). What must not be retried fails at once: a
TrainingDiverged (an exact retry diverges again), and a TorchTrainer whose Ray Train retries are spent. Such a
final error is written to <storage>/final-errors/<trial_id> before the trial raises it, and a restart that finds
the file raises it again at once, so Tune's retries of that trial cost no training.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any

TORCH_TRAINER = "torch_trainer"
IN_PROCESS = "in_process"


FINAL_ERRORS = "final-errors"
ATTEMPTS = "attempts"       # <storage>/attempts/<trial_id>: how many times this sweep session started the trial


class FinalTrialError(RuntimeError):
    """A trial error that a retry cannot mend, raised again by every restart of that trial."""


def trial_path(config: dict[str, Any]) -> str:
    res = config["resources"]
    chosen = res.get("trial_path", "auto")
    if chosen == "auto":
        return TORCH_TRAINER if res["workers"] >= 2 else IN_PROCESS
    return TORCH_TRAINER if chosen == TORCH_TRAINER else IN_PROCESS


def scaling_config(config: dict[str, Any]):
    """resources.* -> ray.train.ScalingConfig: one worker (DDP rank) per `workers`, each holding
    `cpus_per_worker` CPUs and `gpus_per_worker` GPUs (fractional shares a GPU), placed PACK or SPREAD."""
    import ray.train

    res = config["resources"]
    assert res["workers"] >= 1, "workers == 0 trains in the Tune trial itself (trial_path), not in a TorchTrainer"
    per_worker = {"CPU": res["cpus_per_worker"]}
    if res["gpus_per_worker"] > 0:
        per_worker["GPU"] = res["gpus_per_worker"]   # overrides use_gpu's default of one whole GPU per worker
    return ray.train.ScalingConfig(num_workers=res["workers"], use_gpu=res["gpus_per_worker"] > 0,
                                   resources_per_worker=per_worker,
                                   placement_strategy=res.get("placement", "pack").upper())


def run_trial(tune_config: dict[str, Any]) -> None:
    """Tune trainable. tune_config = {"trial": {"row", "row_index", "seed", "config"}, "storage_path": ...}."""
    import ray.tune

    from trainers.loop import TrainingDiverged

    trial = tune_config["trial"]
    config = trial["config"]
    os.environ.pop("MLFLOW_RUN_ID", None)  # an inherited run id would capture anything logged below
    trial_id = ray.tune.get_context().get_trial_id()
    storage = tune_config["storage_path"]
    marker = os.path.join(storage, FINAL_ERRORS, trial_id)
    if os.path.isfile(marker):               # Tune restarted a trial whose error no retry can mend
        with open(marker) as f:
            kind, _, message = f.read().partition(": ")
        raise TrainingDiverged(message) if kind == TrainingDiverged.__name__ else FinalTrialError(f"{kind}: {message}")
    on_torch_trainer = trial_path(config) == TORCH_TRAINER
    attempt = _count_attempt(storage, trial_id)          # 0 the first time
    retries = config["resources"]["max_failures"]
    if not on_torch_trainer and attempt > retries:      # the last attempt's process died (no exception to see)
        error = FinalTrialError(f"the trial's process ended unexpectedly and its resources.max_failures={retries} "
                                f"retries are spent")
        _record_final(marker, error)
        raise error
    try:
        if on_torch_trainer:
            _torch_trainer(config, storage, trial_id)
        else:
            _in_process(config)
    except Exception as e:
        # Ray Train retried a TorchTrainer already; in process, Tune retries until this trial's own max_failures
        if on_torch_trainer or isinstance(e, TrainingDiverged) or attempt >= retries:
            _record_final(marker, e)
        raise


def _count_attempt(storage: str, trial_id: str) -> int:
    """How many times this sweep session started the trial before (the sweep clears the counts when it starts)."""
    path = os.path.join(storage, ATTEMPTS, trial_id)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    before = os.path.getsize(path) if os.path.isfile(path) else 0
    with open(path, "a") as f:
        f.write(".")
    return before


def _record_final(marker: str, error: Exception) -> None:
    """Record `error` as the trial's final one: every restart of the trial raises it again at once."""
    os.makedirs(os.path.dirname(marker), exist_ok=True)
    with open(marker, "w") as f:
        f.write(f"{type(error).__name__}: {error}")


def _torch_trainer(config: dict[str, Any], storage_path: str, trial_id: str) -> None:
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from trainers.loop import DIVERGED, TrainingDiverged, train_worker

    class EpochsToTune(TuneReportCallback):
        """Ray Train's reports to Tune, except a divergence (train_worker): it is no epoch and lacks the metric
        that a search or scheduler expects (Tune stops the whole run on such a result); the trial raises it."""

        def after_report(self, run_context, metrics, checkpoint):
            if DIVERGED not in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    trainer = TorchTrainer(
        train_worker,
        train_loop_config=config,
        scaling_config=scaling_config(config),
        run_config=ray.train.RunConfig(
            name=f"train-{trial_id}",          # stable per trial: a restored trial finds its checkpoints
            storage_path=storage_path,
            callbacks=[EpochsToTune()],
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            # a failed worker group restarts from the latest checkpoint (train_worker reads it)
            failure_config=ray.train.FailureConfig(max_failures=config["resources"]["max_failures"]),
        ),
    )
    result = trainer.fit()   # raises TrainingFailedError once max_failures retries failed too: the trial errors
    if (result.metrics or {}).get(DIVERGED):   # not retried (train_worker): the trial errors with the reason
        raise TrainingDiverged(result.metrics[DIVERGED])


def _in_process(config: dict[str, Any]) -> None:
    import ray.tune

    from trainers.loop import fit, read_checkpoint, write_checkpoint

    def report(metrics: dict[str, float], state: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory() as d:
            write_checkpoint(d, state, rank=0)
            ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(d))

    state = None
    checkpoint = ray.tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = read_checkpoint(d)
    fit(config, report, state=state)
