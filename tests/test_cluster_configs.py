"""cluster/: launcher YAMLs validated the way `ray up` does, KubeRay manifests against the CRD field names, and the
override sets in the files and the README checked against the config tree.  Offline and fast: no Ray cluster, no
cloud, no Kubernetes."""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

from pipelines.cluster_check import (
    DRIVER_RESOURCE,
    ClusterConfigError,
    check_launcher_config,
    load_yaml,
    main,
)
from rgnet.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
README = ROOT / "README.md"
LAUNCHER_YAMLS = sorted(CLUSTER.glob("*.yaml"))
CLOUD_YAMLS = [CLUSTER / "aws-gpu.yaml", CLUSTER / "gcp-gpu.yaml"]
MANIFESTS = sorted(KUBERAY.glob("*.yaml"))
# One vocabulary for the node groups, in the launcher YAMLs, the KubeRay manifests and the README.
HEAD = "head"
WORKER_GROUPS = {"gpu-worker", "data-worker"}
RAY_VERSION = ray.__version__  # the clusters run the laptop's Ray: `ray job submit` needs matching versions


def ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(ROOT)) for p in paths]


def test_the_cluster_files_exist() -> None:
    assert {p.name for p in LAUNCHER_YAMLS} == {"aws-gpu.yaml", "gcp-gpu.yaml", "local.yaml"}
    assert {p.name for p in MANIFESTS} == {"raycluster.yaml", "rayjob.yaml"}
    assert (KUBERAY / "Dockerfile").is_file()


# ---------------------------------------------------------------------------------------------------------------
# Launcher YAMLs: Ray's own preparation and validation, then consistency
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=ids(LAUNCHER_YAMLS))
def test_launcher_yaml_passes_ray_validation_and_conventions(path: Path) -> None:
    prepared = check_launcher_config(path)
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] in types
    for node in types.values():
        assert 0 <= node["min_workers"] <= node["max_workers"] <= prepared["max_workers"]
        assert all(isinstance(v, int) and not isinstance(v, bool) for v in node["resources"].values())


@pytest.mark.parametrize("path", CLOUD_YAMLS, ids=ids(CLOUD_YAMLS))
def test_cloud_node_types(path: Path) -> None:
    prepared = check_launcher_config(path)
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] == HEAD and set(types) == {HEAD} | WORKER_GROUPS
    head, gpu, data = types[HEAD], types["gpu-worker"], types["data-worker"]
    assert head["resources"][DRIVER_RESOURCE] >= 1 and "GPU" not in head["resources"]
    assert (head["min_workers"], head["max_workers"]) == (0, 0)
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1 and gpu["resources"]["GPU"] >= 1
    assert data["min_workers"] == 0 and "GPU" not in data["resources"]
    assert gpu["max_workers"] + data["max_workers"] == prepared["max_workers"]
    docker = prepared["docker"]
    images = [docker["image"], docker["head_image"], data["docker"]["worker_image"]]
    assert all(image.startswith(f"rayproject/ray:{RAY_VERSION}-py311-") for image in images), images
    # the package is installed on every node (setup_commands are merged into both lists), MLflow starts on the head
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert any("pip install" in c and "-e /home/ray/rgnet-ray" in c for c in prepared[key])
    assert "/home/ray/rgnet-ray" in prepared["file_mounts"]
    scheme = {"aws": "s3://", "gcp": "gs://"}[prepared["provider"]["type"]]
    head_start = "\n".join(prepared["head_start_ray_commands"])
    assert f"--artifacts-destination {scheme}" in head_start and "--host 127.0.0.1" in head_start


def test_local_yaml_is_on_prem() -> None:
    raw = load_yaml(CLUSTER / "local.yaml")
    assert raw["provider"]["type"] == "local" and raw["provider"]["head_ip"] and raw["provider"]["worker_ips"]
    prepared = check_launcher_config(CLUSTER / "local.yaml")
    (node_type,) = prepared["available_node_types"]  # Ray builds one node type from the IP list
    assert prepared["available_node_types"][node_type]["max_workers"] == len(raw["provider"]["worker_ips"])
    assert DRIVER_RESOURCE in "\n".join(prepared["head_start_ray_commands"])
    # jobs must find the venv's python: Ray is started from the venv
    assert all("rgnet-venv" in c for c in prepared["head_start_ray_commands"] if "ray start" in c)


