"""Driver for tests/test_ray_cluster.py, run in a subprocess: a two-node ``ray.cluster_utils.Cluster`` (1 CPU per
node) of its own, then ``rgnet train`` on the tiny preset with 2 workers spread over the nodes.

    python tests/ray_cluster_driver.py TMP_DIR RESULT_JSON

A subprocess because a process joins one Ray cluster at a time and the test session already has its own.
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(tmp: Path, result_path: Path) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from pipelines.train import run_ray
    from rgnet.config import load_config

    # free ports for the head's dashboard and agent: the test session's Ray holds the defaults
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "dashboard_port": _free_port(), "dashboard_agent_listen_port": _free_port()},
    )
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        cfg = load_config(
            "tiny",
            overrides=[
                f"data.root={tmp / 'data'}",
                f"train.output_dir={tmp / 'runs'}",
                f"ray.storage_path={tmp / 'ray_results'}",  # one machine: the local disk is the shared storage
                f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
                "train.progress=false",
                "train.epochs=1",
                "ray.placement_strategy=SPREAD",  # 2 workers x 0.5 CPU would otherwise pack onto one node
            ],
        )
        out = run_ray(cfg, test=False)
        result_path.write_text(json.dumps({"nodes": nodes, "run_id": out["run_id"], "best_epoch": out["best_epoch"]}))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
