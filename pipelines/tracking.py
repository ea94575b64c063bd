"""MLflow for ``rgnet train``: one run per Ray Train run, one writer, every epoch logged exactly once.

Who writes what:

* The driver resolves and probes the tracking URI (an unreachable server is a clear error in seconds, before Ray
  starts), then creates the MLflow run, or finds the run of an interrupted attempt by its ``rgnet.run_key`` tag
  (storage path + run name, the same key Ray Train resumes by) and reuses it.  It logs the resolved config as
  flattened params, the tags and ``config.yaml``.
* During training, :class:`EpochLogger` (a ``ray.train.UserCallback``, so it runs in the Train controller: one
  writer, whatever the number of workers) logs the epochs.  Rank 0 stores the run's whole epoch history in every
  checkpoint (``history.json``); after each report the logger logs every epoch of that history that MLflow does
  not hold yet, one ``log_batch`` per epoch with the marker metric ``epoch`` in the same batch.  What MLflow holds
  is read back from MLflow itself (the marker's steps), so a restarted worker group, a restarted driver, or an
  epoch whose checkpoint was registered just before the driver died (Ray registers the checkpoint before it calls
  the callback) neither duplicates nor loses an epoch.  The driver runs the same reconciliation once more on the
  final checkpoint.
* After training, the driver logs the artifacts (best model, its validation predictions, final reports, plots) and
  marks the run FINISHED (FAILED / KILLED when training raised or was interrupted).

MLflow metric names cannot contain ``@``: ``R1@0.3`` is logged as ``R1_at_0.3`` (:func:`metric_key`).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train

from pipelines.common import SetupError
from rgnet.config import Config, to_dict, to_yaml

log = logging.getLogger("rgnet.tracking")

EPOCH_KEY = "epoch"  # marker metric: its steps are the epochs MLflow holds
RUN_KEY_TAG = "rgnet.run_key"
HISTORY_FILE = "history.json"
PROBE_TIMEOUT_S = 5.0


class TrackingError(SetupError):
    """The tracking store cannot be used; the message says which URI and how to fix it."""


# ---------------------------------------------------------------------------------------------------------------
# URIs
# ---------------------------------------------------------------------------------------------------------------
def resolve_uri(uri: str) -> str:
    """The absolute tracking URI: empty -> ``sqlite:///<abs cwd>/mlflow.db``; a relative SQLite path is made absolute.

    Absolute because Ray Train changes the working directory of its processes: a relative ``sqlite:///mlflow.db``
    would be a different database in every one of them.
    """
    if not uri:
        return "sqlite:///" + os.path.join(os.path.abspath(os.getcwd()), "mlflow.db")
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///") :]
        return "sqlite:///" + os.path.abspath(os.path.expanduser(path)) if not path.startswith("/") else uri
    if "://" not in uri:
        raise TrackingError(
            f"tracking URI {uri!r} has no scheme: use sqlite:///ABS/PATH/mlflow.db (a local store) or "
            "http://HOST:PORT (an `mlflow server`)"
        )
    return uri


def sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def probe(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Fail fast and clearly when the store cannot be used (MLflow's own client retries for minutes)."""
    db = sqlite_path(uri)
    if db is not None:
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrackingError(f"cannot create the folder of the MLflow database {db}: {e.strerror}") from e
        if not os.access(db.parent, os.W_OK):
            raise TrackingError(f"the folder of the MLflow database {db} is not writable")
        return
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                body = resp.read(64).decode(errors="replace").strip()
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            reason = getattr(e, "reason", e)
            raise TrackingError(
                f"cannot reach the MLflow tracking server at {uri} ({reason}; waited at most {timeout:g} s): start "
                f"it (`mlflow server --host HOST --port PORT --backend-store-uri sqlite:///ABS/mlflow.db`), fix "
                f"--tracking-uri, or log to a local store with --tracking-uri sqlite:///ABS/PATH/mlflow.db"
            ) from e
        if body != "OK":
            raise TrackingError(f"{url} answered {body!r}, not an MLflow tracking server's 'OK'")


def ui_command(uri: str) -> str:
    """The command that opens the MLflow UI on this store (a server URI is already a UI)."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri} --port 5000"


def metric_key(name: str) -> str:
    """A report key as an MLflow metric name: ``val/R1@0.3`` -> ``val/R1_at_0.3``."""
    return name.replace("@", "_at_")


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config dict -> {"model.sampler.temperature": "0.3", ...} (MLflow params are strings)."""
    out: dict[str, str] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, list) else str(value)
    return out