def _break(config: dict[str, Any], mutation: str) -> dict[str, Any]:
    config = copy.deepcopy(config)
    types = config["available_node_types"]
    if mutation == "unknown node-type key":
        types["gpu-worker"]["gpus"] = 1
    elif mutation == "worker bound as text":
        config["max_workers"] = "eight"
    elif mutation == "fractional resource":
        types["gpu-worker"]["resources"]["GPU"] = 0.5
    elif mutation == "head type not defined":
        config["head_node_type"] = "gpu-workers"
    elif mutation == "min workers above the cluster max":
        types["gpu-worker"]["min_workers"] = 12
    elif mutation == "unknown top-level key":
        config["max_worker"] = 3
    elif mutation == "GPU workers never scale to zero":
        types["gpu-worker"]["min_workers"] = 1
    elif mutation == "min above max":
        types["data-worker"]["min_workers"], types["data-worker"]["max_workers"] = 2, 1
    elif mutation == "head without TRAIN_DRIVER":
        del types["head"]["resources"][DRIVER_RESOURCE]
    elif mutation == "no token auth":
        config["worker_start_ray_commands"] = [
            c.replace("RAY_AUTH_MODE=token", "") for c in config["worker_start_ray_commands"]
        ]
    else:
        raise AssertionError(mutation)
    return config


BROKEN = {  # mutation -> what the error says (Ray's own message, or this project's rule)
    "unknown node-type key": "Additional properties are not allowed",
    "worker bound as text": "max_workers: 'eight' is not of type 'integer'",
    "fractional resource": "is not of type 'integer'",
    "head type not defined": "head_node_type",
    "min workers above the cluster max": "sum of `min_workers`",
    "unknown top-level key": "Additional properties are not allowed",
    "GPU workers never scale to zero": "min_workers: 0",
    "min above max": "min_workers",
    "head without TRAIN_DRIVER": DRIVER_RESOURCE,
    "no token auth": "RAY_AUTH_MODE=token",
}


@pytest.mark.parametrize("mutation", list(BROKEN))
def test_broken_launcher_yaml_is_rejected(mutation: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_break(load_yaml(CLUSTER / "aws-gpu.yaml"), mutation)))
    with pytest.raises(ClusterConfigError, match=re.escape(BROKEN[mutation])):
        check_launcher_config(bad)


def test_on_prem_yaml_without_ips_is_rejected(tmp_path: Path) -> None:
    config = load_yaml(CLUSTER / "local.yaml")
    del config["provider"]["head_ip"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    with pytest.raises(ClusterConfigError, match="Ray refuses"):
        check_launcher_config(bad)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(p) for p in LAUNCHER_YAMLS]) == 0
    assert capsys.readouterr().out.count("ok: ") == len(LAUNCHER_YAMLS)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_break(load_yaml(CLUSTER / "gcp-gpu.yaml"), "worker bound as text")))
    assert main([str(CLUSTER / "aws-gpu.yaml"), str(bad)]) == 1
    assert "bad.yaml: Ray refuses this config" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# KubeRay manifests: CRD field names
