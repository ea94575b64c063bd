"""Shared fixtures. The Ray tests (``-m ray``) share one local Ray for the whole session (start-up costs 10-20 s
here); the tests that need a cluster of their own (multi-node, ``ray start --head`` for Jobs) start it in a
subprocess on ports from :func:`free_ports`, so it never collides with this one or with another server of the test."""

from __future__ import annotations

import os
import random
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# Before anything imports Ray (this module is imported first): no usage-stats prompt, no progress bars in the logs,
# and a worker-group start timeout that a loaded 2-core machine meets (the default of 60 s is tight here).
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "120")
# Token auth is on by default for local clusters (Ray 2.59+); a Jobs client must be told to send the token, and Ray
# reads this once per process (setting it later in a test is too late).
os.environ.setdefault("RAY_AUTH_MODE", "token")
# One token for every Ray this session starts (the session Ray, `ray start` heads and nodes, ray.cluster_utils
# clusters, job drivers: all inherit the environment). Without it a fresh home has no ~/.ray/auth_token until some
# ray.init() writes one, and `ray start --head` or a cluster_utils head started before that fails to come up.
if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)

# Ports below this are `ray start`'s default worker port range (10002-19999): never hand those out.
LOWEST_PORT = 20000
# Ray's fixed defaults (GCS, dashboard, client server, dashboard agent): the session Ray holds some of them.
RAY_DEFAULT_PORTS = frozenset({6379, 8265, 10001, 52365})
_HANDED_OUT: set[int] = set()  # every port free_ports returned in this process, never returned again


def port_range() -> range:
    """The ports :func:`free_ports` draws from: above Ray's worker ports and below the kernel's ephemeral range.

    A server that binds port 0 (Ray's node manager, object manager and workers, gRPC, any other process on the
    machine) gets a port from the ephemeral range, so between the moment free_ports closes its sockets and the
    moment our server binds the port, nothing that asks the kernel for "any free port" can take it.
    """
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default (there is no /proc on macOS; its range starts at 49152)
    below, above = range(LOWEST_PORT, low), range(high + 1, 65536)
    best = below if len(below) >= len(above) else above
    if len(best) < 1000:
        raise RuntimeError(
            f"the ephemeral port range {low}-{high} leaves fewer than 1000 ports outside it above {LOWEST_PORT}; "
            "narrow net.ipv4.ip_local_port_range"
        )
    return best


def free_ports(
    n: int,
    *,
    rng: random.Random | None = None,
    socket_factory: Callable[[], socket.socket] | None = None,
) -> list[int]:
    """``n`` distinct TCP ports that are free now, for the servers of one test.

    Each candidate is bound (on all interfaces) and its socket is held open until all ``n`` are chosen, so the n
    ports are distinct by construction: a port still held cannot be bound twice. Then all sockets are closed and the
    ports returned. Ports come from :func:`port_range` (outside the ephemeral range) and are never handed out twice
    in a session, so two components of the same test (a head and its second node, a Ray cluster and an MLflow
    server) never share one either. ``rng`` and ``socket_factory`` exist for the test of this helper.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = rng or random.Random()
    make = socket_factory or (lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    ports = port_range()
    held: list[socket.socket] = []
    chosen: list[int] = []
    attempts = 100 * n + 1000
    try:
        while len(chosen) < n:
            if attempts == 0:
                raise RuntimeError(f"found only {len(chosen)} of {n} free ports in {ports.start}-{ports.stop - 1}")
            attempts -= 1
            port = rng.randrange(ports.start, ports.stop)
            if port in _HANDED_OUT or port in RAY_DEFAULT_PORTS:
                continue
            s = make()
            try:
                s.bind(("", port))
            except OSError:  # in use, or held by this call already
                s.close()
                continue
            held.append(s)
            chosen.append(port)
    finally:
        for s in held:
            s.close()
    _HANDED_OUT.update(chosen)
    return chosen


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Markers say what they promise (the fast tier is ``-m "not ray and not slow"``): a test that uses the session's
    Ray is marked ``ray``, and a ``ray`` test is also ``slow`` (starting a Ray alone takes over 5 s here).

    ``gpu`` tests run only when asked for: by an ``-m`` expression that names the marker (``-m gpu``; ``-m "not
    gpu"`` names it to leave them out) or by naming their file or test on the command line.  A plain ``pytest`` or
    the fast tier on a CPU machine does not pick them; a run that asks for them on a machine without CUDA fails
    (tests/test_gpu.py says why).
    """
    if not re.search(r"\bgpu\b", config.getoption("markexpr", "") or ""):
        named = {Path(arg.split("::")[0]).resolve() for arg in config.args if not Path(arg.split("::")[0]).is_dir()}
        unasked = [item for item in items if item.get_closest_marker("gpu") is not None and item.path not in named]
        if unasked:
            config.hook.pytest_deselected(items=unasked)
            items[:] = [item for item in items if item not in unasked]
    wrong = [
        f"{item.nodeid}: uses ray_session but is not marked ray"
        for item in items
        if "ray_session" in getattr(item, "fixturenames", ()) and item.get_closest_marker("ray") is None
    ]
    wrong += [
        f"{item.nodeid}: marked ray but not slow"
        for item in items
        if item.get_closest_marker("ray") is not None and item.get_closest_marker("slow") is None
    ]
    if wrong:
        raise pytest.UsageError("test markers are wrong:\n" + "\n".join(wrong))


@pytest.fixture(scope="session")
def ray_session() -> Iterator[str]:
    """One local Ray (2 logical CPUs, dashboard on for the State API) for every test that asks; yields its address.

    Its dashboard agent takes Ray's default port (ray.init cannot choose it); the clusters that tests start in
    subprocesses are given ports from free_ports for theirs, which never include that default.
    """
    import ray

    (dashboard,) = free_ports(1)
    ray.init(
        num_cpus=2,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=dashboard,
        object_store_memory=256 * 2**20,
    )
    try:
        yield str(ray.get_runtime_context().gcs_address)
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``mlflow server`` on 127.0.0.1 and a port from :func:`free_ports` (SQLite backend, proxied artifacts);
    yields its URL.  One per test module that asks, stopped (its process group) after the module."""
    root = tmp_path_factory.mktemp("mlflow_server")
    (port,) = free_ports(1)
    log = open(root / "server.log", "w")  # noqa: SIM115  # closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
        cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # a bound, not a speed check: a loaded 2-core machine needs minutes
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.read().decode().strip() == "OK":
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