def git_commit() -> str:
    """The commit of the code that runs (``unknown`` outside a git checkout, e.g. in a Ray job's working dir)."""
    here = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class RunHandle:
    uri: str
    experiment_id: str
    run_id: str
    resumed: bool  # an existing run (of an interrupted or finished attempt) was reused

    def client(self) -> Any:
        from mlflow import MlflowClient

        return MlflowClient(self.uri)


def _experiment_id(client: Any, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    db = sqlite_path(uri)
    # With a SQLite store MLflow would put artifacts under ./mlruns of whichever directory the driver runs in (a
    # Ray job's is temporary): keep them next to the database instead.
    location = (db.parent / "mlartifacts" / name).as_uri() if db is not None else None
    try:
        return str(client.create_experiment(name, artifact_location=location))
    except Exception:  # another driver created it in between
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return str(exp.experiment_id)


def run_tags(cfg: Config, preset: str | None, run_key: str) -> dict[str, str]:
    return {
        RUN_KEY_TAG: run_key,
        "dataset": Path(cfg.data.root).name,
        "layout": cfg.data.layout,
        "preset": preset or "none",
        "git_commit": git_commit(),
        "metric_profile": cfg.eval.profile,
        "prediction_cap": str(cfg.eval.max_predictions),
        "selection_metric": cfg.train.selection_metric,
        "ray_workers": str(cfg.ray.num_workers),
    }


def open_run(
    cfg: Config,
    *,
    run_key: str,
    preset: str | None = None,
    fresh: bool = False,
    tags: dict[str, str] | None = None,
) -> RunHandle:
    """Probe the store, then create the run or reuse the newest one with this ``run_key`` (unless ``fresh``).

    ``tags`` are added to the standard ones (:func:`run_tags`), e.g. ``mlflow.parentRunId`` for a sweep's trial.
    """
    from mlflow.entities import Param, RunTag

    uri = resolve_uri(cfg.tracking.uri)
    probe(uri)
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp_id = _experiment_id(client, cfg.tracking.experiment, uri)
    found: list[Any] = []
    if not fresh:
        escaped = run_key.replace("'", "\\'")
        found = client.search_runs(
            [exp_id],
            filter_string=f"tags.`{RUN_KEY_TAG}` = '{escaped}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
    params = flatten(to_dict(cfg))
    if found:
        run = found[0]
        run_id, resumed = run.info.run_id, True
        client.update_run(run_id, status="RUNNING")
        old = run.data.params
        changed = {k: (old[k], v) for k, v in params.items() if k in old and old[k] != v}
        if changed:  # params are immutable in MLflow: keep the first value, say what changed
            log.warning("config changed since MLflow run %s started (kept the old params): %s", run_id, changed)
            client.set_tag(run_id, "rgnet.config_changed_on_resume", json.dumps(sorted(changed))[:5000])
        params = {k: v for k, v in params.items() if k not in old}
    else:
        run = client.create_run(
            exp_id, run_name=cfg.train.run_name, tags={**run_tags(cfg, preset, run_key), **(tags or {})}
        )
        run_id, resumed = run.info.run_id, False
    items = list(params.items())
    for i in range(0, len(items), 100):  # log_batch takes at most 100 params
        client.log_batch(run_id, params=[Param(k, v[:6000]) for k, v in items[i : i + 100]])
    if resumed:
        client.log_batch(run_id, tags=[RunTag("git_commit_resumed", git_commit())])
    log_text(client, run_id, to_yaml(cfg), "config.yaml")
    return RunHandle(uri, exp_id, run_id, resumed)


def log_text(client: Any, run_id: str, text: str, artifact_file: str) -> None:
    client.log_text(run_id, text, artifact_file)


def finish(handle: RunHandle, status: str) -> None:
    try:
        handle.client().set_terminated(handle.run_id, status)
    except Exception as e:  # never mask the error that ended the run
        log.warning("could not mark MLflow run %s %s: %s", handle.run_id, status, e)


# ---------------------------------------------------------------------------------------------------------------
# Epoch metrics: exactly once
# ---------------------------------------------------------------------------------------------------------------
def read_history(checkpoint: ray.train.Checkpoint) -> list[dict[str, Any]]:
    """The epoch history stored in a Ray checkpoint (read through its filesystem: local, NFS or object store)."""
    fs, path = checkpoint.filesystem, checkpoint.path
    assert fs is not None
    with fs.open_input_stream(f"{path.rstrip('/')}/{HISTORY_FILE}") as f:
        return list(json.loads(f.read().decode()))


class EpochLogger(ray.train.UserCallback):
    """Logs rank 0's epochs to the MLflow run from the Ray Train controller; see the module docstring."""

    def __init__(self, uri: str, run_id: str, total_epochs: int) -> None:
        self.uri, self.run_id, self.total_epochs = uri, run_id, total_epochs
        self._client: Any = None
        self._logged: set[int] | None = None
        self._nodes: set[str] = set()
        self._failures = 0

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = None  # rebuilt in the controller process
        return state

    def client(self) -> Any:
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(self.uri)
        return self._client

    def logged_epochs(self) -> set[int]:
        """Epochs MLflow holds (the marker metric's steps); read once, then kept up to date here."""
        if self._logged is None:
            self._logged = {int(m.step) for m in self.client().get_metric_history(self.run_id, EPOCH_KEY)}
        return self._logged

    def log_history(self, history: Iterable[dict[str, Any]]) -> list[int]:
        """Log every epoch of ``history`` that MLflow does not hold; returns the epochs logged now."""
        from mlflow.entities import Metric

        done = self.logged_epochs()
        new = []
        for entry in sorted(history, key=lambda e: int(e["epoch"])):
            epoch = int(entry["epoch"])
            if epoch in done:
                continue
            ts = int(time.time() * 1000)
            metrics = [
                Metric(metric_key(k), float(v), ts, epoch)
                for k, v in entry.items()
                if k != EPOCH_KEY and isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) != float("inf")
            ]
            metrics.append(Metric(EPOCH_KEY, float(epoch), ts, epoch))  # the marker, in the same batch
            for i in range(0, len(metrics), 1000):
                self.client().log_batch(self.run_id, metrics=metrics[i : i + 1000])
            done.add(epoch)
            new.append(epoch)
        return new

    def after_report(
        self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: ray.train.Checkpoint | None
    ) -> None:
        try:
            nodes = {str(m["node_id"]) for m in metrics if "node_id" in m}
            if not nodes <= self._nodes:
                self._nodes |= nodes
                self.client().set_tag(self.run_id, "rgnet.worker_nodes", ",".join(sorted(self._nodes)))
            if checkpoint is not None:
                self.log_history(read_history(checkpoint))
        except Exception as e:  # a tracking hiccup must not kill training; the driver reconciles at the end
            self._logged = None
            print(f"warning: MLflow logging failed after a report ({type(e).__name__}: {e}); retried later", flush=True)

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        self._failures += 1
        ranks = ", ".join(f"rank {r}: {type(e).__name__}" for r, e in sorted(worker_exceptions.items()))
        print(f"worker failure {self._failures} ({ranks}); Ray Train restarts from the last checkpoint", flush=True)
        try:
            self.client().set_tag(self.run_id, "rgnet.worker_failures", str(self._failures))
        except Exception as e:
            print(f"warning: could not tag the MLflow run: {e}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Artifacts after training
# ---------------------------------------------------------------------------------------------------------------
def plot_history(history: list[dict[str, Any]], out_dir: Path, selection_metric: str) -> list[Path]:
    """PNG plots of the training losses and validation metrics over epochs: :func:`rgnet.eval.plots.epoch_curves`."""
    from rgnet.eval.plots import epoch_curves  # matplotlib is imported only when plots are made

    return epoch_curves(history, out_dir, selection_metric)


def register_model(handle: RunHandle, model_name: str, best_epoch: int, artifact_path: str) -> str | None:
    """Register the run's model folder as a version of ``model_name``, once per (run, best epoch): a resumed run
    whose best checkpoint did not change reuses its version.  Returns the ``models:/name/version`` URI."""
    client = handle.client()
    try:
        for mv in client.search_model_versions(f"run_id = '{handle.run_id}'"):
            if mv.name == model_name and mv.tags.get("best_epoch") == str(best_epoch):
                return f"models:/{model_name}/{mv.version}"
        try:
            client.get_registered_model(model_name)
        except Exception:
            client.create_registered_model(model_name)
        mv = client.create_model_version(
            model_name,
            source=f"runs:/{handle.run_id}/{artifact_path}",
            run_id=handle.run_id,
            tags={"best_epoch": str(best_epoch)},
        )
        return f"models:/{model_name}/{mv.version}"
    except Exception as e:  # a store without a model registry: the runs:/ URI still works
        log.warning("could not register the model in MLflow's registry: %s", e)
        return None
