"""Clusters of their own: a two-node ``ray.cluster_utils.Cluster`` (workers spread over the nodes); a ``ray start
--head`` on loopback that runs the smoke job through the Jobs SDK, interrupted and resubmitted; and the same head with
a second node joined by ``ray start --address``, over which the job's two Ray Train workers spread."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_ports

from pipelines.tracking import EPOCH_KEY, RUN_KEY_TAG

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parent.parent
GCS_OF: dict[str, str] = {}  # Jobs address of a head started here -> its GCS address (what `ray start --address` joins)


def _runs(uri: str, key: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("rgnet")
    if exp is None:
        return []
    return list(client.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'"))


def _epochs(uri: str, run_id: str, key: str = EPOCH_KEY) -> list[int]:
    from mlflow import MlflowClient

    return sorted(int(m.step) for m in MlflowClient(uri).get_metric_history(run_id, key))


def _values(uri: str, run_id: str, key: str = "resumed_after_epoch") -> list[float]:
    from mlflow import MlflowClient

    return [m.value for m in sorted(MlflowClient(uri).get_metric_history(run_id, key), key=lambda m: m.step)]


@pytest.mark.timeout(420)
def test_two_node_cluster_spreads_the_workers(tmp_path: Path) -> None:
    result = tmp_path / "result.json"
    dashboard, agent = free_ports(2)  # the head's two fixed-default ports; Ray binds the others itself (port 0)
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "ray_cluster_driver.py"), str(tmp_path), str(result), str(dashboard),
         str(agent)],
        cwd=REPO, capture_output=True, text=True, timeout=400, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = json.loads(result.read_text())
    assert len(out["nodes"]) == 2
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (run,) = _runs(uri, f"{tmp_path / 'ray_results'}/tiny")
    worker_nodes = run.data.tags["rgnet.worker_nodes"].split(",")
    assert sorted(worker_nodes) == out["nodes"], "the two workers did not run on two different nodes"
    assert _epochs(uri, run.info.run_id) == [1, 2]
    assert run.info.status == "FINISHED"


@pytest.fixture
def ray_head() -> Iterator[str]:
    """``ray start --head`` on loopback; yields the Jobs address.  Every port the head listens on is given, all
    from one free_ports call (distinct, and none of Ray's defaults, which the session's Ray holds).  Torn down by
    killing the processes this fixture started (never `ray stop`, which stops every Ray of the user on the
    machine)."""
    # the head has token auth on (the default for local clusters): conftest sets RAY_AUTH_MODE=token and the token
    temp_dir = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))  # short: Ray's socket paths live under it
    log_path = temp_dir / "ray_start.log"
    gcs_port, dash, agent_http, agent_grpc, runtime_env, metrics, client = free_ports(7)
    args = [
        "--head", "--num-cpus=2", f"--port={gcs_port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
        f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
        f"--ray-client-server-port={client}", f"--temp-dir={temp_dir}",
    ]  # fmt: skip
    address = f"http://127.0.0.1:{dash}"
    GCS_OF[address] = f"127.0.0.1:{gcs_port}"
    with _ray_start(args, log_path) as proc:
        from ray.job_submission import JobSubmissionClient

        deadline = time.monotonic() + 300  # a bound, not a speed check
        while True:
            try:
                JobSubmissionClient(address).list_jobs()  # the Jobs API answers once the dashboard is up
                break
            except Exception as e:
                if proc.poll() is not None or time.monotonic() > deadline:
                    text = log_path.read_text()[-3000:]
                    raise RuntimeError(f"the Ray head at {address} did not answer ({e!r}):\n{text}") from e
                time.sleep(1)
        yield address


@contextlib.contextmanager
def _ray_start(args: list[str], log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``ray start --block --node-ip-address=127.0.0.1 *args`` in a process group of its own, this interpreter's
    folder first on PATH (``python`` in a job entrypoint resolves with it), its output in ``log_path``.  On exit the
    group is stopped (:func:`_stop_tree`) and the log's folder, the node's temporary folder, removed."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    cmd = ["ray", "start", "--block", "--node-ip-address=127.0.0.1", *args]
    log = open(log_path, "w")  # noqa: SIM115  # closed below
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        _stop_tree(proc.pid)
        log.close()
        shutil.rmtree(log_path.parent, ignore_errors=True)


def _stop_tree(pgid: int) -> None:
    """SIGTERM, then SIGKILL, to the process group ``pgid``: `ray start` and every Ray process it started."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            os.killpg(pgid, 0)  # raises ProcessLookupError once the group is empty
            time.sleep(0.5)
        os.killpg(pgid, signal.SIGKILL)


