"""``rgnet bench --data``: the Ray Data training pipeline against reading the same global batches in one process.

1. Throughput: one consumer (as one Ray Train worker holding a whole global batch) iterates epochs of training steps
   from the Ray Data pipeline (``pipelines.data.WorkerSteps``: map tasks read each step's drawn windows, texts and
   negatives and collate them; rows arrive in step order, read ahead while the consumer works), timed after a
   warm-up epoch (the first epoch also starts the map worker processes); the baseline is the local loader
   (``rgnet.data.samples.TrainBatches``), which reads the same steps straight from HDF5 in this process.  Same
   batches (the same seeded plan, bit for bit); the ratio Ray / one process is printed.
2. Memory: Ray Data runs under an object-store budget (``--budget-mib``, set as the execution's
   ``resource_limits``); the rows of an epoch add up to several times that budget.  A sampler thread records the
   peak RSS (VmHWM) of every Ray worker process of this Ray and the object store in use.

Numbers are printed and written as JSON.  Runs on the embedded default's synthetic dataset unless ``--preset``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _proc_tree() -> dict[int, int]:
    """pid -> parent pid of every process (from /proc)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class WorkerMemory:
    """Samples the Ray worker processes under ``root_pid`` (the raylet) and the object store every ``period`` s."""

    def __init__(self, root_pid: int, period: float = 0.25) -> None:
        self.root_pid, self.period = root_pid, period
        self.peak_kib: dict[int, int] = {}  # pid -> VmHWM (peak RSS since the process started)
        self.names: dict[int, str] = {}
        self.store_peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        import ray

        parents = _proc_tree()
        for pid in parents:
            p, depth = pid, 0
            while p in parents and p != self.root_pid and depth < 10:
                p, depth = parents[p], depth + 1
            if p != self.root_pid or pid == self.root_pid:
                continue
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                if not cmd.startswith("ray::"):
                    continue
                self.peak_kib[pid] = max(self.peak_kib.get(pid, 0), _status_kib(pid, "VmHWM"))
                if cmd != "ray::IDLE":
                    self.names[pid] = cmd
            except OSError:
                continue
        total, free = ray.cluster_resources(), ray.available_resources()
        used = total.get("object_store_memory", 0.0) - free.get("object_store_memory", 0.0)
        self.store_peak = max(self.store_peak, used)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.period)

    def __enter__(self) -> WorkerMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def summary(self) -> dict[str, Any]:
        peaks = sorted(self.peak_kib.items(), key=lambda kv: -kv[1])
        return {
            "worker_processes": len(peaks),
            "peak_worker_rss_mib": peaks[0][1] / 1024 if peaks else 0.0,
            "peak_worker": self.names.get(peaks[0][0], "ray::IDLE") if peaks else None,
            "peak_rss_mib_by_worker": {f"{self.names.get(pid, 'ray::IDLE')} ({pid})": kib / 1024 for pid, kib in peaks},
            "peak_object_store_used_mib": self.store_peak / 2**20,
        }


def _timed_epochs(batches_of_epoch: Any, epochs: list[int]) -> dict[str, float]:
    queries = steps = 0
    t0 = time.perf_counter()
    for epoch in epochs:
        for batch in batches_of_epoch(epoch):
            queries += int(batch["text"].shape[0])
            steps += 1
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "steps": steps, "queries": queries, "queries_per_s": queries / max(seconds, 1e-9)}


