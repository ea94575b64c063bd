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

What MLflow's UI shows, and where it comes from here:

* experiments created here carry ``mlflow.experimentKind = custom_model_development`` (:func:`ensure_experiment`);
  MLflow 3.17's own UI decides between its GenAI and model-training views from a sidebar switch kept per browser
  (``?workflowType=machine_learning`` in the URL sets it), so every link printed here carries that parameter
  (:func:`run_url`);
* the Source column: MLflow's standard ``mlflow.source.*`` tags (:func:`source_tags`: command, git commit, branch,
  dirty flag);
* the Dataset column: each split a run trains or evaluates on, logged as an MLflow dataset input
  (:func:`log_datasets`; the digest is described in :func:`split_digest`);
* the Models column: the best checkpoint as an MLflow model (:mod:`pipelines.mlflow_model`).

MLflow metric names cannot contain ``@``: ``R1@0.3`` is logged as ``R1_at_0.3`` (:func:`metric_key`).
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import logging
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray.train
import ray.tune

from pipelines.common import SetupError
from rgnet.config import Config, to_dict, to_yaml

log = logging.getLogger("rgnet.tracking")

EPOCH_KEY = "epoch"  # marker metric: its steps are the epochs MLflow holds
RUN_KEY_TAG = "rgnet.run_key"
HISTORY_FILE = "history.json"
PROBE_TIMEOUT_S = 5.0
# The experiment tag MLflow 3's UI reads for an experiment's kind, and the kind of a model-training experiment (the
# values of the UI's ExperimentKind enum, also what its own "experiment type" selector writes).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"
UI_VIEW_PARAM = "workflowType=machine_learning"  # MLflow 3.17's UI: open the model-training view, not GenAI
DATASET_CONTEXT_TAG = "mlflow.data.context"  # train / val / test on a dataset input
HASHED_EDGE_BYTES = 1 << 20  # a feature file's digest covers its size and its first and last MiB


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
                f"the URI (tracking.uri=URI; predict/evaluate: --tracking-uri), or log to a local store, sqlite:///ABS/PATH/mlflow.db"
            ) from e
        if body != "OK":
            raise TrackingError(f"{url} answered {body!r}, not an MLflow tracking server's 'OK'")


def ui_command(uri: str) -> str:
    """The command that opens the MLflow UI on this store (a server URI is already a UI)."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri} --port 5000"


def run_url(uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """The UI address of a run (or of the experiment), in MLflow 3's model-training view.

    A local store is served by :func:`ui_command` on port 5000; a server URI is its own UI."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    page = f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{base}/{page}?{UI_VIEW_PARAM}"


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


def _git(*args: str) -> str | None:
    here = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_commit() -> str:
    """The commit of the code that runs, ``-dirty`` when tracked files changed (``unknown`` outside a git checkout,
    e.g. in a Ray job's working dir)."""
    head = _git("rev-parse", "HEAD")
    if not head:
        return "unknown"
    return head + ("-dirty" if _git("status", "--porcelain", "--untracked-files=no") else "")


def source_tags(command: str) -> dict[str, str]:
    """MLflow's standard source tags (what the UI's Source column and run page show) for code run as ``command``, and
    ``mlflow.user``.

    ``mlflow.source.name`` is the rgnet command; the git tags describe the checkout this package runs from and are
    absent where there is none (a Ray job's uploaded working dir)."""
    from mlflow.entities import SourceType
    from mlflow.utils import mlflow_tags as t

    tags = {t.MLFLOW_SOURCE_TYPE: SourceType.to_string(SourceType.LOCAL), t.MLFLOW_SOURCE_NAME: command}
    with contextlib.suppress(KeyError, OSError):  # no user name for this uid (some containers)
        tags[t.MLFLOW_USER] = getpass.getuser()  # the UI's "Created by"
    head = _git("rev-parse", "HEAD")
    if head:
        tags[t.MLFLOW_GIT_COMMIT] = head
        tags[t.MLFLOW_GIT_DIRTY] = str(bool(_git("status", "--porcelain", "--untracked-files=no"))).lower()
        branch = _git("rev-parse", "--abbrev-ref", "HEAD")
        if branch and branch != "HEAD":
            tags[t.MLFLOW_GIT_BRANCH] = branch
        remote = _git("config", "--get", "remote.origin.url")
        if remote:
            tags[t.MLFLOW_GIT_REPO_URL] = remote
    return tags


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class RunHandle:
    uri: str
    experiment_id: str
    run_id: str
    resumed: bool  # an existing run (of an interrupted or finished attempt) was reused
    # context (train / val / test) -> (name, digest) of the datasets logged as the run's inputs (log_datasets)
    datasets: dict[str, tuple[str, str]] = field(default_factory=dict)

    def client(self) -> Any:
        from mlflow import MlflowClient

        return MlflowClient(self.uri)


