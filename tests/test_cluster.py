"""A real 2-node Ray cluster on loopback (`ray start`, via tools/local_cluster.sh), a sweep
submitted through the Jobs API, trials spread over both nodes; the cluster is stopped even
when the test fails, and only its own processes."""

import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from raymeta.results import query

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "local_cluster.sh"


@pytest.mark.ray
def test_two_node_cluster_runs_a_submitted_sweep_on_both_nodes(tmp_path):
    cluster_dir = f"/tmp/rmc-{os.getpid()}"  # short: Ray's unix sockets live under it
    env = {**os.environ, "RAYMETA_CLUSTER_DIR": cluster_dir, "RAYMETA_CLUSTER_PORT": "6391",
           "RAYMETA_DASHBOARD_PORT": "8276", "RAYMETA_PORT_BASE": "25000",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONWARNINGS": "ignore"}
    env.pop("RAY_ADDRESS", None)
    (tmp_path / "sweep.yaml").write_text(textwrap.dedent(f"""
        name: twonode
        store: {tmp_path / 'out'}
        base:
          dataset: {{name: digits}}
          model: {{name: mlp, options: {{hidden: [32]}}}}
          train: {{epochs: 3, batch_size: 64}}
        grid:
          seed: [0, 1, 2, 3]
        resources: {{cpus_per_trial: 1}}
        """))
    try:
        subprocess.run([str(SCRIPT), "start", "1"], env=env, check=True, timeout=180)
        job = subprocess.run(
            ["ray", "job", "submit", "--address", "http://127.0.0.1:8276", "--",
             sys.executable, "-m", "raymeta.cli", "sweep", str(tmp_path / "sweep.yaml"),
             "--address", "auto"],
            env=env, capture_output=True, text=True, timeout=400)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "4 completed, 0 failed" in job.stdout
    finally:
        subprocess.run([str(SCRIPT), "stop"], env=env, timeout=120)
    trials = query.load(str(tmp_path / "out"), "trials", "twonode")
    assert len(trials) == 4 and (trials["status"] == "completed").all()
    # where each trial ran is recorded; which node Tune picks is timing (under load all four
    # can run on the head), so spreading over nodes is checked where it is forced:
    # tests/test_node_loss.py puts one worker of a trial on each node
    assert trials["ray_node_id"].str.len_chars().min() > 0
    leftover = subprocess.run(["pgrep", "-f", cluster_dir], capture_output=True, text=True)
    assert leftover.stdout.strip() == ""
    # the head's Ray client server has no cluster folder on its command line (parent 1)
    client = subprocess.run(["pgrep", "-f", r"ray\.util\.client\.server .*--port=25009( |$)"],
                            capture_output=True, text=True)
    assert client.stdout.strip() == ""
    shutil.rmtree(cluster_dir, ignore_errors=True)  # its logs are kept only when the test fails


@pytest.mark.parametrize("name", ["aws-gpu.yaml", "gcp-gpu.yaml"])
def test_cloud_configs_pass_rays_own_validation(name):
    """The cluster launcher's schema (`ray up` runs the same two calls)."""
    import copy

    import yaml
    from jsonschema import ValidationError
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "clusters" / name).read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    setup = " ".join(config["setup_commands"] + config["head_start_ray_commands"])
    assert "raymeta" in setup and "RAY_AUTH_MODE=token" in setup
    assert "~/.ray/auth_token" in config["file_mounts"].values()  # the token reaches every node
    typo = copy.deepcopy(config)
    typo["available_node_types"]["gpu_worker"]["min_wokers"] = 0
    with pytest.raises(ValidationError, match="min_wokers"):
        validate_config(prepare_config(typo))


