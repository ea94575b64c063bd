"""The Ray and MLflow runtime every command shares (it imports no command module).

- :func:`resolve_paths`: absolute paths and tracking URI, because Ray processes run in other working directories and
  maybe on other nodes;
- :func:`init_ray` / :func:`check_resources`: join ``ray.address`` (or a Ray job's cluster) or start a local Ray, and
  refuse a local Ray that cannot hold the workers and a data task;
- :func:`tracked_run`: the block of a command's work: the MLflow run ends FINISHED, KILLED (Ctrl-C, ``ray job stop``)
  or FAILED, and a Ray this command started is shut down, whatever happens inside;
- :func:`load_model_uri`: the checkpoint payload behind an MLflow model URI (``runs:/``, ``models:/``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pipelines.common import SetupError, abspath
from rgnet.config import Config, ConfigError, from_dict


def resolve_paths(cfg: Config) -> Config:
    """Absolute paths and tracking URI: Ray processes run in other working directories (and maybe other nodes)."""
    from pipelines.tracking import resolve_uri  # (tracking imports Ray: only where it is needed)

    storage = cfg.ray.storage_path
    return from_dict(
        {
            "data": {"root": abspath(cfg.data.root)},
            "train": {
                "output_dir": abspath(cfg.train.output_dir),
                "init_from": abspath(cfg.train.init_from) if cfg.train.init_from else "",
            },
            "ray": {"storage_path": storage if "://" in storage else abspath(storage)},
            "tracking": {"uri": resolve_uri(cfg.tracking.uri)},
        },
        cfg,
    )


def init_ray(cfg: Config, *, verbose: bool = True) -> bool:
    """Join ``ray.address`` (or the cluster of a Ray job), else start a local Ray; True when this call connected.

    ``verbose=False``: what Ray's processes print stays in its log files (``pipelines.console``), and the driver's
    own Ray logging shows warnings only.
    """
    import ray

    if ray.is_initialized():
        return False
    quiet: dict[str, Any] = {} if verbose else {"log_to_driver": False, "logging_level": logging.ERROR}
    try:
        if cfg.ray.address:
            ray.init(address=cfg.ray.address, **quiet)
        elif os.environ.get("RAY_ADDRESS"):  # inside `ray job submit`: the job's cluster
            ray.init(**quiet)
        else:
            # the dashboard stays on: Ray Train's placement-group cleaner needs the State API it serves
            ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=True, dashboard_host="127.0.0.1", **quiet)
    except ConnectionError as e:
        raise SetupError(f"cannot connect to Ray at {cfg.ray.address or os.environ.get('RAY_ADDRESS')}: {e}") from e
    return True


def check_resources(cfg: Config) -> None:
    """Fail instead of waiting forever when the workers and the data tasks cannot all be placed (local Ray only:
    an autoscaling cluster may still grow)."""
    import ray

    total_cpu = ray.cluster_resources().get("CPU", 0.0)
    need_cpu = cfg.ray.num_workers * cfg.ray.cpus_per_worker + cfg.ray.data_cpus
    if need_cpu > total_cpu + 1e-9:
        raise ConfigError(
            f"{cfg.ray.num_workers} workers x ray.cpus_per_worker={cfg.ray.cpus_per_worker} CPUs + "
            f"ray.data_cpus={cfg.ray.data_cpus} for the data tasks need {need_cpu:g} CPUs, but this Ray has "
            f"{total_cpu:g}: lower ray.num_workers or ray.cpus_per_worker (fractions are fine), or join a bigger "
            "cluster with ray.address"
        )
    if cfg.ray.use_gpu:
        need_gpu, total_gpu = cfg.ray.num_workers * cfg.ray.gpus_per_worker, ray.cluster_resources().get("GPU", 0.0)
        if need_gpu > total_gpu + 1e-9:
            raise ConfigError(f"ray.use_gpu=true needs {need_gpu:g} GPUs but this Ray has {total_gpu:g}")


@dataclass
class TrackedRun:
    """What a :func:`tracked_run` block reports back: whether it connected Ray (then shut down at the end), and a
    status to end the MLflow run with instead of FINISHED (an interrupted sweep that returns normally: KILLED)."""

    handle: Any
    connected: bool = False
    status: str | None = None


@contextlib.contextmanager
def tracked_run(handle: Any) -> Iterator[TrackedRun]:
    """End the MLflow run ``handle`` (a ``tracking.RunHandle`` or None) with the block's outcome and shut down the Ray
    the block connected (``run.connected = init_ray(...)``)."""
    from pipelines import tracking

    run = TrackedRun(handle)
    status = "FAILED"
    try:
        yield run
        status = run.status or "FINISHED"
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM (`ray job stop`), which Ray turns into an exit
        status = "KILLED"
        raise
    finally:
        if handle is not None:
            tracking.finish(handle, status)
        if run.connected:
            import ray

            ray.shutdown()


def load_model_uri(uri: str, tracking_uri: str | None) -> dict[str, Any]:
    """The checkpoint payload of an MLflow model (runs:/ or models:/ URI): the pyfunc model ``rgnet train`` logs, or
    the plain model folder of runs logged before it (:func:`pipelines.mlflow_model.load_payload`)."""
    from pipelines.mlflow_model import load_payload
    from pipelines.tracking import probe, resolve_uri

    store = resolve_uri(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", ""))
    probe(store)
    return load_payload(uri, store)