def ensure_experiment(client: Any, name: str, uri: str) -> str:
    """The id of experiment ``name``, created if absent, tagged as a model-training experiment.

    An existing experiment without a kind gets the tag; one whose kind a user chose in the UI keeps it."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if EXPERIMENT_KIND_TAG not in exp.tags:
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
        return str(exp.experiment_id)
    db = sqlite_path(uri)
    # With a SQLite store MLflow would put artifacts under ./mlruns of whichever directory the driver runs in (a
    # Ray job's is temporary): keep them next to the database instead.
    location = (db.parent / "mlartifacts" / name).as_uri() if db is not None else None
    try:
        return str(
            client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: TRAINING_KIND})
        )
    except Exception:  # another driver created it in between
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return str(exp.experiment_id)


def run_tags(cfg: Config, preset: str | None, run_key: str, command: str) -> dict[str, str]:
    return {
        RUN_KEY_TAG: run_key,
        **source_tags(command),
        "layout": cfg.data.layout,
        "preset": preset or "none",
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
    command: str = "rgnet train",
) -> RunHandle:
    """Probe the store, then create the run or reuse the newest one with this ``run_key`` (unless ``fresh``).

    ``tags`` are added to the standard ones (:func:`run_tags`), e.g. ``mlflow.parentRunId`` for a sweep's trial;
    ``command`` is the run's ``mlflow.source.name``.
    """
    from mlflow.entities import Param, RunTag

    uri = resolve_uri(cfg.tracking.uri)
    probe(uri)
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp_id = ensure_experiment(client, cfg.tracking.experiment, uri)
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
            exp_id, run_name=cfg.train.run_name, tags={**run_tags(cfg, preset, run_key, command), **(tags or {})}
        )
        run_id, resumed = run.info.run_id, False
    items = list(params.items())
    for i in range(0, len(items), 100):  # log_batch takes at most 100 params
        client.log_batch(run_id, params=[Param(k, v[:6000]) for k, v in items[i : i + 100]])
    if resumed:  # the code that continues the run (the source tags name the code that started it)
        client.log_batch(run_id, tags=[RunTag("rgnet.resumed_at_commit", git_commit())])
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
# Datasets: what a run trained and evaluated on (the runs table's Dataset column)
# ---------------------------------------------------------------------------------------------------------------
def _edges_hash(path: Path, h: Any) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}:{size}\n".encode())
    with path.open("rb") as f:
        h.update(f.read(HASHED_EDGE_BYTES))
        if size > 2 * HASHED_EDGE_BYTES:
            f.seek(size - HASHED_EDGE_BYTES)
            h.update(f.read(HASHED_EDGE_BYTES))
        elif size > HASHED_EDGE_BYTES:
            h.update(f.read())


DIGEST_COVERS = (
    "sha256 of the annotation file's bytes, then of each feature file's name, size and first and last MiB (for a "
    "folder of per-clip .pt files: each file's name and size); paths are not hashed"
)


def split_digest(split: Any) -> tuple[str, list[str]]:
    """A content digest of one opened split (:class:`rgnet.data.dataset.SplitData`) and the files it covers.

    The annotation file is hashed whole (the split's records: tens of MB at most); a feature file only by its name,
    size and first and last MiB, since MAD's features are tens of GB: replacing a feature file or changing its size
    changes the digest, an in-place edit of its middle bytes does not.  Paths are left out, so a copy of the same
    data elsewhere (another node, another mount) has the same digest.
    """
    h = hashlib.sha256()
    with Path(split.annotation_path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    files = [str(split.annotation_path)]
    seen: set[Path] = set()
    for store in (split.videos, split.texts, split.sentences):
        path = None if store is None else Path(store.path)
        if path is None or path in seen:
            continue
        seen.add(path)
        files.append(str(path))
        if path.is_dir():
            for clip in sorted(path.glob("*.pt")):
                h.update(f"{clip.name}:{clip.stat().st_size}\n".encode())
        elif path.is_file():
            _edges_hash(path, h)
    return h.hexdigest()[:16], files


def dataset_input(split: Any, context: str) -> Any:
    """The MLflow dataset input of one split: name ``<data root name>/<split>``, the annotation file as its source,
    the digest of :func:`split_digest`, row counts in the profile, ``mlflow.data.context`` = ``context``."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    digest, files = split_digest(split)
    files = [str(Path(f).resolve()) for f in files]
    profile = {
        "num_rows": len(split.records),
        "num_videos": len({r.video_key for r in split.records}),
        "dropped_rows": dict(split.dropped),
        "files": files,
        "digest": DIGEST_COVERS,
    }
    dataset = Dataset(
        name=f"{Path(split.root).name}/{split.split}",
        digest=digest,
        source_type="local",
        source=json.dumps({"uri": files[0]}),  # the annotation file, absolute
        profile=json.dumps(profile),
    )
    return DatasetInput(dataset, tags=[InputTag(DATASET_CONTEXT_TAG, context)])


def log_datasets(handle: RunHandle, splits: dict[str, Any]) -> None:
    """Log ``splits`` (context -> opened split) as the run's dataset inputs; MLflow keeps one input per dataset
    name and digest, so a resumed run logs nothing new unless the data changed."""
    inputs = [dataset_input(split, context) for context, split in splits.items()]
    handle.client().log_inputs(handle.run_id, datasets=inputs)
    handle.datasets.update({context: (d.dataset.name, d.dataset.digest) for context, d in zip(splits, inputs)})


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
# Sweeps: child-run statuses decided from Tune's account of each trial (pipelines.sweep)
# ---------------------------------------------------------------------------------------------------------------
def trial_outcome(error: str | None, epochs: int, total_epochs: int) -> tuple[str, dict[str, str]]:
    """(MLflow status, tags) of a trial's child run: FAILED when it raised, FINISHED when it reported all its epochs
    (whether it returned or ASHA stopped it at ``max_t`` right after the last one), KILLED when stopped earlier --
    tagged ``rgnet.stopped_early`` when it had reported an epoch (ASHA only stops trials on their results)."""
    if error is not None:
        return "FAILED", {"rgnet.error": error[:4000]}
    if epochs >= total_epochs:
        return "FINISHED", {}
    return "KILLED", ({"rgnet.stopped_early": "true"} if epochs > 0 else {})


def settle_run(client: Any, run_id: str, status: str, tags: dict[str, str], error: str | None = None) -> None:
    """Set the child run's final status and tags (idempotent); an error's full text becomes ``error.txt``."""
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    if status != "KILLED" and client.get_run(run_id).data.tags.get("rgnet.stopped_early"):
        client.delete_tag(run_id, "rgnet.stopped_early")  # a restored trial that went on to finish
    if error is not None:
        client.log_text(run_id, error, "error.txt")
    client.set_terminated(run_id, status)


class TrialRunStatus(ray.tune.Callback):
    """Tune callback in the sweep driver: when a trial ends, its MLflow child run gets the status
    :func:`trial_outcome` gives (why the trial cannot set it itself: :mod:`pipelines.sweep`).  Holds only plain
    data, so it pickles into Tune's saved state."""

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, total_epochs: int) -> None:
        self.uri = uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.total_epochs = total_epochs

    def child_run(self, client: Any, trial_id: str) -> str | None:
        parent = f"tags.`mlflow.parentRunId` = '{self.parent_run_id}'"
        runs = client.search_runs(
            [self.experiment_id], filter_string=f"{parent} and tags.`rgnet.trial_id` = '{trial_id}'", max_results=1
        )
        return runs[0].info.run_id if runs else None

    def settle(self, trial_id: str, epochs: int, error: str | None, total_epochs: int | None = None) -> str | None:
        """Mark the child run of ``trial_id``; returns the status set (None when the trial opened no run)."""
        from mlflow import MlflowClient

        client = MlflowClient(self.uri)
        run_id = self.child_run(client, trial_id)
        if run_id is None:
            return None
        status, tags = trial_outcome(error, epochs, total_epochs or self.total_epochs)
        settle_run(client, run_id, status, tags, error)
        return status

    def _settle_trial(self, trial: Any, error: str | None) -> None:
        last = trial.last_result or {}
        epochs = int(last.get("epoch", last.get("training_iteration", 0)) or 0)
        total = int((trial.config or {}).get("train.epochs", self.total_epochs))  # a space may sweep the epochs
        try:
            self.settle(trial.trial_id, epochs, error, total)
        except Exception as e:  # MLflow trouble must not stop the sweep; the runs stay as they are
            log.warning("could not set the MLflow status of trial %s: %s", trial.trial_id, e)

    # the Tune callback hooks (ray.tune.Callback's signatures)
    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._settle_trial(trial, None)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        err = trial.get_error()
        self._settle_trial(trial, str(err) if err is not None else "the trial failed (no error text recorded)")