def _check_cluster_spec(spec: dict, where: str) -> None:
    """What KubeRay's v1 API requires of a RayCluster spec (ray-operator/apis/ray/v1)."""
    groups = [("headGroupSpec", spec["headGroupSpec"])]
    groups += [(f"workerGroupSpecs[{i}]", g) for i, g in enumerate(spec["workerGroupSpecs"])]
    assert spec["rayVersion"] == "2.60.0", where
    assert spec["authOptions"]["mode"] == "token", where
    for name, group in groups:
        params = group["rayStartParams"]
        assert all(isinstance(v, str) for v in params.values()), (where, name)  # map[string]string
        containers = group["template"]["spec"]["containers"]
        assert containers and all(c["name"] and c["image"] for c in containers), (where, name)
        if name != "headGroupSpec":
            assert group["groupName"] and group["minReplicas"] <= group["maxReplicas"], (where, name)


def _kuberay_docs(name: str) -> dict:
    """The file's documents by kind (the Ray resource, and the ServiceAccounts it uses)."""
    import yaml

    docs = list(yaml.safe_load_all((ROOT / "clusters" / "kuberay" / name).read_text()))
    by_kind: dict = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    return by_kind


def test_kuberay_manifests_have_what_kuberay_requires():
    (cluster,) = _kuberay_docs("raycluster.yaml")["RayCluster"]
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    _check_cluster_spec(cluster["spec"], "raycluster.yaml")
    (job,) = _kuberay_docs("rayjob.yaml")["RayJob"]
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["spec"]["entrypoint"].startswith("raymeta sweep ")
    assert "--resume" in job["spec"]["entrypoint"] and job["spec"]["shutdownAfterJobFinishes"]
    _check_cluster_spec(job["spec"]["rayClusterSpec"], "rayjob.yaml")


# --- security audit (issue 21): token path, identities, pinned versions ----------------------

CLOUD_CONFIGS = ["aws-gpu.yaml", "gcp-gpu.yaml"]
IMAGE_HOMES = {"rayproject/ray": "/home/ray"}  # HOME in the image (Config.Env), as Ray reads it


def _env_of(command: str, program: str) -> dict | None:
    """The variables `command` (one shell line) sets for `program`: `export` and plain
    assignments before it, `NAME=value program ...` prefixes; None if `program` is not run."""
    env: dict = {}
    for part in re.split(r"\s*(?:;|&&)\s*", command):
        words = shlex.split(part)
        if words[:1] == ["export"]:
            env.update(w.split("=", 1) for w in words[1:] if "=" in w)
            continue
        i = 0
        while i < len(words) and re.fullmatch(r"[A-Za-z_]\w*=.*", words[i]):
            i += 1
        if words[i:i + len(program.split())] == program.split():
            return {**env, **dict(w.split("=", 1) for w in words[:i])}
        if i == len(words):  # a line of plain assignments
            env.update(w.split("=", 1) for w in words)
    return None


def _where_ray_reads_the_token(env: dict, home: str, monkeypatch) -> str:
    """What Ray 2.60 reads: RAY_AUTH_TOKEN_PATH if set, else Path.home()/.ray/auth_token
    (ray/_private/authentication/authentication_token_setup.py, _get_default_token_path)."""
    from ray._private.authentication.authentication_token_setup import _get_default_token_path

    assert "RAY_AUTH_TOKEN" not in env  # a token on a command line ends up in logs
    if env.get("RAY_AUTH_TOKEN_PATH"):
        return env["RAY_AUTH_TOKEN_PATH"]
    monkeypatch.setenv("HOME", home)
    return str(_get_default_token_path())


def _token_path_on_node(config: dict) -> tuple[str, str]:
    """(where the token file is, the HOME commands run with) on a node, as the cluster
    launcher places file_mounts: on the VM for host mode; in Docker mode rsynced to the host
    under /tmp/ray_tmp_mount/<cluster> and bind-mounted into the container by the flags
    docker_start_cmds builds (ray/autoscaler/_private/docker.py; command_runner.py)."""
    target = next(t for t, src in config["file_mounts"].items() if src == "~/.ray/auth_token")
    if not config.get("docker", {}).get("image"):
        home = f"/home/{config['auth']['ssh_user']}"
        return target.replace("~/", home + "/", 1) if target.startswith("~/") else target, home
    from ray.autoscaler._private.docker import docker_start_cmds
    from ray.autoscaler.sdk import get_docker_host_mount_location

    image = config["docker"]["image"]
    home = next(h for prefix, h in IMAGE_HOMES.items() if image.startswith(prefix + ":"))
    run = docker_start_cmds("ubuntu", image, config["file_mounts"], "ray_container", [],
                            config["cluster_name"], home, "docker")
    host = f"{get_docker_host_mount_location(config['cluster_name'])}/{target}"
    mounts = dict(m.split(":", 1) for m in re.findall(r"-v (\S+)", run))
    return mounts[host], home


