"""One training step, one epoch, one evaluation, and the epoch loop with resume, in plain PyTorch.

Device-agnostic: CPU, or CUDA with bf16/fp16 autocast (fp16 adds a GradScaler).  The same loop runs in one local
process (``rgnet train --local``, :data:`~rgnet.train.distributed.SOLO`) and inside every Ray Train worker
(pipelines/train_worker.py), which passes a wrapped (DDP) model, its part of every global step, the step group of
its ranks and an ``on_epoch_end`` hook that reports to Ray; this module knows nothing of Ray.

A step (:func:`train_step`) takes the rank's part of a global batch (``rgnet.data.samples.collate_shard``), builds
the pair-sharded model batch (``assemble_step``, gathering the other ranks' positive windows), computes the rank's
share of the global loss (``Criterion(..., shard)``) and backpropagates ``world x share``: DDP averages gradients over
ranks, so the update is the gradient of the one-process loss.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from rgnet.config import Config, EvalConfig, OptimConfig, WindowConfig
from rgnet.data.dataset import SplitData
from rgnet.data.samples import assemble_step, shard_slice
from rgnet.eval.inference import predict_split
from rgnet.eval.metrics import evaluate_with
from rgnet.eval.predictions import PredictionRow
from rgnet.model import Criterion
from rgnet.model.criterion import QueryShard
from rgnet.train.distributed import SOLO, StepGroup

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name} but CUDA is not available here; use train.device=cpu or auto")
    return device


def set_threads(threads: int, default: int) -> int:
    """Fix this process's torch thread count (``train.threads``; 0 = ``default``) and return it.

    Results depend on it (floating-point summation order), so it is set explicitly in every training process and
    stated in the logs; two processes that must agree bit for bit need the same count.
    """
    n = threads if threads > 0 else max(1, default)
    torch.set_num_threads(n)
    return n


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms and embeddings (1-D parameters and learned tokens)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "token" in name or "anchor" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule: linear warm-up, then x lr_gamma at each epoch in lr_drop_epochs (released: MultiStepLR)."""
    milestones = sorted(cfg.lr_drop_epochs)
    per_epoch = max(1, steps_per_epoch)

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
        epoch = step // per_epoch
        return warm * cfg.lr_gamma ** sum(epoch >= m for m in milestones)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    if device.type == "cuda" and precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@dataclass
class TrainState:
    """What resume needs besides the state dicts."""

    epoch: int = 0  # finished epochs
    global_step: int = 0
    best_metric: float = -math.inf
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class EpochResult:
    epoch: int  # 1-based number of the finished epoch
    train: dict[str, float]  # mean losses over the epoch, plus lr and throughput
    val_report: dict[str, Any] | None
    val_rows: list[PredictionRow] | None
    is_best: bool