def run_data_bench(
    *, preset: str | None = None, overrides: Sequence[str] = (), budget_mib: float = 16.0, epochs: int = 2
) -> dict[str, Any]:
    """Time ``epochs`` epochs (after a warm-up one) of the Ray Data pipeline under an object-store budget of
    ``budget_mib`` against the local loader, on the dataset of ``preset`` with ``overrides``; returns every number."""
    import ray
    import ray.data
    import torch

    from pipelines.data import WorkerSteps
    from pipelines.runtime import resolve_paths
    from rgnet.config import load_config
    from rgnet.data.dataset import open_split
    from rgnet.data.samples import TrainBatches
    from rgnet.data.synthetic import ensure_configured_dataset

    cfg = resolve_paths(load_config(preset, None, ["ray.data_workers=2", *overrides]))
    ensure_configured_dataset(cfg.data)
    torch.set_num_threads(1)  # the consumer and the baseline: one thread each (collation is the only torch work)
    data = open_split(cfg.data, cfg.data.train_split)
    local = TrainBatches(data, windows=cfg.windows, train=cfg.train, loss=cfg.loss)
    steps = local.num_batches()
    timed_epochs = list(range(1, 1 + epochs))
    print(f"dataset {cfg.data.root}: {len(data.records)} train queries, {steps} global batches of "
          f"{cfg.train.batch_size} per epoch", flush=True)  # fmt: skip

    # Baseline: the local loader in this process (HDF5 hyperslab reads of each step's drawn windows).
    _timed_epochs(local.epoch, [0])  # warm-up: page cache and imports, as the Ray side gets
    base = _timed_epochs(local.epoch, timed_epochs)
    epoch_bytes = sum(sum(t.numel() * t.element_size() for t in b.values()) for b in local.epoch(0))
    print(f"  one process, straight from HDF5: {base['queries_per_s']:.1f} queries/s", flush=True)

    budget = int(budget_mib * 2**20)
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20, log_to_driver=False)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.execution_options.resource_limits = ray.data.ExecutionResources(object_store_memory=budget)
        node = ray._private.worker._global_node  # this process started the local Ray: its raylet is ours
        assert node is not None
        raylet = node.all_processes["raylet"][0].process.pid

        stream = WorkerSteps(cfg, cfg.data.train_split, 0, 1 + epochs, 0, 1, steps)  # one dataset, all epochs
        with stream, WorkerMemory(raylet) as memory:
            warm = _timed_epochs(stream.epoch, [0])
            timed = _timed_epochs(stream.epoch, timed_epochs)
        mem = memory.summary()
    finally:
        ray.shutdown()
    ratio = timed["queries_per_s"] / base["queries_per_s"]
    # The stream reads ahead while the consumer is slow (the first epoch, which starts the map workers): with a
    # small dataset the timed epochs may already be in the object store, so the whole stream's rate, start-up
    # included, is reported beside the steady one.
    whole_s = warm["seconds"] + timed["seconds"]
    whole = {"seconds": whole_s, "queries": warm["queries"] + timed["queries"],
             "queries_per_s": (warm["queries"] + timed["queries"]) / max(whole_s, 1e-9)}  # fmt: skip
    whole_ratio = whole["queries_per_s"] / base["queries_per_s"]
    print(f"  Ray Data ({cfg.ray.data_workers} map tasks x {cfg.ray.data_cpus:g} CPU, 1 consumer): "
          f"{timed['queries_per_s']:.1f} queries/s after the first epoch (which starts the map workers: "
          f"{warm['queries_per_s']:.1f}); ratio Ray / one process = {ratio:.2f} after the first epoch, "
          f"{whole_ratio:.2f} over all {1 + epochs} epochs with the start-up", flush=True)  # fmt: skip
    print(f"  memory: an epoch's batches = {epoch_bytes / 2**20:.1f} MiB = {epoch_bytes / budget:.1f}x the Ray Data "
          f"budget of {budget_mib:g} MiB; peak object store in use {mem['peak_object_store_used_mib']:.1f} MiB; "
          f"peak worker RSS {mem['peak_worker_rss_mib']:.0f} MiB ({mem['peak_worker']}, {mem['worker_processes']} "
          f"worker processes)", flush=True)  # fmt: skip
    return {
        "machine": {"cpus": os.cpu_count(), "torch_threads": 1},
        "dataset": {
            "root": cfg.data.root,
            "train_queries": len(data.records),
            "batch_size": cfg.train.batch_size,
            "batches_per_epoch": steps,
            "epoch_batches_mib": epoch_bytes / 2**20,
        },
        "budget_mib": budget_mib,
        "dataset_to_budget": epoch_bytes / budget,
        "one_process_hdf5": base,
        "ray_data_first_epoch": warm,
        "ray_data": timed,
        "ray_to_one_process": ratio,
        "ray_data_whole_stream": whole,
        "ray_to_one_process_whole_stream": whole_ratio,
        "memory": mem,
    }