def _wait_status(client: object, job_id: str, wanted: set[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = str(client.get_job_status(job_id))  # type: ignore[attr-defined]
        if status.split(".")[-1] in wanted:
            return status.split(".")[-1]
        time.sleep(1)
    logs = client.get_job_logs(job_id)  # type: ignore[attr-defined]
    raise AssertionError(f"job {job_id} did not reach {wanted}; logs:\n{logs[-5000:]}")


@pytest.fixture
def two_node_head(ray_head: str) -> Iterator[str]:
    """``ray_head`` plus a second node (`ray start --address` on loopback, 1 CPU); yields the Jobs address."""
    from ray.job_submission import JobSubmissionClient

    gcs = GCS_OF[ray_head]
    log_path = Path(tempfile.mkdtemp(prefix="rw", dir="/tmp")) / "ray_worker.log"
    agent_http, agent_grpc, runtime_env, metrics = free_ports(4)  # never one of the head's (free_ports' registry)
    args = [
        f"--address={gcs}", "--num-cpus=1",
        f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
    ]  # fmt: skip
    with _ray_start(args, log_path) as proc:
        client = JobSubmissionClient(ray_head)
        deadline = time.monotonic() + 300  # a bound, not a speed check
        while _alive_nodes(client) < 2:  # the second raylet has registered with the head
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the second node did not join:\n" + log_path.read_text())
            time.sleep(2)
        yield ray_head


COUNT_NODES = "import ray; ray.init(); print('N=%d' % sum(n['Alive'] for n in ray.nodes()))"


def _alive_nodes(client: object) -> int:
    job = client.submit_job(  # type: ignore[attr-defined]
        entrypoint=f'{sys.executable} -c "{COUNT_NODES}"'
    )
    _wait_status(client, job, {"SUCCEEDED", "FAILED", "STOPPED"}, 60)
    logs = client.get_job_logs(job)  # type: ignore[attr-defined]
    return next((int(line[2:]) for line in logs.splitlines() if line.startswith("N=")), 0)


@pytest.mark.timeout(600)
def test_jobs_on_two_nodes_interrupted_and_resubmitted(two_node_head: str, tmp_path: Path) -> None:
    """`ray start --head` + `ray start --address` on loopback; the smoke job through the Jobs SDK with its two Ray
    Train workers on the two nodes (STRICT_SPREAD; the MLflow run's ``rgnet.worker_nodes`` tag lists the nodes that
    reported).  Its driver is stopped (`ray job stop`) after the first checkpoint, and the same job submitted again
    resumes from that checkpoint into the same MLflow run, every epoch logged once."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(two_node_head)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    entrypoint = (
        f"{sys.executable} -m pipelines.train --smoke-test --no-test tracking.uri={uri} train.epochs=3 "
        f"data.root={tmp_path / 'data'} train.output_dir={tmp_path / 'runs'} "
        f"ray.storage_path={tmp_path / 'ray_results'} train.progress=false ray.num_workers=2 ray.cpus_per_worker=0.5 "
        "ray.placement_strategy=STRICT_SPREAD"
    )
    runtime_env = {
        "working_dir": str(REPO),
        # anchored: an unanchored "data/" also drops rgnet/data/, which the driver then imports from wherever the
        # package is installed (another checkout's copy, mixed with this one's)
        "excludes": ["/data/", "/runs/", "mlflow.db", "mlartifacts/", ".git/", "*.egg-info/", ".mypy_cache/"],
        "env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "120"},
    }
    key = f"{tmp_path / 'ray_results'}/tiny-smoke"

    first = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    deadline = time.monotonic() + 300
    while not (_runs(uri, key) and _epochs(uri, _runs(uri, key)[0].info.run_id)):
        assert time.monotonic() < deadline, client.get_job_logs(first)[-5000:]
        assert client.get_job_status(first).value in ("PENDING", "RUNNING"), client.get_job_logs(first)[-5000:]
        time.sleep(0.3)
    client.stop_job(first)  # SIGTERM, then SIGKILL: the driver dies without cleaning up
    assert _wait_status(client, first, {"STOPPED", "FAILED", "SUCCEEDED"}, 60) == "STOPPED"
    (run,) = _runs(uri, key)
    done = _epochs(uri, run.info.run_id)
    assert done and max(done) < 3
    assert run.info.status in ("KILLED", "RUNNING")  # KILLED if the driver had time to say so before SIGKILL

    second = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    status = _wait_status(client, second, {"SUCCEEDED", "FAILED", "STOPPED"}, 400)
    assert status == "SUCCEEDED", client.get_job_logs(second)[-5000:]
    logs = client.get_job_logs(second)
    assert "resuming Ray Train run" in logs and f"resuming after epoch {max(done)}" in logs
    (run,) = _runs(uri, key)  # the same MLflow run, reused
    assert run.info.status == "FINISHED"
    assert _epochs(uri, run.info.run_id) == [1, 2, 3]
    assert _epochs(uri, run.info.run_id, "train/loss") == [1, 2, 3]
    resumed = dict(zip(_epochs(uri, run.info.run_id, "resumed_after_epoch"), _values(uri, run.info.run_id)))
    assert resumed[max(done) + 1] == max(done)  # the epoch after the interruption ran from its checkpoint
    assert len(set(run.data.tags["rgnet.worker_nodes"].split(","))) == 2, run.data.tags