def train_step(
    model: nn.Module,
    criterion: Criterion,
    shard: dict[str, Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: Config,
    device: torch.device,
    scaler: torch.amp.GradScaler,
    group: StepGroup = SOLO,
) -> dict[str, float]:
    """One optimizer step on a global batch of which this rank holds ``shard``; returns the global batch's losses
    (the same numbers on every rank, and the same as one process computing the whole batch) and its pair count."""
    model.train()
    b = cfg.train.batch_size
    part = shard_slice(b, group.rank, group.world)
    batch = assemble_step(
        to_device(shard, device), cfg.loss.negatives, offset=part.start, num_queries=b, gather=group.gather
    )
    with autocast_context(device, cfg.train.precision):
        out = model(batch)
    gather = group.gather_grad if group.world > 1 else None
    shares = criterion(out, batch, QueryShard(part.start, b, gather))  # losses in fp32 (outside autocast)
    names = sorted(k for k in shares if k != "loss")
    local = torch.stack([shares["loss"].detach(), *(shares[k] for k in names)]).float()
    pairs = torch.tensor([float(batch["pair_window"].numel())], device=local.device)
    totals = group.sum(torch.cat([local, pairs])).tolist()  # global losses, identical on every rank
    losses = {"loss": totals[0], **dict(zip(names, totals[1:-1]))}
    if not math.isfinite(losses["loss"]):  # decided on the global value: every rank raises, none waits
        raise FloatingPointError(f"non-finite loss {losses['loss']} ({losses})")
    optimizer.zero_grad(set_to_none=True)
    # DDP averages gradients over the ranks; the shares add up to the loss, so each rank backpropagates world x share
    scaler.scale(shares["loss"] * group.world).backward()
    if cfg.optim.grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return {**losses, "pairs": totals[-1]}


def train_epoch(
    model: nn.Module,
    criterion: Criterion,
    batches: Iterable[dict[str, Tensor]],
    num_batches: int,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: Config,
    device: torch.device,
    scaler: torch.amp.GradScaler,
    state: TrainState,
    *,
    progress: bool = False,
    desc: str = "train",
    group: StepGroup = SOLO,
) -> dict[str, float]:
    """One epoch; returns the mean losses of its steps, the lr, the global throughput (queries and pairs per
    second of the whole group) and where the time went: ``data_wait_s`` waiting for batches, ``seconds`` in all."""
    sums: dict[str, float] = {}
    pairs = queries = steps = 0
    data_wait = 0.0
    t0 = time.perf_counter()
    it: Iterator[dict[str, Tensor]] = iter(batches)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=num_batches, desc=desc, unit="step", leave=False, dynamic_ncols=True)
    while True:
        t_wait = time.perf_counter()
        batch = next(it, None)
        data_wait += time.perf_counter() - t_wait
        if batch is None:
            break
        losses = train_step(model, criterion, batch, optimizer, scheduler, cfg, device, scaler, group)
        state.global_step += 1
        steps += 1
        pairs += int(losses.pop("pairs"))
        queries += cfg.train.batch_size
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + v
        if bar is not None:
            rate = pairs / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(loss=f"{sums['loss'] / steps:.3f}", pairs_s=f"{rate:.1f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    result = {k: v / max(steps, 1) for k, v in sums.items()}
    result.update(
        lr=float(optimizer.param_groups[0]["lr"]),
        steps=float(steps),
        seconds=seconds,
        data_wait_s=data_wait,
        queries_per_s=queries / max(seconds, 1e-9),
        pairs_per_s=pairs / max(seconds, 1e-9),
    )
    return result


def evaluate_model(
    model: nn.Module,
    data: SplitData,
    windows: WindowConfig,
    eval_cfg: EvalConfig,
    device: torch.device,
    *,
    progress: bool = False,
    group: StepGroup = SOLO,
) -> tuple[dict[str, Any], list[PredictionRow]]:
    """Two-stage inference on a whole split and the metric report (same evaluator as ``rgnet evaluate``): windows cut
    by the ``windows`` section, inference and metrics as the ``eval`` section says.

    With several ranks each predicts every ``world``-th video (inference is per video and deterministic, so the rows
    equal one process's) and every rank gets all rows (a collective: all ranks call it).  Rows are in the split's
    record order.
    """
    from rgnet.train.checkpoint import unwrap

    bare = unwrap(model)
    was_training = bare.training
    records = data.records
    if group.world > 1:
        videos = list(dict.fromkeys(r.video_key for r in data.records))
        mine = set(videos[group.rank :: group.world])
        records = [r for r in data.records if r.video_key in mine]
    rows = list(predict_split(bare, data, windows, eval_cfg, device, records=records, progress=progress))  # type: ignore[arg-type]
    bare.train(was_training)
    if group.world > 1:
        rows = [row for part in group.gather_objects(rows) for row in part]
    order = {r.query_id: i for i, r in enumerate(data.records)}
    rows.sort(key=lambda row: order[row.query_id])
    return evaluate_with(rows, data.records, eval_cfg, f"{data.split} predictions"), rows


def fit(
    model: nn.Module,
    cfg: Config,
    train_batches: Callable[[int], Iterable[dict[str, Tensor]]],
    num_batches: int,
    val_data: SplitData | None,
    device: torch.device,
    *,
    payload: dict[str, Any] | None = None,
    on_epoch_end: Callable[[EpochResult, TrainState, dict[str, Any]], None] | None = None,
    make_payload: Callable[..., dict[str, Any]] | None = None,
    group: StepGroup = SOLO,
) -> TrainState:
    """Train ``cfg.train.epochs`` epochs, validating every ``eval_every`` epochs, resuming from ``payload``.

    ``train_batches(epoch)`` yields this rank's parts of the epoch's global steps (0-based epoch; ``group`` the ranks
    sharing them, every rank validates its share of the videos). ``on_epoch_end`` receives the epoch result, the
    train state and a checkpoint payload, and decides what to keep (local files or a Ray checkpoint).
    """
    from rgnet.train import checkpoint as ckpt

    criterion = Criterion(cfg.loss).to(device)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, num_batches)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and cfg.train.precision == "fp16")
    state = TrainState()
    if payload is not None:
        ckpt.unwrap(model).load_state_dict(payload["model"])
        if payload.get("optimizer"):
            optimizer.load_state_dict(payload["optimizer"])
        if payload.get("scheduler"):
            scheduler.load_state_dict(payload["scheduler"])
        if payload.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(payload["scaler"])
        extra = payload.get("metrics", {})
        state = TrainState(
            epoch=int(payload["epoch"]),
            global_step=int(payload["global_step"]),
            best_metric=float(extra.get("best_metric", -math.inf)),
        )
        log.info("resuming after epoch %d (step %d)", state.epoch, state.global_step)
    build = make_payload or ckpt.make_payload
    total = cfg.train.epochs
    for epoch in range(state.epoch, total):
        train_metrics = train_epoch(
            model,
            criterion,
            train_batches(epoch),
            num_batches,
            optimizer,
            scheduler,
            cfg,
            device,
            scaler,
            state,
            progress=cfg.train.progress,
            desc=f"epoch {epoch + 1}/{total}",
            group=group,
        )
        state.epoch = epoch + 1
        report = rows = None
        is_best = False
        due = state.epoch % max(cfg.train.eval_every, 1) == 0 or state.epoch == total
        if val_data is not None and due:
            t_eval = time.perf_counter()
            report, rows = evaluate_model(
                model, val_data, cfg.windows, cfg.eval, device, progress=cfg.train.progress, group=group
            )
            train_metrics["eval_s"] = time.perf_counter() - t_eval
            value = report["metrics"].get(cfg.train.selection_metric)
            if value is None:
                raise KeyError(
                    f"train.selection_metric={cfg.train.selection_metric!r} is not in the report "
                    f"(available: {', '.join(report['metrics'])})"
                )
            if value > state.best_metric:
                state.best_metric, is_best = float(value), True
        result = EpochResult(state.epoch, train_metrics, report, rows, is_best)
        state.history.append({"epoch": state.epoch, **train_metrics, **(report["metrics"] if report else {})})
        if on_epoch_end is not None:
            p = build(
                model,
                cfg,
                epoch=state.epoch,
                global_step=state.global_step,
                optimizer=optimizer,
                scheduler=scheduler,
                scaler=scaler,
                metrics={"best_metric": state.best_metric, **(report or {}).get("metrics", {})},
            )
            on_epoch_end(result, state, p)
    return state