def mark_unfinished_children(parent: Any) -> int:
    """Child runs still RUNNING when ``Tuner.fit`` has returned belong to no running trial: after Ctrl-C, trials Tune
    resumes on restore (which reopens their runs); otherwise trials Tune ended without a result or a callback.  Mark
    them KILLED.  Returns how many were marked."""
    client = parent.client()
    children = client.search_runs(
        [parent.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.run_id}' and attributes.status = 'RUNNING'",
        max_results=10000,
    )
    for run in children:
        client.set_terminated(run.info.run_id, "KILLED")
    return len(children)


# ---------------------------------------------------------------------------------------------------------------
# Artifacts after training
# ---------------------------------------------------------------------------------------------------------------
def plot_history(history: list[dict[str, Any]], out_dir: Path, selection_metric: str) -> list[Path]:
    """PNG plots of the training losses and validation metrics over epochs: :func:`rgnet.eval.plots.epoch_curves`."""
    from rgnet.eval.plots import epoch_curves  # matplotlib is imported only when plots are made

    return epoch_curves(history, out_dir, selection_metric)


def register_model(handle: RunHandle, model_name: str, model_id: str, best_epoch: int) -> str | None:
    """Register the run's logged model ``model_id`` as a version of ``model_name``, once per (run, best epoch): a
    resumed run whose best checkpoint did not change reuses its version.  Returns the ``models:/name/version`` URI.

    The steps of ``mlflow.register_model("models:/<model id>", name)`` with an explicit client: the version points at
    the logged model's files and its run, and the logged model lists the version (``mlflow.modelVersions``; MLflow's
    SQL registry keeps no model id on a version)."""
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    client = handle.client()
    try:
        for mv in client.search_model_versions(f"run_id = '{handle.run_id}'"):
            if mv.name == model_name and mv.tags.get("best_epoch") == str(best_epoch):
                return f"models:/{model_name}/{mv.version}"
        try:
            client.get_registered_model(model_name)
        except Exception:
            client.create_registered_model(model_name)
        logged = client.get_logged_model(model_id)
        # source = the logged model's storage location, not "models:/<model id>": MLflow's SQL registry resolves the
        # latter through the process-wide tracking URI (a TODO in its code), i.e. in the wrong store here.
        mv = client.create_model_version(
            model_name,
            source=logged.artifact_location,
            run_id=handle.run_id,
            model_id=model_id,
            tags={"best_epoch": str(best_epoch)},
        )
        # an MLflow server records the version on the logged model itself; a direct SQLite client does not
        versions = json.loads(client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
        entry = {"name": mv.name, "version": mv.version}
        if not any(v.get("name") == mv.name and str(v.get("version")) == str(mv.version) for v in versions):
            client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([*versions, entry])})
        return f"models:/{model_name}/{mv.version}"
    except Exception as e:  # a store without a model registry: the runs:/ URI still works
        log.warning("could not register the model in MLflow's registry: %s", e)
        return None
