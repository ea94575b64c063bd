"""Driver for tests/test_ray_cluster.py, run in a subprocess: a two-node ``ray.cluster_utils.Cluster`` (1 CPU per
node) of its own, then ``rgnet train`` on the tiny preset with 2 workers spread over the nodes.

    python tests/ray_cluster_driver.py TMP_DIR RESULT_JSON DASHBOARD_PORT DASHBOARD_AGENT_PORT

The two ports (from the test's free_ports) are the head's only ones with fixed defaults, which the test session's Ray
holds; every other component of both nodes binds a port the kernel chooses (port 0).

A subprocess because a process joins one Ray cluster at a time and the test session already has its own.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(tmp: Path, result_path: Path, dashboard_port: int, agent_port: int) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from pipelines.trainer import train_on_ray
    from rgnet.config import load_config

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "dashboard_port": dashboard_port, "dashboard_agent_listen_port": agent_port},
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
                "train.epochs=2",
                "ray.placement_strategy=SPREAD",  # 2 workers x 0.5 CPU would otherwise pack onto one node
            ],
        )
        out = train_on_ray(cfg, test=False)
        result_path.write_text(json.dumps({"nodes": nodes, "run_id": out["run_id"], "best_epoch": out["best_epoch"]}))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