# ---------------------------------------------------------------------------------------------------------------
# Field names of the KubeRay custom resources (apiVersion ray.io/v1), from the Go types the CRDs are generated from:
# ray-project/kuberay, ray-operator/apis/ray/v1/raycluster_types.go (commit 3275ee09) and rayjob_types.go (commit
# f6ef3f7b) (the json tags; a tag without ",omitempty" marks a required field), plus RayClusterSpec.authOptions
# (KubeRay >= 1.5.1; "KubeRay CRD API reference", docs.ray.io/en/master/cluster/kubernetes/references/api.html).
# `known` lists every field of the type: the API server silently prunes unknown fields, so a typo ("workerGroupSpec")
# would only show as a missing feature.
FIELDS: dict[str, dict[str, set[str]]] = {
    "RayClusterSpec": {
        "required": {"headGroupSpec"},
        "known": {
            "suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations", "enableInTreeAutoscaling",
            "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion", "workerGroupSpecs", "authOptions",
        },
    },
    "HeadGroupSpec": {
        "required": {"rayStartParams", "template"},
        "known": {"template", "headService", "enableIngress", "rayStartParams", "serviceType"},
    },
    "WorkerGroupSpec": {
        "required": {"groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"},
        "known": {
            "suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds", "rayStartParams",
            "template", "scaleStrategy", "numOfHosts",
        },
    },
    "AutoscalerOptions": {
        "required": set(),
        "known": {
            "resources", "image", "imagePullPolicy", "securityContext", "idleTimeoutSeconds", "upscalingMode", "env",
            "envFrom", "volumeMounts",
        },
    },
    "AuthOptions": {"required": set(), "known": {"mode", "secretName", "enableK8sTokenAuth"}},
    "RayJobSpec": {
        "required": set(),
        "known": {
            "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
            "clusterSelector", "submitterConfig", "managedBy", "deletionPolicy", "entrypoint", "runtimeEnvYAML",
            "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
            "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend",
        },
    },
}  # fmt: skip
ENUMS = {
    "upscalingMode": {"Default", "Aggressive", "Conservative"},
    "authOptions.mode": {"disabled", "token"},
    "submissionMode": {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"},
}
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # Kubernetes object and group names


def check_fields(obj: Any, type_name: str, where: str) -> None:
    assert isinstance(obj, dict), f"{where}: expected a mapping ({type_name})"
    table = FIELDS[type_name]
    missing, unknown = table["required"] - set(obj), set(obj) - table["known"]
    assert not missing, f"{where}: {type_name} lacks required field(s) {sorted(missing)}"
    assert not unknown, f"{where}: {type_name} has no field(s) {sorted(unknown)}"


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def only(path: Path, kind: str) -> dict[str, Any]:
    (doc,) = [d for d in documents(path) if d.get("kind") == kind]
    return doc


def check_pod_template(template: dict[str, Any], ray_container: str, where: str) -> dict[str, Any]:
    """The Ray container comes first (KubeRay treats containers[0] as Ray), with image and resources; /dev/shm is a
    memory-backed volume (Ray's object store; the container default is 64 MiB)."""
    spec = template["spec"]
    containers = spec["containers"]
    assert containers and containers[0]["name"] == ray_container, f"{where}: the first container must be Ray's"
    for c in containers + spec.get("initContainers", []):
        assert c.get("name") and c.get("image"), f"{where}: every container needs a name and an image"
    ray_c = containers[0]
    limits = ray_c["resources"]["limits"]
    assert {"cpu", "memory"} <= set(limits), f"{where}: the Ray container needs cpu and memory limits"
    assert ray_c["resources"].get("requests") == limits, f"{where}: KubeRay advises requests == limits"
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    shm = [m for m in ray_c.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
    assert shm and volumes[shm[0]["name"]]["emptyDir"]["medium"] == "Memory", f"{where}: /dev/shm must be in memory"
    for c in containers + spec.get("initContainers", []):
        for m in c.get("volumeMounts", []):
            assert m["name"] in volumes, f"{where}: container {c['name']} mounts undefined volume {m['name']}"
    return ray_c


def check_raycluster_spec(spec: dict[str, Any], where: str) -> dict[str, dict[str, Any]]:
    """Field names, enums, autoscaling and node groups of a RayClusterSpec; returns the worker groups by name."""
    check_fields(spec, "RayClusterSpec", where)
    assert spec["rayVersion"] == RAY_VERSION, f"{where}: rayVersion must be the laptop's Ray ({RAY_VERSION})"
    assert spec["enableInTreeAutoscaling"] is True
    check_fields(spec["autoscalerOptions"], "AutoscalerOptions", f"{where}.autoscalerOptions")
    assert spec["autoscalerOptions"]["upscalingMode"] in ENUMS["upscalingMode"]
    check_fields(spec["authOptions"], "AuthOptions", f"{where}.authOptions")
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    check_fields(head, "HeadGroupSpec", f"{where}.headGroupSpec")
    params = head["rayStartParams"]
    assert all(isinstance(v, str) for v in params.values()), f"{where}: rayStartParams values must be strings"
    assert DRIVER_RESOURCE in params["resources"] and "num-gpus" not in params
    check_pod_template(head["template"], "ray-head", f"{where}.headGroupSpec")
    groups = {}
    for i, group in enumerate(spec["workerGroupSpecs"]):
        gwhere = f"{where}.workerGroupSpecs[{i}]"
        check_fields(group, "WorkerGroupSpec", gwhere)
        assert DNS_LABEL.match(group["groupName"]), f"{gwhere}: groupName must be a DNS label"
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
        check_pod_template(group["template"], "ray-worker", gwhere)
        groups[group["groupName"]] = group
    assert set(groups) == WORKER_GROUPS, f"{where}: worker groups {sorted(groups)}"
    gpu = groups["gpu-worker"]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1
    assert int(gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert "nvidia.com/gpu" not in groups["data-worker"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    return groups


def check_resource_header(doc: dict[str, Any], kind: str) -> None:
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind
    assert DNS_LABEL.match(doc["metadata"]["name"])


def test_raycluster_manifest() -> None:
    path = KUBERAY / "raycluster.yaml"
    rc = only(path, "RayCluster")
    check_resource_header(rc, "RayCluster")
    check_raycluster_spec(rc["spec"], "RayCluster.spec")
    # the other documents are what the pods reference: the service account and the MLflow database volume
    head_pod = rc["spec"]["headGroupSpec"]["template"]["spec"]
    assert only(path, "ServiceAccount")["metadata"]["name"] == head_pod["serviceAccountName"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in head_pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {only(path, "PersistentVolumeClaim")["metadata"]["name"]}
    # MLflow: a sidecar on the head, reachable through the head Service (built from the Ray container's ports)
    containers = {c["name"]: c for c in head_pod["containers"]}
    assert containers["mlflow"]["command"][:2] == ["mlflow", "server"]
    assert {"containerPort": 5000, "name": "mlflow"} in containers["ray-head"]["ports"]
    assert any(a.startswith("--artifacts-destination=s3://") for a in containers["mlflow"]["command"])


def test_rayjob_manifest() -> None:
    rj = only(KUBERAY / "rayjob.yaml", "RayJob")
    check_resource_header(rj, "RayJob")
    spec = rj["spec"]
    check_fields(spec, "RayJobSpec", "RayJob.spec")
    assert spec["entrypoint"].startswith("python -m pipelines.train ")
    assert spec["submissionMode"] in ENUMS["submissionMode"]
    assert spec["shutdownAfterJobFinishes"] is True and isinstance(spec["ttlSecondsAfterFinished"], int)
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert set(env) <= {"env_vars", "pip", "working_dir", "py_modules", "excludes", "conda", "uv", "container"}
    assert all(isinstance(v, str) for v in env["env_vars"].values())
    job_groups = check_raycluster_spec(spec["rayClusterSpec"], "RayJob.spec.rayClusterSpec")
    # the same node groups as the long-lived cluster
    cluster_groups = check_raycluster_spec(only(KUBERAY / "raycluster.yaml", "RayCluster")["spec"], "RayCluster.spec")
    for name in WORKER_GROUPS:
        for key in ("minReplicas", "maxReplicas"):
            assert job_groups[name][key] == cluster_groups[name][key]
        job_c, cluster_c = (g[name]["template"]["spec"]["containers"][0] for g in (job_groups, cluster_groups))
        assert job_c["resources"] == cluster_c["resources"]


def test_one_image_everywhere() -> None:
    """Every pod runs the image of cluster/kuberay/Dockerfile, which is built on the laptop's Ray."""
    images = set()
    for path in MANIFESTS:
        images |= set(re.findall(r"^\s*image: (\S+)", path.read_text(), flags=re.M))
    assert len(images) == 1, images
    assert f"FROM rayproject/ray:{RAY_VERSION}-py311-gpu" in (KUBERAY / "Dockerfile").read_text()


# ---------------------------------------------------------------------------------------------------------------
# Override sets: the commands in the cluster files and the README use valid config keys and cluster paths
# ---------------------------------------------------------------------------------------------------------------
def pipeline_commands(text: str) -> list[tuple[str, list[str]]]:
    """(module, arguments) of every ``python -m pipelines.<module> ...`` command in ``text``: YAML comment markers
    are stripped and backslash-continued lines joined, as a shell would."""
    lines = [re.sub(r"^\s*#\s?", "", line) for line in text.splitlines()]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    commands = []
    for line in joined.splitlines():
        match = re.search(r"python -m pipelines\.(\w+)(.*)", line)
        if match:
            args = shlex.split(match.group(2), comments=True)
            commands.append((match.group(1), args))
    return commands


def overrides_of(args: list[str]) -> tuple[str | None, list[str]]:
    """(--preset, key=value overrides) of a command; the README's shell variable stands for the files' placeholder."""
    preset = args[args.index("--preset") + 1] if "--preset" in args else None
    overrides = [a.replace("$BUCKET", "my-rgnet-bucket") for a in args if re.match(r"^[A-Za-z_][\w.]*=", a)]
    return preset, overrides


def config_of(args: list[str]) -> Config:
    preset, overrides = overrides_of(args)
    return load_config(preset, overrides=overrides)


def readme_section() -> str:
    text = README.read_text()
    start = text.index("## From laptop to cluster")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def cluster_commands() -> dict[str, list[tuple[str, list[str]]]]:
    """Training and sweep commands by source: each cluster file's header, the RayJob's entrypoint, the README."""
    sources = {str(p.relative_to(ROOT)): p.read_text() for p in [*LAUNCHER_YAMLS, KUBERAY / "raycluster.yaml"]}
    sources["cluster/kuberay/rayjob.yaml"] = only(KUBERAY / "rayjob.yaml", "RayJob")["spec"]["entrypoint"]
    sources["README"] = readme_section()
    return {
        name: [(m, a) for m, a in pipeline_commands(text) if m in ("train", "tune")] for name, text in sources.items()
    }


def test_every_cluster_file_documents_its_job() -> None:
    commands = cluster_commands()
    for name, found in commands.items():
        assert found, f"{name}: no `python -m pipelines.train|tune ...` command"
    modules = {m for m, _ in commands["README"]}
    assert modules == {"train", "tune"}


def test_override_keys_are_config_keys() -> None:
    """Every key=value in those commands loads (rgnet.config raises ConfigError on an unknown key or a bad value)."""
    for name, found in cluster_commands().items():
        for module, args in found:
            try:
                config_of(args)
            except ConfigError as e:
                pytest.fail(f"{name}: python -m pipelines.{module} {' '.join(args)}: {e}")
            if "--space" in args:
                assert (ROOT / args[args.index("--space") + 1]).is_file()


def test_cluster_overrides_point_at_shared_places() -> None:
    """On a cluster, relative paths would resolve inside the job's working directory on the head only: data,
    outputs and checkpoints need absolute (same on every node) or remote locations, and MLflow a server."""
    for name, found in cluster_commands().items():
        for module, args in found:
            cfg = config_of(args)
            where = f"{name}: pipelines.{module} {' '.join(args)}"
            assert cfg.data.root.startswith("/"), f"{where}: data.root must be absolute"
            assert cfg.train.output_dir.startswith("/"), f"{where}: train.output_dir must be absolute"
            assert re.match(r"^(s3|gs)://|^/mnt/shared/", cfg.ray.storage_path), f"{where}: ray.storage_path"
            assert cfg.tracking.uri.startswith("http://"), f"{where}: tracking.uri must be an MLflow server"


def fits(cfg: Config, cpus: float, gpus: float, max_nodes: int, where: str) -> None:
    """A Train worker fits on one GPU node, and all of them on the GPU nodes the cluster may start."""
    if not cfg.ray.use_gpu:
        return
    assert cfg.ray.cpus_per_worker <= cpus and cfg.ray.gpus_per_worker <= gpus, f"{where}: a worker does not fit"
    assert cfg.ray.num_workers * cfg.ray.gpus_per_worker <= max_nodes * gpus, f"{where}: not enough GPU nodes"
    # and leaves room for the Ray Data reads next to it
    assert cfg.ray.cpus_per_worker + cfg.ray.data_cpus <= cpus, f"{where}: no CPU left for Ray Data on a GPU node"


def test_override_sets_fit_the_node_types() -> None:
    commands = cluster_commands()
    for path in CLOUD_YAMLS:
        gpu = check_launcher_config(path)["available_node_types"]["gpu-worker"]
        for _, args in commands[str(path.relative_to(ROOT))]:
            cfg = config_of(args)
            fits(cfg, gpu["resources"]["CPU"], gpu["resources"]["GPU"], gpu["max_workers"], path.name)
    for path in MANIFESTS:
        rc = (
            only(path, "RayCluster")["spec"]
            if path.name == "raycluster.yaml"
            else only(path, "RayJob")["spec"]["rayClusterSpec"]
        )
        (group,) = [g for g in rc["workerGroupSpecs"] if g["groupName"] == "gpu-worker"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        for _, args in commands[str(path.relative_to(ROOT))]:
            cfg = config_of(args)
            fits(cfg, float(limits["cpu"]), float(limits["nvidia.com/gpu"]), group["maxReplicas"], path.name)


# ---------------------------------------------------------------------------------------------------------------
# README: pasteable commands that match the files
# ---------------------------------------------------------------------------------------------------------------
def test_readme_cluster_section_matches_the_files() -> None:
    section = readme_section()
    text = README.read_text()
    if "## Development" in text:
        assert text.index("## From laptop to cluster") < text.index("## Development")
    # every file it names exists
    for rel in set(re.findall(r"cluster/[\w./-]+\.yaml|cluster/kuberay/Dockerfile", section)):
        assert (ROOT / rel).exists(), rel
    # the node types it names are the files' node types, and it names them all
    named = set(re.findall(r"`([a-z]+-worker)`", section))
    assert named == WORKER_GROUPS and f"`{HEAD}`" in section
    # token auth is part of every submission
    assert "RAY_AUTH_MODE=token" in section and "ray get-auth-token --generate" in section
    for line in section.splitlines():
        if line.startswith("ray job "):
            assert "--address http://127.0.0.1:8265" in line, line


PLACEHOLDERS = {  # what a user replaces in each file before the first start (the README's sed commands)
    "cluster/aws-gpu.yaml": {"my-rgnet-bucket", "ami-REPLACE_ME"},
    "cluster/gcp-gpu.yaml": {"my-rgnet-bucket", "my-gcp-project"},
    "cluster/kuberay/raycluster.yaml": {"my-rgnet-bucket", "my-registry.example.com/rgnet-ray:0.1.0"},
    "cluster/kuberay/rayjob.yaml": {"my-rgnet-bucket", "my-registry.example.com/rgnet-ray:0.1.0"},
}


def test_readme_replaces_every_placeholder() -> None:
    section = re.sub(r"\\\n\s*", " ", readme_section())
    replaced: dict[str, set[str]] = {}
    for line in section.splitlines():
        if line.startswith("sed -i "):
            script, *files = shlex.split(line)[2:]
            patterns = set(re.findall(r"s([/|])(.+?)\1", script))
            for f in files:
                replaced.setdefault(f, set()).update(p for _, p in patterns)
    assert replaced == PLACEHOLDERS
    for rel, placeholders in PLACEHOLDERS.items():
        content = (ROOT / rel).read_text()
        assert all(p in content for p in placeholders), rel
