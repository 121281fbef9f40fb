"""The plan check: what would make a sweep hang or fail later, found before Ray starts (and in --dry-run).

Each problem is a SpecError whose one line names where the value came from (the spec file and row, or the command
line), the key path and the numbers: a cell's resources against the machine (or the cluster) it will run on, data
roots and their layout (the dataset's own constructor says which folder is missing), pretrained weight files, the
batch size against a rank's share of the training data, the search scheduler against the schedule, the spec's metric
against what the trials report, and the MLflow store. Nothing here starts Ray or writes a file.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from orchestrator.spec import Plan, SearchPlan, SpecError

# Datasets generated in memory from (seed, index): their length is their configured size (data.train_size), and
# building one renders every image, so only a one-image copy is built (for its class names).
GENERATED = ("synthetic_surgical", "synthetic_cod", "synthetic_sod")
SMALL = {"train_size": 1, "val_size": 1, "image_size": 16}    # a generated dataset's copy that renders fast
# Resource names as Ray counts them, from resources.* of a config.
CPU, GPU = "CPU", "GPU"


# --------------------------------------------------------------------------- resources


def trial_bundles(config: dict[str, Any]) -> list[tuple[dict[str, float], int]]:
    """What a cell asks Ray for, as (placement-group bundle, how many): one per Ray Train worker (a TorchTrainer
    trial; its Tune driver holds the sweep's own TRAIN_DRIVER unit or half a CPU, see sweep.trial_resources), or the
    Tune trial itself (an in-process trial, workers = 0)."""
    res = config["resources"]
    bundle = {CPU: float(res["cpus_per_worker"])}
    if res["gpus_per_worker"]:
        bundle[GPU] = float(res["gpus_per_worker"])
    return [(bundle, max(res["workers"], 1))]


def fits(bundles: list[tuple[dict[str, float], int]], nodes: list[dict[str, float]]) -> bool:
    """Whether the bundles can all be placed at once on nodes with these total resources (first fit, largest bundle
    first: PACK and SPREAD are both best effort in Ray, so any placement counts)."""
    free = [dict(n) for n in nodes]
    for bundle, count in sorted(bundles, key=lambda bc: sorted(bc[0].items(), reverse=True), reverse=True):
        wanted = {k: v for k, v in bundle.items() if v > 0}
        for node in free:
            if count <= 0:
                break
            ratio = min(((node.get(k, 0) + 1e-9) / v for k, v in wanted.items()), default=math.inf)
            placed = count if ratio >= count else max(int(ratio), 0)   # a ratio may overflow an int (5e-324 CPUs)
            for k, v in wanted.items():
                node[k] = node.get(k, 0) - placed * v
            count -= placed
        if count > 0:
            return False
    return True


def total(bundles: list[tuple[dict[str, float], int]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for bundle, count in bundles:
        for k, v in bundle.items():
            out[k] = out.get(k, 0) + v * count
    return out


def _n(v: float) -> str:
    return f"{v:g}"


def describe_ask(config: dict[str, Any]) -> str:
    """'resources.workers=3 x resources.cpus_per_worker=1 = 3 CPUs' (+ GPUs)."""
    res = config["resources"]
    w = max(res["workers"], 1)
    keys = (f"resources.workers={res['workers']} x " if res["workers"] >= 1 else "resources.workers=0 (in-process): ")
    text = f"{keys}resources.cpus_per_worker={_n(res['cpus_per_worker'])}"
    if res["gpus_per_worker"]:
        text += f" + resources.gpus_per_worker={_n(res['gpus_per_worker'])}"
    text += f" = {_n(w * res['cpus_per_worker'])} CPUs"
    if res["gpus_per_worker"]:
        text += f" and {_n(w * res['gpus_per_worker'])} GPUs"
    return text + " per trial"


def describe_have(nodes: list[dict[str, float]]) -> str:
    t = total([(n, 1) for n in nodes])
    where = "" if len(nodes) == 1 else f" on {len(nodes)} nodes (at most {_n(max(n.get(CPU, 0) for n in nodes))} CPUs "\
                                          f"and {_n(max(n.get(GPU, 0) for n in nodes))} GPUs on one)"
    return f"{_n(t.get(CPU, 0))} CPUs and {_n(t.get(GPU, 0))} GPUs{where}"


def local_nodes() -> list[dict[str, float]]:
    """This machine as a local Ray will count it (Ray's own detection: cgroup CPU limits, CUDA_VISIBLE_DEVICES)."""
    from ray._private.accelerators import get_accelerator_manager_for_resource
    from ray._private.utils import get_num_cpus

    return [{CPU: float(get_num_cpus()), GPU: float(get_accelerator_manager_for_resource(GPU)
                                                     .get_current_node_num_accelerators())}]


def check_local_resources(cells: list[tuple[str, dict[str, Any]]], nodes: list[dict[str, float]]) -> None:
    for where, config in cells:
        if not fits(trial_bundles(config), nodes):
            raise SpecError(f"{where}: {describe_ask(config)}, but this machine has {describe_have(nodes)} "
                            f"(a local Ray; lower resources.*, or run on a cluster with --address)")


def cluster_nodes() -> list[dict[str, float]]:
    """The alive nodes of the Ray this process is connected to, with their total resources."""
    import ray

    return [{k: float(v) for k, v in n["Resources"].items()} for n in ray.nodes() if n.get("Alive")]


def autoscaler_max() -> dict[str, float] | None:
    """What the cluster's autoscaler can reach at most (its cluster config), or None where Ray cannot tell. Where
    Ray's private API for it fails (it moved in a Ray upgrade, or the GCS does not answer), one line on stderr
    names the error."""
    try:
        from ray._private.state import state

        found = state.get_max_resources_from_cluster_config()
    except Exception as e:   # a private API: say that the check stops checking, and why
        print(f"warning: could not read what the cluster's autoscaler can reach "
              f"(ray._private.state.get_max_resources_from_cluster_config): {_error_text(e)}; the check of trials "
              f"against its node types is skipped", file=sys.stderr, flush=True)
        return None
    return {k: float(v) for k, v in found.items()} if found else None


def _error_text(e: BaseException) -> str:
    """An exception in one line: 'AttributeError: ...'."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}{': ' + text if text else ''}"


def check_cluster_resources(cells: list[tuple[str, dict[str, Any]]], address: str) -> list[str]:
    """Against the cluster joined at `address`: a cell that fits neither its nodes now nor what its autoscaler can
    reach is an error; where Ray cannot tell what the autoscaler can add, a warning line (returned)."""
    nodes, reachable = cluster_nodes(), autoscaler_max()
    warnings = []
    for where, config in cells:
        if fits(trial_bundles(config), nodes):
            continue
        asked = total(trial_bundles(config))
        if reachable is not None:
            if all(reachable.get(k, 0) + 1e-9 >= v for k, v in asked.items()):
                continue
            raise SpecError(f"{where}: {describe_ask(config)}, but the cluster at {address} has "
                            f"{describe_have(nodes)} and its autoscaler reaches at most "
                            f"{_n(reachable.get(CPU, 0))} CPUs and {_n(reachable.get(GPU, 0))} GPUs")
        warnings.append(f"warning: {where}: {describe_ask(config)}; the cluster at {address} has "
                        f"{describe_have(nodes)} now and Ray cannot tell what its autoscaler can add: the trial waits "
                        f"until nodes join (--pending-timeout S ends the sweep then)")
    return warnings


# --------------------------------------------------------------------------- data, weights, batch size, metric


class _Datasets:
    """Each distinct data config built once: its training length (None: not known without rendering it) and class
    names (a function: a generated dataset renders one small image for them, only when they are asked for), or the
    error of its layout."""

    def __init__(self):
        self.cache: dict[str, tuple[int | None, Any] | str] = {}

    def get(self, data: dict[str, Any]) -> tuple[int | None, Any]:
        key = json.dumps(data, sort_keys=True)
        if key not in self.cache:
            try:
                self.cache[key] = self._build(data)
            except (FileNotFoundError, NotADirectoryError, ValueError, OSError) as e:
                # the dataset's own message: 'data.root: /x has no VOCdevkit/VOC2012 folder (expected ...)'
                self.cache[key] = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        found = self.cache[key]
        if isinstance(found, str):
            raise _DataProblem(found)
        return found

    @staticmethod
    def _build(data: dict[str, Any]) -> tuple[int | None, Any]:
        from trainers.config import DataConfig
        from trainers.data import build_dataset

        cfg = DataConfig.model_validate(data)
        if cfg.name in GENERATED:
            small = cfg.model_copy(update=SMALL)
            return cfg.train_size, lambda: list(build_dataset(small, "val").classes)
        train = build_dataset(cfg, "train")          # disk datasets read their lists, not their images
        build_dataset(cfg, "val")
        return len(train), lambda: list(train.classes)


class _DataProblem(Exception):
    pass


def check_pretrained(where: str, config: dict[str, Any]) -> None:
    """model.pretrained that names a file (a path, or a checkpoint suffix) must be one; a tag (tv_in1k, openai) is the
    library's to resolve (online)."""
    from trainers.models.clip import _CHECKPOINT_SUFFIXES

    p = config["model"]["pretrained"]
    if p and (os.sep in p or p.endswith(_CHECKPOINT_SUFFIXES)) and not os.path.isfile(os.path.expanduser(p)):
        raise SpecError(f"{where}: model.pretrained: no checkpoint file at {p} (expected a weights file, or a "
                        f"pretrained tag of the encoder's library)")


def check_batch(where: str, config: dict[str, Any], n_train: int | None) -> None:
    """trainers.loop drops the last partial batch of each rank's shard (DistributedSampler: ceil(n / ranks))."""
    if n_train is None:
        return
    ranks = max(config["resources"]["workers"], 1)
    share = math.ceil(n_train / ranks)
    bs = config["schedule"]["batch_size"]
    if bs > share:
        raise SpecError(f"{where}: schedule.batch_size: {bs} is larger than a rank's share of the training data "
                        f"({n_train} images of {config['data']['name']} over {ranks} rank(s) = {share}); "
                        f"expected at most {share}")
    fault = config["debug"]["fault"]
    steps = share // bs
    if fault["kind"] != "none" and fault["step"] >= steps:
        raise SpecError(f"{where}: debug.fault.step: {fault['step']} but an epoch has only {steps} steps "
                        f"({share} images per rank / schedule.batch_size {bs})")


# a continual task sequence (trainers/continual) reports these beside val/mIoU (all classes seen): the classes of step
# 0 and those of the later steps, after each step's last epoch
CONTINUAL_METRICS = ("val/mIoU_old", "val/mIoU_new")


def reported_val_metrics(classes: list[str], method: str | None = None, eval_labels=(),
                         continual: bool = False) -> list[str]:
    """What trainers.evaluation reports at each evaluation: the method's own metrics where it names them
    (SegMethod.VAL_METRICS), else the segmentation ones for these classes, and for each set of eval.datasets
    (eval_labels) the same under val/<label>/ (its per-class IoUs name the trial classes it shares); a continual
    task sequence adds CONTINUAL_METRICS."""
    if method is not None:
        from trainers.registry import METHODS

        own = METHODS.get(method).build.VAL_METRICS
        if own is not None:
            return list(own)
    own_set = ["mIoU", "pixel_acc"] + [f"IoU/{c}" for c in classes]
    return ([f"val/{m}" for m in own_set] + [f"val/{label}/{m}" for label in eval_labels for m in own_set]
            + (list(CONTINUAL_METRICS) if continual else []))


def check_metric(where: str, metric: str, class_names, data_name: str, method: str | None = None,
                 eval_labels=(), continual: bool = False, key: str = "metric.name") -> None:
    """A val/ metric (at `key` of the spec: metric.name, columns[i].metric) must be one evaluation reports for this
    dataset, method, eval.datasets labels (eval_labels) and continual setting. (train/ metrics are the method's
    step outputs, which no method declares ahead of training, so they are not checked here.)"""
    if not metric.startswith("val/"):
        return
    from trainers.registry import METHODS

    if method is not None and METHODS.get(method).build.VAL_METRICS is not None:
        if metric not in reported_val_metrics([], method):
            raise SpecError(f"{where}: {key}: no trial reports {metric!r} (method {method} reports "
                            f"{', '.join(reported_val_metrics([], method))})")
        return
    if metric in reported_val_metrics([], eval_labels=eval_labels, continual=continual):
        return
    classes = class_names()
    if metric not in reported_val_metrics(classes, eval_labels=eval_labels, continual=continual):
        sets = f"; and the same under val/<label>/ for eval.datasets {', '.join(eval_labels)}" if eval_labels else ""
        steps = f"; {' and '.join(CONTINUAL_METRICS)} for its continual task" if continual else \
            (f"; {' and '.join(CONTINUAL_METRICS)} only with a continual.task" if metric in CONTINUAL_METRICS else "")
        raise SpecError(f"{where}: {key}: no trial reports {metric!r} (evaluation reports val/mIoU, "
                        f"val/pixel_acc and val/IoU/<class> for the classes of {data_name}: {', '.join(classes)}"
                        f"{sets}{steps})")


def check_eval_sets(where: str, config: dict[str, Any], trial_classes: list[str]) -> None:
    """Each eval.datasets set is read here as its trials will read it (its val split: layout, root) and shares a
    class with the trial (trainers.evaluation.class_mapping), so neither fails only once trials start."""
    from trainers.config import Config
    from trainers.data import build_dataset
    from trainers.evaluation import class_mapping

    cfg = Config.model_validate(config)
    for label, spec in cfg.eval.datasets.items():
        data_cfg = cfg.eval_set_data(label)
        if data_cfg.name in GENERATED:        # rendered on demand: a small copy has the same classes
            data_cfg = data_cfg.model_copy(update=SMALL)
        try:
            dataset = build_dataset(data_cfg, "val")
            class_mapping(list(dataset.classes), list(trial_classes), spec.class_map, 255, dataset.ignore_index,
                          f"eval.datasets.{label}")
        except (FileNotFoundError, NotADirectoryError, ValueError, OSError) as e:
            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            prefix = "" if text.startswith(f"eval.datasets.{label}") else f"eval.datasets.{label}: "
            raise SpecError(f"{where}: {prefix}{text}") from None


# --------------------------------------------------------------------------- the search scheduler, MLflow


def check_scheduler(plan: SearchPlan) -> None:
    """ASHA over epochs: max_t is the epochs of a search trial, and the grace period must not exceed it; then the
    scheduler and the sampler are built as the search will build them, so a setting they reject is one line here."""
    spec, sched = plan.spec, plan.spec.scheduler
    if sched.kind == "asha" and sched.grace_period > plan.epochs:
        raise SpecError(f"{plan.path}: scheduler.grace_period: {sched.grace_period} is more than schedule.epochs = "
                        f"{plan.epochs} (ASHA's max_t: the epochs of a search trial); expected grace_period <= "
                        f"{plan.epochs}, or scheduler: none")
    import optuna

    from orchestrator.search import make_scheduler, make_searcher

    make_scheduler(plan)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)    # "A new study created in memory": not the check's output
    try:
        make_searcher(plan)
    finally:
        optuna.logging.set_verbosity(verbosity)


def check_tracking(results_root: Path) -> None:
    """The MLflow tracking URI names a store MLflow knows (checked by its scheme, without connecting or writing)."""
    from orchestrator.tracking import default_tracking_uri

    uri = default_tracking_uri(results_root)
    try:
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry

        _tracking_store_registry.get_store_builder(uri)
    except ImportError:   # a private registry: if it moved, MLflow reports the URI itself when the sweep connects
        return
    except Exception as e:
        where = "MLFLOW_TRACKING_URI (environment)" if os.environ.get("MLFLOW_TRACKING_URI") else "results dir"
        raise SpecError(f"{where}: {uri!r}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}")


# --------------------------------------------------------------------------- the whole plan


def plan_cells(plan: Plan | SearchPlan) -> list[tuple[str, dict[str, Any]]]:
    """(where, config) of every distinct config the command trains: an ablation's rows; a search's trial config and
    the base config its confirmation reruns."""
    if isinstance(plan, SearchPlan):
        return [(f"{plan.path}: search trials", plan.search_config), (f"{plan.path}: base", plan.base_config)]
    return [(f"{plan.path}: rows[{r.index}] ({r.name})", r.config) for r in plan.rows]


def check_plan(plan: Plan | SearchPlan, *, results_root: Path, address: str | None) -> list[str]:
    """Every check that needs no running Ray; raises SpecError for the first problem. On a local Ray (no address)
    the cells' resources are checked against this machine; with an address, session() checks them against the
    cluster once joined (check_cluster_resources). Returns warning lines."""
    cells = plan_cells(plan)
    datasets = _Datasets()
    # the spec metric, and each table column's (orchestrator.columns)
    metrics = [(plan.spec.metric.name, "metric.name")] + [
        (c["metric"], f"columns ({c['name']}).metric") for c in getattr(plan, "columns", [])]
    on_disk_elsewhere = False
    for where, config in cells:
        def check(class_names):
            for metric, key in metrics:
                if class_names is None and "/IoU/" in metric:   # val/IoU/<class>, val/<label>/IoU/<class>: unknown
                    continue
                check_metric(f"{plan.path}", metric, class_names or (lambda: []), config["data"]["name"],
                             config["method"]["name"], list(config["eval"]["datasets"]),
                             config["continual"]["task"] is not None, key)

        if address and config["data"]["name"] not in GENERATED:
            # the trials read data and weights on the cluster's nodes, not here: a dataset's layout and weight files
            # are checked when its trials start there; the metrics too, unless they name a class (unknown here)
            on_disk_elsewhere = True
            check(None)
            continue
        try:
            n_train, class_names = datasets.get(config["data"])
        except _DataProblem as e:
            raise SpecError(f"{where}: {e}") from None
        check_pretrained(where, config)
        check_batch(where, config, n_train)
        check(class_names)
        if config["eval"]["datasets"]:
            check_eval_sets(where, config, class_names())
    if isinstance(plan, SearchPlan):
        check_scheduler(plan)
    if not address:
        check_local_resources(cells, local_nodes())
    check_tracking(results_root)
    if not address:
        return []
    notes = [f"note: resources are checked against the cluster at {address} when the sweep joins it"]
    if on_disk_elsewhere:
        notes.append("note: data roots and weight files are read on the cluster's nodes: their trials check them there")
    return notes
