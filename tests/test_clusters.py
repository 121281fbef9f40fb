"""The Ray cluster-launcher files in clusters/ and their README.

Each file passes Ray's own checks (the JSON schema ray/autoscaler/ray-schema.json, then what `ray up` runs
before it touches a cloud: prepare_config + validate_config) and broken copies do not; no file holds a
credential; every node installs torch (pinned, first) and then this project; there are GPU workers, spot ones
where the cloud has them, and an MLflow server on the head; the README's commands exist. All offline: any network
connection fails the test.
"""
from __future__ import annotations

import copy
import json
import re
import shlex
import socket
from pathlib import Path

import click
import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER_DIR = REPO / "clusters"
CLUSTERS = sorted(CLUSTER_DIR.glob("*.yaml"))
README = CLUSTER_DIR / "README.md"
RAY_SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
SHARED = "/mnt/rlseg"          # the shared storage path every file mounts and the README names


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def provider(path: Path) -> str:
    return load(path)["provider"]["type"]


def ray_validate(config: dict) -> dict:
    """Ray's checks, as the probe runs them; returns the prepared config `ray up` would use.
    The raw file goes against the schema first: prepare_config merges the provider defaults and, for the
    local provider, compares max_workers before any schema check, so a wrong type there surfaces as a
    TypeError rather than a ValidationError that names the key."""
    jsonschema.validate(config, RAY_SCHEMA)
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def cloud_files() -> list[Path]:
    return [p for p in CLUSTERS if provider(p) in ("aws", "gcp")]


def worker_types(prepared: dict) -> dict[str, dict]:
    return {k: v for k, v in prepared["available_node_types"].items() if k != prepared["head_node_type"]}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(self, address, *args):
        raise AssertionError(f"test_clusters must stay offline; something connected to {address!r}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


def test_the_three_cluster_files_are_there():
    names = {p.name for p in CLUSTERS}
    assert {"aws-gpu.yaml", "gcp-gpu.yaml", "onprem.yaml"} <= names, names
    assert {provider(p) for p in CLUSTERS} >= {"aws", "gcp", "local"}


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.name)
def test_ray_accepts_the_file(path):
    prepared = ray_validate(load(path))
    assert prepared["head_node_type"] in prepared["available_node_types"]
    if provider(path) != "local":     # local: one internal node type for head and workers alike
        assert worker_types(prepared), f"{path.name}: no worker node type"


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.name)
def test_ray_rejects_an_unknown_top_level_key(path):
    bad = load(path)
    bad["max_worker"] = 4      # a typo of max_workers
    with pytest.raises(jsonschema.ValidationError, match="'max_worker' was unexpected"):
        ray_validate(bad)


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.name)
def test_ray_rejects_a_wrong_type(path):
    bad = load(path)
    bad["max_workers"] = "many"
    with pytest.raises(jsonschema.ValidationError) as e:
        ray_validate(bad)
    assert list(e.value.absolute_path) == ["max_workers"] and e.value.validator == "type"
    # what `ray up` itself runs rejects it too; the local provider trips over the comparison first
    expected = TypeError if provider(path) == "local" else jsonschema.ValidationError
    with pytest.raises(expected):
        validate_config(prepare_config(copy.deepcopy(bad)))


@pytest.mark.parametrize("path", cloud_files(), ids=lambda p: p.name)
def test_ray_rejects_a_typo_inside_a_node_type(path):
    for name in load(path)["available_node_types"]:
        bad = load(path)
        bad["available_node_types"][name]["max_worker"] = 2
        with pytest.raises(jsonschema.ValidationError, match="'max_worker' was unexpected"):
            validate_config(prepare_config(bad))


CREDENTIAL_PATTERNS = {
    "AWS access key id": r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
    "AWS secret key setting": r"(?i)aws_(?:secret_access_key|access_key_id|session_token)",
    "private key block": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    "GCP service-account key": r'(?<!\w)"?private_key(?:_id)?"?\s*:',
    "AWS ARN (account id)": r"\barn:aws[a-z-]*:",
    "12-digit account id": r"(?<![\w.-])\d{12}(?![\w.-])",
}


