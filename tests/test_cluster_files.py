"""Every file under cluster/ parses and validates offline: Kubernetes objects (and the pod templates
inside the KubeRay resources) against the Kubernetes schemas of kubernetes-validate, the cluster
launcher YAML against the schema Ray ships; versions agree with pyproject; token auth is on and no
secret is written down."""

import json
import os
import re
from pathlib import Path

import pytest
import tomllib
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
YAMLS = sorted(p for p in CLUSTER.rglob("*.y*ml"))
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
RAY_VERSION = next(
    re.search(r"==([\d.]+)", d).group(1) for d in PYPROJECT["project"]["dependencies"] if d.startswith("ray[")
)
PYTHON = next(
    c.rsplit(" ", 1)[-1]
    for c in PYPROJECT["project"]["classifiers"]
    if c.startswith("Programming Language :: Python :: 3.")
)


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _kubernetes_docs() -> list[tuple[str, dict]]:
    return [
        (f"{p.relative_to(REPO)}#{i}", d)
        for p in YAMLS
        for i, d in enumerate(_docs(p))
        if "apiVersion" in d and "kind" in d
    ]


def test_there_is_a_file_for_each_deployment_path():
    names = {str(p.relative_to(CLUSTER)) for p in CLUSTER.rglob("*") if p.is_file()}
    assert {
        "docker/Dockerfile",
        "launcher/aws.yaml",
        "kuberay/raycluster.yaml",
        "kuberay/rayjob.yaml",
        "kuberay/storage.yaml",
        "mlflow/docker-compose.yaml",
        "mlflow/kubernetes.yaml",
        "local/start.sh",
        "local/stop.sh",
        "local/mlflow.sh",
    } <= names


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_yaml_file_parses(path):
    assert _docs(path), path


@pytest.mark.parametrize(
    "name,doc",
    [d for d in _kubernetes_docs() if not d[1]["apiVersion"].startswith("ray.io/")],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_kubernetes_objects_validate_against_the_schemas(name, doc):
    import kubernetes_validate

    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def _pod_templates(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


def _ray_clusters() -> list[tuple[str, dict]]:
    out = []
    for name, doc in _kubernetes_docs():
        if doc["kind"] == "RayCluster":
            out.append((name, doc["spec"]))
        elif doc["kind"] == "RayJob":
            out.append((name, doc["spec"]["rayClusterSpec"]))
    return out


@pytest.mark.parametrize("name,spec", _ray_clusters(), ids=lambda v: v if isinstance(v, str) else "")
def test_kuberay_clusters_pin_ray_use_tokens_and_valid_pod_templates(name, spec):
    import kubernetes_validate

    assert spec["rayVersion"] == RAY_VERSION
    assert spec["authOptions"]["mode"] == "token"
    head_resources = spec["headGroupSpec"]["rayStartParams"]["resources"]
    assert "sweep_driver" in head_resources and spec["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert "nvidia.com/gpu" in limits
        env = {e["name"]: e["value"] for e in group["template"]["spec"]["containers"][0]["env"]}
        # data-parallel trials talk over the pod network, and a failed collective raises
        assert env["NCCL_SOCKET_IFNAME"] == env["GLOO_SOCKET_IFNAME"] == "eth0"
        assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    for template in _pod_templates(spec):
        kubernetes_validate.validate(
            {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template},
            kubernetes_validate.latest_version(),
            strict=True,
        )


def test_rayjob_runs_a_sweep_off_preemptible_workers_and_cleans_up():
    job = _docs(CLUSTER / "kuberay" / "rayjob.yaml")[0]["spec"]
    assert job["entrypoint"].startswith("clockdistill sweep ")
    assert json.loads(job["entrypointResources"]) == {"sweep_driver": 1}
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] > 0


def test_launcher_yaml_validates_against_rays_schema_and_keeps_drivers_on_the_head():
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = _docs(CLUSTER / "launcher" / "aws.yaml")[0]
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert "sweep_driver" in types[config["head_node_type"]]["resources"]
    workers = [t for n, t in types.items() if n != config["head_node_type"]]
    assert workers and all(
        "sweep_driver" not in t["resources"] and t["max_workers"] >= t["min_workers"] for t in workers
    )
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert all("--dashboard-host=127.0.0.1" in c for c in config["head_start_ray_commands"] if "--head" in c)


def test_image_and_manifests_name_the_pinned_ray_and_python():
    dockerfile = (CLUSTER / "docker" / "Dockerfile").read_text()
    tag = re.search(r"^FROM rayproject/ray:(\S+)", dockerfile, re.M).group(1)
    assert tag == f"{RAY_VERSION}-py{PYTHON.replace('.', '')}-gpu"
    assert "torch==2.13.0" in dockerfile and "RAY_AUTH_MODE=token" in dockerfile
    for path in YAMLS + [CLUSTER / "docker" / "Dockerfile"]:
        for other in re.findall(r"rayproject/ray:(\S+)", path.read_text()):
            assert other.startswith(f"{RAY_VERSION}-py{PYTHON.replace('.', '')}"), (path, other)
        for version in re.findall(r"rayVersion: \"?([\d.]+)", path.read_text()):
            assert version == RAY_VERSION, path


def test_mlflow_servers_use_postgres_s3_and_allowed_hosts():
    compose = _docs(CLUSTER / "mlflow" / "docker-compose.yaml")[0]["services"]
    command = compose["mlflow"]["command"]
    assert "--allowed-hosts" in command and "--artifacts-destination s3://" in compose["mlflow"]["command"]
    assert compose["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    k8s = {d["metadata"]["name"]: d for d in _docs(CLUSTER / "mlflow" / "kubernetes.yaml") if d["kind"] == "Deployment"}
    args = " ".join(k8s["mlflow"]["spec"]["template"]["spec"]["containers"][0]["args"])
    assert "--allowed-hosts" in args and "postgresql://" in args and "--artifacts-destination s3://" in args


def test_local_scripts_bind_to_loopback_with_token_auth():
    start = (CLUSTER / "local" / "start.sh").read_text()
    assert "RAY_AUTH_MODE=token" in start and "--dashboard-host 127.0.0.1" in start and "umask 077" in start
    assert "--host 127.0.0.1" in (CLUSTER / "local" / "mlflow.sh").read_text()
    for script in (CLUSTER / "local").glob("*.sh"):
        assert os.access(script, os.X_OK), script


def test_no_secret_is_written_down():
    literal = re.compile(
        r"(RAY_AUTH_TOKEN|PASSWORD|SECRET_ACCESS_KEY)\s*[:=]\s*['\"]?(?![$\s{]|change-me)[A-Za-z0-9+/]{8,}", re.I
    )
    for path in CLUSTER.rglob("*"):
        if path.is_file():
            assert not literal.search(path.read_text()), path