@pytest.mark.parametrize("name", CLOUD_CONFIGS)
def test_token_lands_where_ray_reads_it_on_head_workers_and_jobs(name, monkeypatch):
    import yaml

    config = yaml.safe_load((ROOT / "clusters" / name).read_text())
    token_at, home = _token_path_on_node(config)
    # the launcher runs every setup/start command as `bash --login -c -i 'source ~/.bashrc;
    # ...'` (command_runner.py _with_interactive), and `ray attach`/`ray exec` shells read it too
    login_env: dict = {}
    for command in config["setup_commands"]:
        echoed = re.fullmatch(r"echo (.+?) >> ~/\.bashrc", command.strip())
        if echoed:
            login_env.update(_env_of(shlex.split(echoed.group(1))[0] + "; true", "true"))
    assert login_env.get("RAY_AUTH_MODE") == "token", name
    where = {}
    for kind in ["head", "worker"]:
        (start,) = [c for c in config[f"{kind}_start_ray_commands"] if "ray start" in c]
        env = _env_of(start, "ray start")
        assert env is not None and env.get("RAY_AUTH_MODE") == "token", (name, kind)
        where[kind] = _where_ray_reads_the_token({**login_env, **env}, home, monkeypatch)
    # job drivers are started by the head's raylet (job supervisor actor) and inherit the
    # environment of `ray start --head`; an interactive shell on a node has ~/.bashrc's
    where["job"] = where["head"]
    where["shell"] = _where_ray_reads_the_token(login_env, home, monkeypatch)
    assert where == dict.fromkeys(where, token_at), (name, token_at, where)


def test_token_check_catches_the_old_docker_path(monkeypatch):
    """The audit's bug: a /home/ubuntu target is mounted unchanged in the container, where
    Ray reads /home/ray/.ray/auth_token."""
    config = {"cluster_name": "x", "auth": {"ssh_user": "ubuntu"},
              "docker": {"image": "rayproject/ray:2.60.0-py311-cu128"},
              "file_mounts": {"/home/ubuntu/.ray/auth_token": "~/.ray/auth_token"}}
    token_at, home = _token_path_on_node(config)
    assert token_at == "/home/ubuntu/.ray/auth_token"
    assert _where_ray_reads_the_token({}, home, monkeypatch) == "/home/ray/.ray/auth_token"


def _pod_templates(name: str):
    docs = _kuberay_docs(name)
    (resource,) = docs.get("RayCluster", []) + docs.get("RayJob", [])
    spec = resource["spec"].get("rayClusterSpec", resource["spec"])
    yield "head", spec["headGroupSpec"]["template"]
    for group in spec["workerGroupSpecs"]:
        yield group["groupName"], group["template"]
    if "submitterPodTemplate" in resource["spec"]:
        yield "submitter", resource["spec"]["submitterPodTemplate"]


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_pods_use_a_service_account_identity_and_no_keys(name):
    text = (ROOT / "clusters" / "kuberay" / name).read_text()
    assert "AWS_SECRET_ACCESS_KEY" not in text and "AWS_ACCESS_KEY_ID" not in text
    accounts = {sa["metadata"]["name"]: sa for sa in _kuberay_docs(name)["ServiceAccount"]}
    for group, template in _pod_templates(name):
        pod = template["spec"]
        assert pod.get("serviceAccountName") in accounts, (name, group)  # defined in the file
        for container in pod["containers"] + pod.get("initContainers", []):
            assert "envFrom" not in container, (name, group)
            for var in container.get("env", []):
                assert "secretKeyRef" not in var.get("valueFrom", {}), (name, group, var)
                # KubeRay's authOptions sets these; a container's own value would win
                assert var["name"] not in {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
                                           "RAY_AUTH_TOKEN_PATH"}, (name, group)
    for account in accounts.values():  # placeholders for IRSA and GKE Workload Identity
        notes = account["metadata"]["annotations"]
        assert {"eks.amazonaws.com/role-arn", "iam.gke.io/gcp-service-account"} <= set(notes)
    docs = (ROOT / "docs" / "clusters.md").read_text()
    assert "AWS_SECRET_ACCESS_KEY" not in docs and "--from-literal=AWS" not in docs
    assert "dashboard-host 0.0.0.0" not in docs and "dashboard-host=0.0.0.0" not in docs


