"""Nothing waits silently: a Tune callback that watches Ray's placement groups while a sweep runs.

Every trial asks Ray for a placement group: Tune's for the trial itself, Ray Train's for a TorchTrainer's workers.
One that cannot be placed on the cluster's nodes even when they are idle waits for nodes that may never come (on a
local Ray: never). After NOTICE_S the watch prints one line naming the trial, what it asks for, what the cluster
has and Ray's scheduling state; after `--pending-timeout` it stops the sweep as Ctrl-C does (Tune saves the
experiment, so `--resume` continues the same run folder) and the command exits 2 with that line.
A placement group that would fit idle nodes only waits for running trials to end, and is not reported.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Any

from orchestrator import console
from orchestrator.preflight import CPU, GPU, describe_have, fits, trial_bundles, _n

NOTICE_S = 10.0        # a placement group that cannot be placed is reported after this long
POLL_S = 1.0           # how often the placement groups are read (a GCS call)
GONE_S = 5.0           # Ray Train recreates its workers' placement group after a start timeout: same wait
LOCAL_TIMEOUT_S = 120.0   # --pending-timeout's default on a local Ray (no autoscaler will add a node)

# Live watches by Tune experiment name (as recorder.RECORDERS: a restored Tuner gets the pickled callback back).
WATCHES: dict[str, "PendingWatch"] = {}


class PendingWatch:
    """Reads Ray's placement-group table from the Tune loop (on_step_begin) and reports what cannot be placed."""

    def __init__(self, timeout_s: float | None, notice_s: float = NOTICE_S, out=None):
        self.timeout_s, self.notice_s = timeout_s, notice_s
        self.out = out
        self.first_seen: dict[str, float] = {}
        self.last_seen: dict[str, float] = {}
        self.reported: set[str] = set()
        self.stalled: str | None = None     # the line the sweep ended with (pending timeout)
        self._next_poll = 0.0

    def step(self, trials: list[Any]) -> None:
        now = time.monotonic()
        if self.stalled is not None or now < self._next_poll:
            return
        self._next_poll = now + POLL_S
        from ray.util import placement_group_table

        from orchestrator.preflight import cluster_nodes

        nodes = cluster_nodes()
        waiting: dict[str, dict[str, Any]] = {}
        for pg in placement_group_table().values():
            if pg.get("state") != "PENDING":
                continue
            bundles = [{k: float(v) for k, v in b.items()} for b in pg["bundles"].values()]
            if fits([(b, 1) for b in bundles], nodes):     # queued behind running trials: it will be placed when they end
                continue
            key = json.dumps([sorted(b.items()) for b in bundles] + [pg.get("strategy")])
            waiting[key] = {"bundles": bundles, "strategy": pg.get("strategy"),
                            "state": (pg.get("stats") or {}).get("scheduling_state")}
            self.first_seen.setdefault(key, now)
            self.last_seen[key] = now
        for key in [k for k, t in self.last_seen.items() if now - t > GONE_S]:
            del self.first_seen[key], self.last_seen[key]
        notice = min(self.notice_s, self.timeout_s if self.timeout_s is not None else self.notice_s)
        for key, t0 in sorted(self.first_seen.items(), key=lambda kv: kv[1]):
            if key not in waiting:
                continue
            waited = now - t0
            if waited < notice:
                continue
            line = self.describe(waiting[key], waited, nodes, trials)
            if key not in self.reported:
                self.reported.add(key)
                print(line, file=self.out or console.err(), flush=True)
            if self.timeout_s is not None and waited >= self.timeout_s:
                self.stalled = f"--pending-timeout {_n(self.timeout_s)} s: {line}"
                _stop_tune()
                return

    @staticmethod
    def describe(pg: dict[str, Any], waited: float, nodes: list[dict[str, float]], trials: list[Any]) -> str:
        bundles = pg["bundles"]
        names = [_trial_label(t) for t in trials if t.status in ("PENDING", "RUNNING")
                 and _asks(t) == sorted(map(_key, bundles))]
        who = (f"{names[0]!r}" + (f" (and {len(names) - 1} more)" if len(names) > 1 else "")) if names else "a trial"
        ask = _describe_bundles(bundles)
        state = f", Ray: {pg['state']}" if pg.get("state") else ""
        return (f"waiting {waited:.0f} s for resources: {who} asks {ask} ({pg['strategy']}{state}), but the cluster "
                f"has {describe_have(nodes)}; lower resources.* or add nodes")


def _key(b: dict[str, float]) -> str:
    return json.dumps(sorted((k, float(v)) for k, v in b.items() if v))


def _asks(trial) -> list[str]:
    try:
        config = trial.config["trial"]["config"]
    except (KeyError, TypeError):
        return []
    return sorted(_key(b) for b, n in trial_bundles(config) for _ in range(min(n, 1024)))


def _trial_label(trial) -> str:
    t = trial.config.get("trial", {})
    return f"{t.get('row', trial.trial_id)} | seed {t.get('seed', '?')}"


def _describe_bundles(bundles: list[dict[str, float]]) -> str:
    def one(b):
        parts = [f"{_n(b[k])} {k}" for k in (CPU, GPU) if b.get(k)]
        parts += [f"{_n(v)} {k}" for k, v in sorted(b.items()) if k not in (CPU, GPU) and v]
        return "{" + ", ".join(parts) + "}"
    shapes = [one(b) for b in bundles]
    if len(set(shapes)) == 1:
        return f"{len(shapes)} x {shapes[0]}" if len(shapes) > 1 else shapes[0]
    return " + ".join(shapes)


def _stop_tune() -> None:
    """Stop the Tune run as Ctrl-C does: Tune's own SIGINT/SIGUSR1 handler saves the experiment (resumable) and
    Tuner.fit returns. Tune installs it only when it runs in the main thread; elsewhere the callback raises."""
    if threading.current_thread() is threading.main_thread() and callable(signal.getsignal(signal.SIGUSR1)):
        os.kill(os.getpid(), signal.SIGUSR1)
        return
    raise PendingTimeout("pending timeout")


class PendingTimeout(RuntimeError):
    pass


def watch_callback(watch: PendingWatch, key: str):
    """A ray.tune.Callback that carries only `key` and steps this process's watch of that name."""
    import ray.tune

    from orchestrator import pending as module   # by reference, as recorder.as_tune_callback

    WATCHES[key] = watch

    class _Watch(ray.tune.Callback):
        def __init__(self, key: str):
            self.key = key

        def on_step_begin(self, iteration, trials, **info):
            w = module.WATCHES.get(self.key)
            if w is not None:
                w.step(trials)

    return _Watch(key)
