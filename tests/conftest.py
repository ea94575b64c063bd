"""Shared fixtures. The Ray tests (``-m ray``) share one local Ray for the whole session (start-up costs 10-20 s
here); the tests that need a cluster of their own (multi-node, ``ray start --head`` for Jobs) start it in a
subprocess on free ports, so it never collides with this one."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

# Before anything imports Ray (this module is imported first): no usage-stats prompt, no progress bars in the logs,
# and a worker-group start timeout that a loaded 2-core machine meets (the default of 60 s is tight here).
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "120")
# Token auth is on by default for local clusters (Ray 2.59+); a Jobs client must be told to send the token, and Ray
# reads this once per process (setting it later in a test is too late).
os.environ.setdefault("RAY_AUTH_MODE", "token")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def ray_session() -> Iterator[str]:
    """One local Ray (2 logical CPUs, dashboard on for the State API) for every test that asks; yields its address.

    Its dashboard agent takes Ray's default port (ray.init cannot choose it): the clusters that tests start in
    subprocesses are given free ports for theirs.
    """
    import ray

    ray.init(
        num_cpus=2,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=free_port(),
        object_store_memory=256 * 2**20,
    )
    try:
        yield str(ray.get_runtime_context().gcs_address)
    finally:
        ray.shutdown()