def _pip_installs(text: str):
    """Every `pip install` command line in a shell/YAML/Dockerfile text (continuations
    joined, comments dropped), with the variables assigned before it on the same line."""
    for line in re.sub(r"\\\n\s*", " ", text).splitlines():
        line = line.strip().lstrip("-").strip()
        line = re.sub(r"^(RUN|- )\s*", "", line)
        if re.match(r"^#", line) or "pip install" not in line:
            continue
        env = _env_of(line, "pip install") or {}
        words = shlex.split(line.split("pip install", 1)[1], comments=True)
        yield line, env, [w for w in words if not w.startswith("-")]


def _cluster_texts():
    files = [ROOT / "clusters" / n for n in CLOUD_CONFIGS]
    files += sorted((ROOT / "clusters" / "kuberay").glob("*.yaml"))
    return {str(f.relative_to(ROOT)): f.read_text() for f in files}


def test_cluster_files_pin_what_they_install_and_run():
    import yaml

    texts = _cluster_texts()
    for where, text in texts.items():
        assert ":latest" not in text, where
    for name in ["raycluster.yaml", "rayjob.yaml"]:
        for group, template in _pod_templates(name):
            for c in template["spec"]["containers"]:
                image = c["image"]
                tag = image.rsplit("/", 1)[-1].partition(":")[2]
                assert "@sha256:" in image or (tag and tag != "latest"), (name, group, image)
    torch_pins = set()
    docs = (ROOT / "docs" / "clusters.md").read_text()
    blocks = "\n".join(re.findall(r"```(?:bash|dockerfile)\n(.*?)```", docs, re.S))
    sources = {w: "\n".join(yaml.safe_load(t)["setup_commands"])
               for w, t in texts.items() if w.endswith(tuple(CLOUD_CONFIGS))}
    sources["docs/clusters.md"] = blocks
    for where, text in sources.items():
        installs = list(_pip_installs(text))
        assert installs, where
        for line, env, reqs in installs:
            for req in reqs:
                git = re.fullmatch(r"[\w.\-]+ @ git\+https://[^@\s]+@(\S+)", req)
                if git:  # a commit or tag; a variable must be set on the line (the YAMLs)
                    ref = git.group(1)
                    var = re.fullmatch(r"\$\{?(\w+)\}?", ref)
                    if var and where != "docs/clusters.md":
                        assert env.get(var.group(1)), (where, line)
                    continue
                assert re.fullmatch(r"[\w.\-]+(\[[\w,]+\])?==[\w.+]+", req), (where, req)
                if req.startswith(("torch==", "torchvision==")):
                    torch_pins.add(req)
    # one torch/torchvision pair everywhere, and a torch with the CVE-2025-32434 fix (>= 2.6)
    assert {p.split("==")[0] for p in torch_pins} == {"torch", "torchvision"}, torch_pins
    assert len(torch_pins) == 2, torch_pins
    torch_version = next(p for p in torch_pins if p.startswith("torch=="))[len("torch=="):]
    assert tuple(int(x) for x in torch_version.split(".")[:2]) >= (2, 6), torch_version
