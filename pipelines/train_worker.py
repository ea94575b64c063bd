"""The Ray Train per-worker function: one plain dict (the resolved config) in, reports and checkpoints out.

Every worker builds the same model (same seed) and reads, every epoch, its part of each global step from a streaming
Ray Data dataset of its own (``pipelines.data.WorkerSteps``); the training itself is the library's loop
(``rgnet.train.loop.fit``) with the step group of the workers (``rgnet.train.distributed``), so N workers compute the
one-process step (DESIGN section 6).  Every rank validates its share of the videos; rank 0 reports the metrics with a
checkpoint and the other ranks report their node only, so every rank calls ``ray.train.report`` exactly once per
epoch (it is a barrier).  The Ray lines are marked ``# Ray``.

A checkpoint folder holds ``checkpoint.pt`` (``rgnet.train.checkpoint`` payload: state dicts + the resolved config,
loadable with ``weights_only=True``), ``history.json`` (every epoch's metrics of the run so far, which the MLflow
logger reads) and, after a validation, ``val_report.json`` and ``val_predictions.jsonl``.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from rgnet.config import Config, from_dict
from rgnet.data.samples import WindowSpec, collate_train
from rgnet.train.loop import EpochResult, TrainState

SELECTION_SCORE = "selection_score"  # the reported key Ray ranks checkpoints by
VAL_REPORT_FILE = "val_report.json"
VAL_PREDICTIONS_FILE = "val_predictions.jsonl"

# Ray Train workers send the root logger's records to the driver's console; a print() would appear twice there
# (Ray Train tees patched prints).
log = logging.getLogger("rgnet.train.worker")


def selection_score(value: float | None, epoch: int) -> float:
    """The validation metric, minus a tie-breaker so that among equal scores the *earliest* epoch ranks first.

    Ray's checkpoint manager ranks ties by recency (the later one wins); the local loop keeps the first epoch that
    reached the best value.  1e-9 per epoch is far below any metric's resolution (percent of queries).
    Epochs without validation rank last.
    """
    return -math.inf if value is None else float(value) - 1e-9 * epoch


def epoch_entry(result: EpochResult, resumed_after: int) -> dict[str, Any]:
    """One epoch of history: ``train/<loss or rate>``, ``val/<metric>`` (metric names as in the reports) and
    ``resumed_after_epoch``, the checkpoint this worker group started from (0: from scratch; shows restarts)."""
    entry: dict[str, Any] = {"epoch": result.epoch, "resumed_after_epoch": resumed_after}
    entry.update({f"train/{k}": float(v) for k, v in result.train.items()})
    if result.val_report is not None:
        entry.update({f"val/{k}": float(v) for k, v in result.val_report["metrics"].items()})
    return entry


def parameters_without_gradient(model: nn.Module, cfg: Config, fps: float) -> list[str]:
    """Names of trainable parameters that get no gradient in this configuration (one step on a random batch).

    DDP must be told (``find_unused_parameters``) when a configuration leaves parameters out of the graph, e.g. an
    ablation whose loss weight is 0; the default model uses every parameter (tests/test_model.py checks that), so
    the slower unused-parameter search stays off unless this finds one.  The probe draws from the global RNG: call
    it on every rank alike (the caller reseeds afterwards).
    """
    from rgnet.model import Criterion

    spec = WindowSpec.from_config(cfg.windows, fps)
    w, dv, dt = spec.length, cfg.data.video_dim, cfg.data.text_dim
    items = []
    for _ in range(max(2, min(cfg.train.batch_size, 4))):
        item: dict[str, Any] = {
            "video": np.random.randn(w, dv).astype(np.float32),  # (W, Dv)
            "video_len": np.int64(w),
            "text": np.random.randn(4, dt).astype(np.float32),  # (L, Dt)
            "span_cw": np.array([0.5, 0.2], dtype=np.float32),
            "in_frame": np.int64(w // 2),
            "out_frame": np.int64(0),
            "neg_video": np.random.randn(w, dv).astype(np.float32),
            "neg_len": np.int64(w),
            "sentence": np.random.randn(dv).astype(np.float32),  # (Dv,)
        }
        items.append(item)
    batch = collate_train(items, cfg.loss.negatives)
    model.train()
    losses = Criterion(cfg.loss)(model(batch), batch)
    losses["loss"].backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    model.zero_grad(set_to_none=True)
    return missing


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point of every worker; ``config`` is ``rgnet.config.to_dict`` of the resolved config."""
    import ray
    import ray.train
    import ray.train.torch

    from pipelines.common import ray_run_dir
    from pipelines.console import say
    from pipelines.data import WorkerSteps
    from rgnet.data.dataset import open_split
    from rgnet.data.samples import steps_per_epoch
    from rgnet.eval.predictions import write_predictions
    from rgnet.io import atomic_write_json
    from rgnet.model import build_model
    from rgnet.train import checkpoint as ckpt
    from rgnet.train.distributed import step_group
    from rgnet.train.loop import fit, seed_everything, set_threads
    from rgnet.train.run import progress_line

    cfg = from_dict(config)
    worker_cfg = from_dict({"train": {"progress": False}}, cfg)  # per-epoch lines from rank 0 instead of bars
    context = ray.train.get_context()  # Ray
    rank, world = context.get_world_rank(), context.get_world_size()
    node_id = ray.get_runtime_context().get_node_id()  # Ray
    device = ray.train.torch.get_device()  # Ray: cpu, or this worker's GPU
    threads = set_threads(cfg.train.threads, int(cfg.ray.cpus_per_worker))
    group = step_group()  # the workers' step collectives (Ray Train set up torch.distributed)
    run_key = ray_run_dir(cfg)

    train_data = open_split(cfg.data, cfg.data.train_split)  # metadata only: Ray Data tasks read the features
    t = cfg.train
    num_steps = steps_per_epoch(len(train_data.records), t.batch_size, t.max_steps_per_epoch)
    fps = train_data.fps
    train_data.close()
    val_data = open_split(cfg.data, cfg.data.val_split)  # every rank validates its share of the videos
    if rank == 0:
        log.info("worker %d/%d: %d torch threads, %d global steps of %d queries per epoch", rank, world, threads,
                 num_steps, t.batch_size)  # fmt: skip

    seed_everything(t.seed)  # the same initial weights on every rank
    model: nn.Module = build_model(cfg.model, cfg.data.video_dim, cfg.data.text_dim)
    ckpt.init_weights_from(model, cfg.train, cfg.model)  # train.init_from (fine-tuning); a Ray resume replaces it
    unused = parameters_without_gradient(model, cfg, fps)
    if unused and rank == 0:
        more = ", ..." if len(unused) > 5 else ""
        say(run_key, f"warning: {len(unused)} parameters get no gradient in this configuration "
            f"({', '.join(unused[:5])}{more}); DDP searches for unused parameters", log)  # fmt: skip
    model = ray.train.torch.prepare_model(  # Ray: to the device, DDP when world > 1
        model, parallel_strategy_kwargs={"find_unused_parameters": bool(unused)}
    )
    seed_everything(t.seed)  # training draws are keyed per window/query/pair; this covers anything that is not

    payload: dict[str, Any] | None = None
    history: list[dict[str, Any]] = []
    checkpoint = ray.train.get_checkpoint()  # Ray: the latest checkpoint of this run, after a failure or a restart
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            payload = ckpt.load_checkpoint(Path(d) / ckpt.CHECKPOINT_FILE, device)
            history = json.loads((Path(d) / "history.json").read_text())
        if rank == 0:
            say(run_key, f"resuming after epoch {payload['epoch']} of {t.epochs} from {checkpoint.path}", log)
    resumed_after = int(payload["epoch"]) if payload is not None else 0

    # Ray Data: this rank's parts of every remaining global step, one streaming dataset for the rest of the run
    steps = WorkerSteps(cfg, cfg.data.train_split, resumed_after, t.epochs, rank, world, num_steps)

    def on_epoch_end(result: EpochResult, state: TrainState, p: dict[str, Any]) -> None:
        metrics: dict[str, Any] = {"epoch": result.epoch, "rank": rank, "node_id": node_id}
        if rank != 0:
            ray.train.report(metrics)  # Ray: a barrier; every rank reports once per epoch
            return
        entry = epoch_entry(result, resumed_after)
        history.append(entry)
        value = result.val_report["metrics"][t.selection_metric] if result.val_report else None
        with tempfile.TemporaryDirectory() as d:
            ckpt.save_checkpoint(p, Path(d) / ckpt.CHECKPOINT_FILE)
            atomic_write_json(Path(d) / "history.json", history)
            if result.val_report is not None and result.val_rows is not None:
                atomic_write_json(Path(d) / VAL_REPORT_FILE, {"epoch": result.epoch, **result.val_report})
                write_predictions(Path(d) / VAL_PREDICTIONS_FILE, result.val_rows)
            val = result.val_report["metrics"] if result.val_report else {}
            line = progress_line(result.epoch, t.epochs, result.train, val, result.is_best)
            say(run_key, line, log)  # one line per epoch on the driver's console
            ray.train.report(  # Ray: metrics + checkpoint, copied to the run's storage before this returns
                {**metrics, **entry, SELECTION_SCORE: selection_score(value, result.epoch)},
                checkpoint=ray.train.Checkpoint.from_directory(d),
            )

    def make_payload(model: nn.Module, _cfg: Config, **kw: Any) -> dict[str, Any]:
        return ckpt.make_payload(model, cfg, **kw)  # the resolved config, not the worker's progress-off copy

    with steps:
        fit(
            model,
            worker_cfg,
            steps.epoch,
            num_steps,
            val_data,
            device,
            payload=payload,
            on_epoch_end=on_epoch_end,
            make_payload=make_payload,
            group=group,
        )
