"""Distributed training on the session's local Ray: 2 Ray Train workers on the tiny preset, MLflow, fault tolerance."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pipelines import evaluate as evaluate_cli
from pipelines import train as train_cli
from pipelines.tracking import EPOCH_KEY, RUN_KEY_TAG

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def overrides(tmp: Path, *extra: str) -> list[str]:
    """Everything a run writes goes under ``tmp``."""
    return [
        f"data.root={tmp / 'data'}",
        f"train.output_dir={tmp / 'runs'}",
        f"ray.storage_path={tmp / 'ray_results'}",
        "train.progress=false",
        *extra,
    ]


def the_run(client: Any, tmp: Path, name: str = "tiny") -> Any:
    """The one MLflow run of the Ray run ``tmp/ray_results/name`` (it fails if there are several)."""
    exp = client.get_experiment_by_name("rgnet")
    key = f"{tmp / 'ray_results'}/{name}"
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def logged_epochs(client: Any, run_id: str, key: str = EPOCH_KEY) -> list[int]:
    return sorted(int(m.step) for m in client.get_metric_history(run_id, key))


def artifacts(client: Any, run_id: str, path: str = "") -> set[str]:
    out = set()
    for f in client.list_artifacts(run_id, path):
        out |= artifacts(client, run_id, f.path) if f.is_dir else {f.path}
    return out


def _run_in_thread(fn: Any, *args: Any, **kwargs: Any) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["out"] = fn(*args, **kwargs)
        except BaseException as e:
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def _wait_for(predicate: Any, timeout: float, what: str, thread: threading.Thread | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if thread is not None and not thread.is_alive():
            raise AssertionError(f"training ended before {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.timeout(600)
def test_two_workers_with_an_mlflow_server_survive_a_sigkilled_worker(
    ray_session: str, tmp_path: Path, mlflow_server: str
) -> None:
    """`rgnet train` with 2 workers on the tiny preset, logging to a real MLflow server. A worker process SIGKILLed
    during epoch 2 restarts the worker group from the last checkpoint; training finishes, the MLflow run holds every
    epoch exactly once, and the logged best model evaluates to the driver's numbers with `rgnet evaluate
    --model-uri` and `--checkpoint`. (One run covers the end-to-end, server and fault acceptance: each Ray Train
    start costs about half a minute on this machine.)"""
    from mlflow import MlflowClient
    from ray.util.state import list_actors

    argv = ["--preset", "tiny", f"tracking.uri={mlflow_server}", *overrides(tmp_path, "train.epochs=4")]
    thread, box = _run_in_thread(train_cli.main, argv)
    client = MlflowClient(mlflow_server)

    def epochs_so_far() -> list[int]:
        exp = client.get_experiment_by_name("rgnet")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        return logged_epochs(client, runs[0].info.run_id) if runs else []

    _wait_for(epochs_so_far, 300, "the first epoch in MLflow", thread)
    workers = list_actors(address=ray_session, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    assert len(workers) == 2
    time.sleep(0.5)  # epoch 2 has started: its data stream and steps run now
    os.kill(workers[1].pid, signal.SIGKILL)
    done_at_kill = max(epochs_so_far())
    assert done_at_kill < 4, "training finished before the kill; the test needs longer epochs"
    thread.join(timeout=450)
    assert not thread.is_alive(), "training did not finish"
    assert "error" not in box, box.get("error")
    assert box["out"] == 0

    # fault tolerance: the group restarted from the checkpoint, every epoch once
    run = the_run(client, tmp_path)
    rid = run.info.run_id
    assert run.info.status == "FINISHED"
    assert int(run.data.tags["rgnet.worker_failures"]) >= 1
    assert logged_epochs(client, rid) == [1, 2, 3, 4]
    for key in ("train/loss", "train/loss_contrastive", "val/R1_at_0.3", "val/mIoU", "val/retrieval_R1"):
        assert logged_epochs(client, rid, key) == [1, 2, 3, 4], key
    run_dir = tmp_path / "runs" / "tiny"
    history = json.loads((run_dir / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    resumed = [h for h in history if h["resumed_after_epoch"] > 0]
    assert resumed, "no epoch ran in a restarted worker group"
    first = resumed[0]
    assert first["resumed_after_epoch"] >= done_at_kill and first["epoch"] == first["resumed_after_epoch"] + 1
    assert all(h["resumed_after_epoch"] == 0 for h in history if h["epoch"] <= done_at_kill)  # not started over

    # what the run logged
    assert run.data.params["model.hidden_dim"] == "32" and run.data.params["ray.num_workers"] == "2"
    assert run.data.params["data.root"] == str(tmp_path / "data")  # resolved, absolute
    tags = run.data.tags
    assert tags["layout"] == "native" and tags["preset"] == "tiny" and tags["mlflow.source.name"] == "rgnet train"
    assert tags["metric_profile"] == "rgnet" and tags["prediction_cap"] == "100" and tags["mlflow.source.git.commit"]
    assert len(tags["rgnet.worker_nodes"].split(",")) == 1  # one local node
    datasets = {d.tags[0].value: d.dataset.name for d in run.inputs.dataset_inputs}
    assert datasets == {"train": "data/train", "val": "data/val", "test": "data/test"}
    (output,) = run.outputs.model_outputs  # the best checkpoint as the run's MLflow model
    model = client.get_logged_model(output.model_id)
    assert model.name == "model" and model.source_run_id == rid and output.step == int(run.data.metrics["best_epoch"])
    model_files = {f.path for f in client.list_logged_model_artifacts(output.model_id, "artifacts")}
    assert {"artifacts/checkpoint.pt", "artifacts/config.yaml"} <= model_files, model_files
    files = artifacts(client, rid)
    assert {
        "config.yaml",
        "plots/loss.png",
        "plots/val.png",
        "best_epoch/best_val_predictions.jsonl",
        "best_epoch/best_val_report.json",
        "reports/report_val.json",
        "reports/metrics.txt",
    } <= files

    report_val = json.loads((run_dir / "report_val.json").read_text())
    best_epoch = int(run.data.metrics["best_epoch"])
    selection = report_val["metrics"]["R1@0.3"]
    # the best epoch's validation, computed by rank 0 during training, is the driver's final evaluation
    at_best = {int(m.step): m.value for m in client.get_metric_history(rid, "val/R1_at_0.3")}
    assert at_best[best_epoch] == pytest.approx(selection) and selection == max(at_best.values())

    sources = [
        ["--model-uri", f"runs:/{rid}/model", "--tracking-uri", mlflow_server],
        ["--checkpoint", str(run_dir / "best.pt")],
    ]
    for source in sources:
        out = tmp_path / "eval.json"
        assert evaluate_cli.main([*source, "--split", "val", "train.progress=false", "--out", str(out)]) == 0
        assert json.loads(out.read_text())["metrics"] == report_val["metrics"], source


# Lines that come from Ray's internals, not from rgnet: a Ray process's forwarded output, Ray Train's result dicts,
# Ray Data's execution plans and progress notes, deprecation and PreemptionWatcher warnings, Ray's own log format.
RAY_CHATTER = (
    r"^\(\w+ pid=\d+",
    r"Reporting training result",
    r"Execution plan of Dataset|Starting execution of Dataset|execution finished in",
    r"Progress bars disabled",
    r"DeprecationWarning|is deprecated",
    r"PreemptionWatcher",
    r"core_worker\.cc|raylet",
    r"^\S+ \S+\s+(INFO|WARNING)\s+\S+\.py:\d+ --",
)


def _smoke_run(folder: Path, data_root: Path) -> tuple[str, dict[str, list[tuple[int, float]]]]:
    """`rgnet train --smoke-test` in a fresh process (its own local Ray, its own MLflow store under ``folder``);
    returns its console (stdout and stderr) and every MLflow metric's history."""
    from mlflow import MlflowClient

    folder.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ADDRESS": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "train", "--smoke-test", f"data.root={data_root}",
         f"ray.storage_path={folder / 'ray_results'}", f"train.output_dir={folder / 'runs'}"],
        cwd=folder, env=env, capture_output=True, text=True, timeout=500, check=False,
    )  # fmt: skip
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-5000:]
    assert proc.stdout.rstrip().splitlines()[-1].startswith("time:"), proc.stdout[-2000:]  # the run's last line
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("rgnet").experiment_id])[0]
    history = {
        key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)] for key in run.data.metrics
    }
    return console, history


TIMING = ("seconds", "per_s", "wait_s", "eval_s")  # wall-clock metrics differ between any two runs


@pytest.mark.timeout(1200)
def test_same_seed_same_metrics_and_a_quiet_console(tmp_path: Path) -> None:
    """Two distributed runs (2 workers, 2 epochs, tiny preset) with the same seed log identical MLflow metrics; the
    console of each holds one progress line per epoch, the tables and no line from Ray's internals."""
    import re

    from rgnet.config import load_config
    from rgnet.data.synthetic import ensure_dataset

    data_root = tmp_path / "data"
    ensure_dataset(load_config("tiny", overrides=[f"data.root={data_root}"]).data)
    first_console, first = _smoke_run(tmp_path / "first", data_root)
    second_console, second = _smoke_run(tmp_path / "second", data_root)
    kept = sorted(k for k in first if not k.endswith(TIMING))
    assert kept and sorted(k for k in second if not k.endswith(TIMING)) == kept
    assert {k: first[k] for k in kept} == {k: second[k] for k in kept}
    for console in (first_console, second_console):
        lines = console.splitlines()
        chatter = [line for line in lines if any(re.search(p, line) for p in RAY_CHATTER)]
        assert not chatter, chatter
        assert [int(m.group(1)) for m in (re.match(r"epoch (\d+)/2: loss", line) for line in lines) if m] == [1, 2]
        assert "test split (test), best checkpoint" in console
