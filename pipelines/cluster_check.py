"""``python -m pipelines.cluster_check cluster/aws-gpu.yaml ...``: check Ray cluster launcher YAMLs offline.

``ray up`` has no dry run: it talks to the cloud at once.  This runs the part of ``ray up`` that needs no cloud, with
Ray's own code: the preparation (the provider's ``defaults.yaml`` merged in, ``setup_commands`` merged into the head
and worker lists, per-node-type worker bounds filled in) and the validation (the JSON schema
``ray/autoscaler/ray-schema.json`` that ships in the wheel, ``head_node_type`` among ``available_node_types``, the
sum of ``min_workers`` within ``max_workers``).  Validating the raw YAML without the preparation fails on keys that
Ray fills in, which is why both steps run.  Then this project's conventions for ``cluster/*.yaml`` (README, "From
laptop to cluster"):

* every node type: 0 <= min_workers <= max_workers <= the cluster's max_workers, integer resources;
* cloud providers: every node type states its CPUs (and GPUs), the head is a CPU node offering ``TRAIN_DRIVER`` (for
  Tune trial drivers to request, so that they run on the head next to MLflow) and launches no workers of its own
  type, and at least one GPU node type scales from zero;
* on-prem (provider ``local``, one node type that Ray builds from the IP list): the head's ``ray start`` offers
  ``TRAIN_DRIVER``;
* every ``ray start`` runs with token authentication, and the head's start commands start the MLflow server.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

DRIVER_RESOURCE = "TRAIN_DRIVER"  # custom resource of the head, for Tune trial drivers to request
AUTH_SETTING = "RAY_AUTH_MODE=token"
CLOUD_PROVIDERS = ("aws", "gcp", "azure")


class ClusterConfigError(ValueError):
    """A launcher YAML that ``ray up`` would refuse, or that breaks this project's conventions; says which and why."""