@pytest.mark.parametrize("path", CLUSTERS + [README], ids=lambda p: p.name)
def test_no_credentials(path):
    text = path.read_text()
    found = {what: m.group(0) for what, pat in CREDENTIAL_PATTERNS.items() if (m := re.search(pat, text))}
    assert not found, f"{path.name}: {found}"
    if path.suffix == ".yaml":
        config = load(path)
        assert "ssh_private_key" not in (config.get("auth") or {}), "use an agent or the commented-out line"
        assert not {"aws_credentials", "gcp_credentials"} & set(config["provider"])
        for node_type in (config.get("available_node_types") or {}).values():
            assert "KeyName" not in node_type["node_config"], "a key pair goes with ssh_private_key"


def readme_install_pins() -> tuple[str, str]:
    """The torch / torchvision pins of the project README's install line (what CI installs)."""
    text = (REPO / "README.md").read_text()
    m = re.search(r"pip install torch==(\S+) torchvision==(\S+) && pip install -e \.", text)
    assert m, "the project README's install line"
    return m.group(1), m.group(2)


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.name)
def test_every_node_installs_torch_first_then_this_project(path):
    prepared = ray_validate(load(path))
    torch_pin, vision_pin = readme_install_pins()
    mounts = {remote: local for remote, local in prepared["file_mounts"].items() if local in (".", "./")}
    assert mounts, f"{path.name}: the project folder is not in file_mounts"
    for key in ("head_setup_commands", "worker_setup_commands"):     # setup_commands merged in by Ray
        script = "\n".join(prepared[key])
        torch_at = script.find(f"pip install torch=={torch_pin} torchvision=={vision_pin}")
        project_at = script.find("pip install -e .")
        assert torch_at >= 0, f"{path.name} {key}: torch {torch_pin} / torchvision {vision_pin} not pinned"
        assert project_at > torch_at, f"{path.name} {key}: the project must come after torch"
        # ... installed from the folder the project was copied to
        assert any(f"cd {remote}" in script[:project_at] for remote in mounts), f"{path.name} {key}"
        # the nodes run the Ray these files were validated with (ray up needs matching versions)
        assert f'"ray[default,tune,train]=={ray.__version__}"' in script[project_at:]


AWS_GPU_FAMILY = re.compile(r"^(g4dn|g5|g6|g6e|gr6|p3|p3dn|p4d|p4de|p5|p5e|p5en)\.")


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.name)
def test_there_are_gpu_workers(path):
    config = load(path)
    kind = config["provider"]["type"]
    if kind == "local":         # no node types: `ray start` on each machine detects its GPUs
        ips = config["provider"]["worker_ips"]
        assert ips and config["provider"]["head_ip"] not in ips
        return
    workers = worker_types(ray_validate(config))
    if kind == "aws":           # CPU and GPU counts come from the instance type
        gpu = [n for n, t in workers.items() if AWS_GPU_FAMILY.match(t["node_config"]["InstanceType"])
               or t["resources"].get("GPU", 0) > 0]
    else:                       # GCP detects nothing: resources must say what the VM has
        gpu = []
        for name, t in workers.items():
            accelerators = t["node_config"].get("guestAccelerators", [])
            attached = sum(a["acceleratorCount"] for a in accelerators)
            if accelerators:
                assert t["resources"].get("GPU") == attached, f"{name}: resources.GPU != guestAccelerators"
                gpu.append(name)
            assert t["resources"].get("GPU", 0) > 0 and t["resources"].get("CPU", 0) > 0, name
    assert gpu, f"{path.name}: no GPU worker type"


def is_spot(kind: str, node_config: dict) -> bool:
    if kind == "aws":
        return node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    scheduling = node_config.get("scheduling", {})
    return scheduling.get("provisioningModel") == "SPOT" or scheduling.get("preemptible") is True


