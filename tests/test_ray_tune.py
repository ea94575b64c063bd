"""The smoke sweep end to end: Optuna + ASHA over 4 trials, interrupted after 2 finished trials and restored.

One test covers the sweep acceptance list, because a sweep is minutes on this 2-core machine: the sweep runs in a
subprocess (its own local Ray, as a user's `rgnet tune` would), is interrupted with SIGINT (Ctrl-C) once two trials
have finished, and the same command then restores it and finishes the remaining trials only.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from rgnet.config import load_config
from rgnet.search_space import load_space
from rgnet.train.run import train_local

SMOKE_EPOCHS = int(load_space(Path(__file__).resolve().parents[1] / "tune_spaces" / "smoke.yaml").fixed["train.epochs"])

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent


def sweep_command(tmp: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipelines.tune",
        "--space",
        "smoke",
        "--trials",
        "4",
        "--name",
        "smoke",
        f"--best-out={tmp / 'best.yaml'}",
        f"data.root={tmp / 'data'}",
        f"train.output_dir={tmp / 'runs'}",
        f"ray.storage_path={tmp / 'ray_results'}",
        f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
        "ray.num_workers=1",
        "train.progress=false",
    ]


def children(tmp: Path) -> list[Any]:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    exp = client.get_experiment_by_name("rgnet")
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in runs if "mlflow.parentRunId" in r.data.tags]


TERMINATED_ROW = re.compile(r"(trial_driver_[0-9a-f]+)\s+TERMINATED")


def logged_epochs(client: Any, run_id: str) -> list[int]:
    return sorted(int(m.step) for m in client.get_metric_history(run_id, "epoch"))


def terminated(log: str) -> set[str]:
    """Trials Tune reports as finished (TERMINATED: ran to the end, or stopped by ASHA) in its status tables."""
    return set(TERMINATED_ROW.findall(log))


@pytest.mark.timeout(900)
def test_smoke_sweep_interrupted_restored(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    first_log = tmp_path / "first.log"
    with first_log.open("w") as out:
        proc = subprocess.Popen(
            sweep_command(tmp_path), cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        # 1. Ctrl-C once Tune reports two finished trials
        deadline = time.monotonic() + 420
        while time.monotonic() < deadline and proc.poll() is None and len(terminated(first_log.read_text())) < 2:
            time.sleep(1)
        assert proc.poll() is None, f"the sweep ended before it could be interrupted:\n{first_log.read_text()[-4000:]}"
        assert len(terminated(first_log.read_text())) >= 2, first_log.read_text()[-4000:]
        os.kill(proc.pid, signal.SIGINT)  # Tune saves the sweep state and returns; the driver exits 130
        try:
            rc = proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    first = first_log.read_text()
    assert rc == 130, first[-4000:]
    assert "interrupted after" in first
    done_before = terminated(first)
    assert 2 <= len(done_before) < 4, done_before
    runs_before = {r.data.tags["rgnet.trial_id"]: r for r in children(tmp_path)}

    # 2. the same command restores the sweep and finishes it
    second = subprocess.run(sweep_command(tmp_path), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-6000:]
    assert "restoring sweep" in out
    # finished trials are not re-run: none of them runs again after the restore ...
    rerun = {t for t in done_before if re.search(rf"{t}\s+(RUNNING|PENDING)", out)}
    assert not rerun, rerun
    assert terminated(out) >= done_before and len(terminated(out)) == 4

    runs = children(tmp_path)
    trial_ids = [r.data.tags["rgnet.trial_id"] for r in runs]
    assert len(runs) == 4 and len(set(trial_ids)) == 4, trial_ids  # one child run per trial, none duplicated
    by_trial = {r.data.tags["rgnet.trial_id"]: r for r in runs}
    for name in done_before:  # ... and their MLflow runs are the same runs, with no new epochs
        tid = name.removeprefix("trial_driver_")
        assert by_trial[tid].info.run_id == runs_before[tid].info.run_id
        assert by_trial[tid].data.metrics.get("epoch") == runs_before[tid].data.metrics.get("epoch")
    lrs = {r.data.params["optim.lr"] for r in runs}
    assert len(lrs) == 4  # distinct points
    parents = {r.data.tags["mlflow.parentRunId"] for r in runs}
    assert len(parents) == 1  # one parent run, found again on restore

    summary = json.loads((tmp_path / "sweep.json").read_text())
    assert len(summary["trials"]) == 4
    assert any(t["stopped_early"] for t in summary["trials"]), summary["trials"]  # ASHA stopped a poor trial
    # every child run tells the truth: all epochs -> FINISHED, stopped by ASHA -> KILLED and tagged, none FAILED;
    # MLflow and the summary count the same trials as stopped early
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = children(tmp_path)
    for run in runs:
        epochs = logged_epochs(client, run.info.run_id)
        completed = epochs == list(range(1, SMOKE_EPOCHS + 1))
        assert run.info.status == ("FINISHED" if completed else "KILLED"), (run.info.run_name, epochs)
        assert (run.data.tags.get("rgnet.stopped_early") == "true") == (not completed), run.data.tags
    stopped = {t["trial_id"] for t in summary["trials"] if t["stopped_early"]}
    assert stopped == {r.data.tags["rgnet.trial_id"] for r in runs if r.info.status == "KILLED"}
    # one "best" in the console: Tune's last "Current best trial" is the summary's best trial
    best_id = summary["best"]["trial_id"]
    assert re.findall(r"Current best trial: (\w+) with", out)[-1] == best_id
    assert f"best trial: {best_id} (the lowest train/loss at its last reported epoch" in out
    # no TensorBoard logger ("Summary name ... is illegal"), no sweep settings in Tune's tables, no CSV/TB files
    for text in (first, out):
        assert "is illegal" not in text and "__sweep__" not in text
    results = tmp_path / "ray_results" / "smoke"
    assert not list(results.rglob("events.out.tfevents*")) and not list(results.rglob("progress.csv"))
    assert len(list(results.rglob("result.json"))) == 4

    parent = client.get_run(parents.pop())
    assert parent.info.status == "FINISHED"
    assert any(k.startswith("best.") for k in parent.data.params)
    plots = {f.path for f in client.list_artifacts(parent.info.run_id, "plots")}
    assert "plots/optimization_history.png" in plots and "plots/metric_vs_optim_lr.png" in plots

    # 3. the best config is a preset `rgnet train --config` accepts, and it trains
    cfg = load_config(
        config_file=tmp_path / "best.yaml", overrides=["train.epochs=1", f"train.output_dir={tmp_path / 'again'}"]
    )
    assert cfg.optim.lr == pytest.approx(summary["best"]["point"]["optim.lr"])
    reports = train_local(cfg, test=False)
    assert "val" in reports
