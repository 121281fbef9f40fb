"""A sweep's own local Ray: ray.init of a new instance whose processes know where its State API is."""
from __future__ import annotations

import os
import sys

DRIVER_RESOURCE = "TRAIN_DRIVER"

API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"


def start_local_ray(driver_slots: int, verbose: int) -> None:
    """ray.init of a local Ray whose own processes know where its State API is. It leaves RAY_API_SERVER_ADDRESS
    set: the caller restores it after ray.shutdown.

    Ray Train 2.60 gives each trial a detached placement-group cleaner that asks the State API, with no address,
    whether the trial's controller is alive. Without an address the State API looks for running GCS processes
    and fails ("Found multiple active Ray instances") whenever the machine runs another Ray (a second sweep, a
    test cluster): the placement groups of trials Tune stops early (ASHA) or interrupts were then never freed and
    later trials waited for ever. So the dashboard (the State API's server) starts on a loopback port chosen here,
    and its URL goes into RAY_API_SERVER_ADDRESS before ray.init, which Ray's processes inherit and which the
    State API takes before anything else."""
    import ray

    port = _free_loopback_port()
    previous = os.environ.get(API_SERVER_ENV)
    os.environ[API_SERVER_ENV] = f"http://127.0.0.1:{port}"
    try:
        # "local": a new instance even where `ray start` left its address in /tmp/ray (ray.init's default joins it)
        context = ray.init(address="local", resources={DRIVER_RESOURCE: driver_slots}, log_to_driver=verbose > 2,
                           dashboard_host="127.0.0.1", dashboard_port=port)
    except BaseException:
        _restore_env(API_SERVER_ENV, previous)
        raise
    if getattr(context, "dashboard_url", None) != f"127.0.0.1:{port}":   # the port was taken meanwhile, or no
        _warn_other_ray_instances()                                        # dashboard: the old hazard is back


def _free_loopback_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _restore_env(key: str, previous: str | None) -> None:
    if previous is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = previous


def _warn_other_ray_instances() -> None:
    """Without RAY_API_SERVER_ADDRESS pointing at this Ray's own dashboard (start_local_ray), Ray Train's
    placement-group cleaner cannot tell several local Ray instances apart; say so when there are others."""
    try:
        from ray._private.services import find_gcs_addresses

        others = find_gcs_addresses()
    except Exception as e:   # a private helper (it may move in a Ray upgrade): say that the check stops checking
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"warning: could not look for other Ray instances on this machine "
              f"(ray._private.services.find_gcs_addresses): {type(e).__name__}{': ' + text if text else ''}; the "
              "check that Ray Train can free the resources of stopped trials is skipped", file=sys.stderr, flush=True)
        return
    if len(others) > 1:   # this sweep's own Ray is one of them
        print(f"warning: {len(others) - 1} other Ray instance(s) run on this machine and this Ray's dashboard did "
              "not start on its own port: Ray Train may not release the resources of trials stopped early (ASHA) "
              "or interrupted, and later trials may wait for ever. Run one sweep at a time, or run sweeps on one "
              "`ray start` cluster with --address.", file=sys.stderr, flush=True)