def load_yaml(path: str | Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ClusterConfigError(f"{path}: cannot read it as YAML: {e}") from e
    if not isinstance(data, dict):
        raise ClusterConfigError(f"{path}: a cluster config must hold a mapping at the top level")
    return data


def prepare_and_validate(config: dict[str, Any]) -> dict[str, Any]:
    """The config as ``ray up`` sees it after Ray's own preparation and validation (raises what Ray raises).

    These are private Ray functions (``ray.autoscaler._private.util``); pyproject pins Ray to 2.60.x, and this is the
    only place that calls them.
    """
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _ray_error(e: Exception) -> str:
    """One line from whatever Ray raised: jsonschema errors carry the failing path and a short message."""
    message = getattr(e, "message", None) or str(e) or type(e).__name__
    where = "/".join(str(p) for p in getattr(e, "absolute_path", ()))
    first = str(message).strip().splitlines()[0] if str(message).strip() else type(e).__name__
    return f"{where}: {first}" if where else first


def _commands(prepared: dict[str, Any], key: str) -> str:
    return "\n".join(str(c) for c in prepared.get(key) or [])


def convention_problems(prepared: dict[str, Any]) -> list[str]:
    """This project's rules for a prepared launcher config (module docstring); empty when it follows them."""
    problems: list[str] = []
    provider = prepared["provider"]["type"]
    types: dict[str, dict[str, Any]] = prepared["available_node_types"]
    head = prepared["head_node_type"]
    cluster_max = prepared["max_workers"]
    for name, node in types.items():
        lo, hi = node.get("min_workers", 0), node.get("max_workers", 0)
        if not 0 <= lo <= hi <= cluster_max:
            problems.append(
                f"node type {name!r}: need 0 <= min_workers ({lo}) <= max_workers ({hi}) <= the cluster's "
                f"max_workers ({cluster_max})"
            )
        resources = node.get("resources") or {}
        bad = {k: v for k, v in resources.items() if not isinstance(v, int) or isinstance(v, bool) or v < 0}
        if bad:
            problems.append(f"node type {name!r}: resources must be non-negative integers, got {bad}")
        if provider in CLOUD_PROVIDERS and "CPU" not in resources:
            problems.append(
                f"node type {name!r}: state its resources (CPU, and GPU where it has one), e.g. {{CPU: 8, GPU: 1}}, "
                "so the autoscaler and the job's overrides agree on what a node offers"
            )
    head_start = _commands(prepared, "head_start_ray_commands")
    if provider in CLOUD_PROVIDERS:
        head_resources = types[head].get("resources") or {}
        if head_resources.get(DRIVER_RESOURCE, 0) < 1:
            problems.append(
                f"head node type {head!r}: offer the custom resource {DRIVER_RESOURCE} (e.g. {DRIVER_RESOURCE}: 8) "
                "so Tune trial drivers stay on the head"
            )
        if head_resources.get("GPU", 0):
            problems.append(f"head node type {head!r}: keep the head a CPU node (GPU workers scale from zero)")
        if types[head].get("max_workers", 0) != 0:
            problems.append(f"head node type {head!r}: set max_workers: 0 (no extra nodes of the head's type)")
        gpu_types = [n for n, t in types.items() if n != head and (t.get("resources") or {}).get("GPU", 0) >= 1]
        if not gpu_types:
            problems.append("no GPU worker node type (resources with GPU >= 1)")
        for name in gpu_types:
            if types[name].get("min_workers", 0) != 0:
                problems.append(f"GPU node type {name!r}: set min_workers: 0 so that idle GPU nodes go away")
            if types[name].get("max_workers", 0) < 1:
                problems.append(f"GPU node type {name!r}: max_workers must be >= 1")
    elif DRIVER_RESOURCE not in head_start:
        problems.append(
            f"head_start_ray_commands: the head's `ray start` must offer {DRIVER_RESOURCE}, e.g. "
            f"--resources='{{\"{DRIVER_RESOURCE}\": 8}}'"
        )
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        if AUTH_SETTING not in _commands(prepared, key):
            problems.append(f"{key}: run `ray start` with {AUTH_SETTING} (token authentication)")
    if "mlflow server" not in head_start:
        problems.append("head_start_ray_commands: start the MLflow server on the head (`mlflow server ...`)")
    return problems


def check_launcher_config(path: str | Path) -> dict[str, Any]:
    """Ray's preparation and validation, then this project's conventions; returns the prepared config."""
    raw = load_yaml(path)
    try:
        prepared = prepare_and_validate(raw)
    except Exception as e:  # Ray raises jsonschema.ValidationError, ValueError, RuntimeError, AssertionError, or
        # exits through its CLI logger (click): all of them mean that `ray up` refuses the file
        raise ClusterConfigError(f"{path}: Ray refuses this config ({type(e).__name__}): {_ray_error(e)}") from e
    problems = convention_problems(prepared)
    if problems:
        raise ClusterConfigError(f"{path}:\n  - " + "\n  - ".join(problems))
    return prepared


def describe(prepared: dict[str, Any]) -> str:
    """One line per node type: bounds and resources (what the autoscaler will work with)."""
    head = prepared["head_node_type"]
    lines = []
    for name, node in prepared["available_node_types"].items():
        # on-prem, Ray builds one node type for the head and the worker hosts alike
        role = "workers" if name != head else "head and workers" if node.get("max_workers", 0) else "head"
        bounds = f"{node.get('min_workers', 0)}-{node.get('max_workers', 0)}"
        lines.append(f"    {name} ({role} {bounds}): {node.get('resources') or 'detected by Ray'}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.cluster_check",
        description="Validate Ray cluster launcher YAMLs offline the way `ray up` does (Ray's own config "
        "preparation and schema validation), then check this project's conventions.",
    )
    parser.add_argument("configs", nargs="+", metavar="CLUSTER_YAML", help="e.g. cluster/aws-gpu.yaml")
    args = parser.parse_args(argv)
    logging.getLogger("ray.autoscaler").setLevel(logging.WARNING)  # Ray logs every default it fills in
    failed = 0
    for path in args.configs:
        try:
            prepared = check_launcher_config(path)
        except ClusterConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        print(f"ok: {path} ({prepared['provider']['type']}, cluster max_workers {prepared['max_workers']})")
        print(describe(prepared))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