@pytest.mark.parametrize("path", cloud_files(), ids=lambda p: p.name)
def test_cloud_files_have_a_spot_worker_type_and_an_on_demand_head(path):
    prepared = ray_validate(load(path))
    kind = prepared["provider"]["type"]
    assert any(is_spot(kind, t["node_config"]) for t in worker_types(prepared).values()), path.name
    assert not is_spot(kind, prepared["available_node_types"][prepared["head_node_type"]]["node_config"])


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.name)
def test_the_head_runs_an_mlflow_server_on_shared_storage(path):
    prepared = ray_validate(load(path))
    start = prepared["head_start_ray_commands"]
    ray_at = next(i for i, c in enumerate(start) if "ray start --head" in c)
    server = [c for c in start[ray_at + 1:] if "mlflow server" in c]
    assert len(server) == 1, f"{path.name}: one mlflow server command after ray start --head"
    args = shlex.split(server[0].split("mlflow server", 1)[1].split(">", 1)[0])
    opts = dict(zip(args[::2], args[1::2]))
    assert "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in server[0]
    assert opts["--host"] == "0.0.0.0" and opts["--port"] == "5000"
    assert opts["--backend-store-uri"].startswith(f"sqlite:///{SHARED}/")
    assert opts["--artifacts-destination"].startswith(f"{SHARED}/")
    assert "export MLFLOW_TRACKING_URI=http://127.0.0.1:5000" in "\n".join(prepared["head_setup_commands"])
    # the shared storage is mounted (cloud) or required (on-prem) on every node, results folder included
    for key in ("head_setup_commands", "worker_setup_commands"):
        script = "\n".join(prepared[key])
        assert f"mountpoint -q {SHARED}" in script and f"{SHARED}/results" in script, f"{path.name} {key}"


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.name)
def test_the_head_offers_the_train_driver_resource(path):
    """Trial drivers hold a TRAIN_DRIVER unit instead of a CPU when the cluster has one (orchestrator.sweep)."""
    from orchestrator.sweep import DRIVER_RESOURCE

    start = ray_validate(load(path))["head_start_ray_commands"]
    head = next(c for c in start if "ray start --head" in c)
    resources = json.loads(shlex.split(head.split("--resources=", 1)[1])[0])
    assert resources[DRIVER_RESOURCE] >= 1


def test_every_placeholder_is_documented():
    documented = README.read_text()
    for path in CLUSTERS:
        for token in sorted(set(re.findall(r"REPLACE_ME_\w+", path.read_text()))):
            assert token in documented, f"{path.name}: {token} is not explained in clusters/README.md"


def readme_ray_commands() -> tuple[list[str], list[str]]:
    """(full command lines, bare mentions): lines of the README's code blocks and inline code that start
    with `ray `; a mention that names no cluster file (`ray up`) is checked for its subcommand only."""
    text = README.read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = [ln.strip() for b in blocks for ln in b.splitlines() if ln.strip().startswith("ray ")]
    inline = re.findall(r"`(ray [^`]+)`", text)
    full = lines + [c for c in inline if "clusters/" in c]
    bare = [c for c in inline if "clusters/" not in c]
    return [ln.split("  #")[0].strip() for ln in full], bare


def ray_subcommand(tokens: list[str]) -> tuple[click.Command, int]:
    from ray.scripts.scripts import cli

    command, i = cli, 1
    while isinstance(command, click.Group):
        assert tokens[i] in command.commands, f"ray has no command {' '.join(tokens[:i + 1])!r}"
        command, i = command.commands[tokens[i]], i + 1
    return command, i


def test_readme_ray_commands_exist_in_this_ray():
    full, bare = readme_ray_commands()
    assert len(full) >= 8 and bare, "the README walks through ray up / exec / attach / job submit / down"
    for line in full:
        tokens = shlex.split(line)
        command, i = ray_subcommand(tokens)
        command.make_context(" ".join(tokens[:i]), tokens[i:])    # parses options and arguments, runs nothing
        files = [t for t in tokens if t.startswith("clusters/")]
        assert all((REPO / f).is_file() for f in files), line
    for mention in bare:
        ray_subcommand(shlex.split(mention))
    used = {tuple(shlex.split(ln)[1:3]) for ln in full}
    for needed in [("up",), ("down",), ("attach",), ("exec",), ("dashboard",), ("job", "submit")]:
        assert any(u[:len(needed)] == needed for u in used), f"the README shows no `ray {' '.join(needed)}`"


def test_readme_sweeps_resolve_and_write_to_shared_storage(monkeypatch, capsys):
    from orchestrator.cli import sweep_main

    text = README.read_text()
    code = re.findall(r"```bash\n(.*?)```", text, flags=re.S) + re.findall(r"`([^`\n]+)`", text)
    sweeps = [s for c in code for s in re.findall(r"rlseg-sweep [^\"\n]+", c)]
    assert sweeps
    monkeypatch.chdir(REPO)
    for line in sweeps:
        args = shlex.split(line)[1:]
        assert args[args.index("--address") + 1] == "auto", line
        assert args[args.index("--results-dir") + 1].startswith(f"{SHARED}/results"), line
        assert sweep_main([*args, "--dry-run"]) == 0, f"{line}\n{capsys.readouterr().err}"
