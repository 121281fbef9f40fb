"""A sweep's local Ray tells its own processes where its State API is (orchestrator.sweep.start_local_ray).

Ray Train 2.60's placement-group cleaner asks the State API, with no address, whether a trial's controller is alive.
Without an address the State API looks for running GCS processes and fails with "Found multiple active Ray
instances" when the machine runs another Ray; the placement groups of trials that ASHA stopped were then never
freed and later trials waited for ever. Here another Ray instance runs while the sweep's Ray answers that question
from one of its worker processes, as the cleaner does."""
import os

import pytest

from orchestrator.sweep import API_SERVER_ENV, _restore_env, start_local_ray
from orchestrator.localray import _warn_other_ray_instances


@pytest.fixture
def other_ray_instance():
    """A second Ray on this machine (its own GCS and raylet), as a concurrent sweep or test cluster would be."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 100 * 2**20})
    try:
        yield cluster
    finally:
        cluster.shutdown()


@pytest.mark.integration
def test_state_api_in_a_sweeps_workers_finds_its_own_ray_beside_another(other_ray_instance, capfd):
    import ray

    previous = os.environ.get(API_SERVER_ENV)
    try:
        start_local_ray(driver_slots=1, verbose=0)
        url = os.environ[API_SERVER_ENV]
        assert url.startswith("http://127.0.0.1:")                     # loopback only
        assert "not start on its own port" not in capfd.readouterr().err   # its dashboard is on that port
        assert ray.get_runtime_context().gcs_address != other_ray_instance.address

        @ray.remote(num_cpus=0)
        class Controller:
            def ping(self) -> int:
                return 1

        @ray.remote(num_cpus=0)
        def actor_state_seen_from_a_worker(actor_id: str):
            """What Ray Train's cleaner calls (ray.train.v2._internal.state.util.is_actor_alive): no address."""
            from ray.util.state import get_actor

            state = get_actor(actor_id, timeout=20)
            return state.state if state else None

        controller = Controller.remote()
        ray.get(controller.ping.remote())
        assert ray.get(actor_state_seen_from_a_worker.remote(controller._actor_id.hex()), timeout=120) == "ALIVE"
    finally:
        ray.shutdown()
        _restore_env(API_SERVER_ENV, previous)
    assert os.environ.get(API_SERVER_ENV) == previous


def test_start_local_ray_restores_the_environment_when_ray_does_not_start(monkeypatch):
    import ray

    def refuse(**kwargs):
        raise RuntimeError("no Ray here")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setenv(API_SERVER_ENV, "http://127.0.0.1:1")
    with pytest.raises(RuntimeError, match="no Ray here"):
        start_local_ray(driver_slots=1, verbose=0)
    assert os.environ[API_SERVER_ENV] == "http://127.0.0.1:1"


def test_when_rays_gcs_finder_cannot_run_one_line_names_the_error(monkeypatch, capsys):
    """The check for other Ray instances uses a private Ray helper: if it moved (a Ray upgrade, here removed), one
    line says so and names the error, instead of a check that quietly stops checking."""
    import ray._private.services

    monkeypatch.delattr(ray._private.services, "find_gcs_addresses")
    _warn_other_ray_instances()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: could not look for other Ray instances"), err
    assert "ImportError" in err and "find_gcs_addresses" in err and "skipped" in err
