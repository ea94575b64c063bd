"""One training step, one epoch, one evaluation, and the epoch loop with resume, in plain PyTorch.

Device-agnostic: CPU, or CUDA with bf16/fp16 autocast (fp16 adds a GradScaler).  The same loop runs in one local
process (``rgnet train --local``) and inside every Ray Train worker (pipelines/train.py), which passes a wrapped
(DDP) model, its data shard and an ``on_epoch_end`` hook that reports to Ray; this module knows nothing of Ray.
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

from rgnet.config import Config, OptimConfig
from rgnet.data.dataset import SplitData
from rgnet.eval.inference import predict_split
from rgnet.eval.metrics import evaluate_with
from rgnet.eval.predictions import PredictionRow
from rgnet.model import Criterion

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name} but CUDA is not available here; use train.device=cpu or auto")
    return device


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
    batch: dict[str, Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: Config,
    device: torch.device,
    scaler: torch.amp.GradScaler,
) -> dict[str, float]:
    model.train()
    batch = to_device(batch, device)
    with autocast_context(device, cfg.train.precision):
        out = model(batch)
    losses = criterion(out, batch)  # losses in fp32 (outside autocast)
    loss = losses["loss"]
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss.item()} ({ {k: float(v) for k, v in losses.items()} })")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if cfg.optim.grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return {k: float(v.detach()) for k, v in losses.items()}


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
) -> dict[str, float]:
    sums: dict[str, float] = {}
    pairs = queries = steps = 0
    t0 = time.perf_counter()
    it: Iterator[dict[str, Tensor]] = iter(batches)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=num_batches, desc=desc, unit="step", leave=False, dynamic_ncols=True)
    for batch in it:
        losses = train_step(model, criterion, batch, optimizer, scheduler, cfg, device, scaler)
        state.global_step += 1
        steps += 1
        pairs += int(batch["pair_window"].numel())
        queries += int(batch["text"].shape[0])
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
        queries_per_s=queries / max(seconds, 1e-9),
        pairs_per_s=pairs / max(seconds, 1e-9),
    )
    return result


def evaluate_model(
    model: nn.Module, data: SplitData, cfg: Config, device: torch.device, *, progress: bool = False
) -> tuple[dict[str, Any], list[PredictionRow]]:
    """Two-stage inference on a whole split and the metric report (same evaluator as ``rgnet evaluate``)."""
    from rgnet.train.checkpoint import unwrap

    bare = unwrap(model)
    was_training = bare.training
    rows = list(predict_split(bare, data, cfg, device, progress=progress))  # type: ignore[arg-type]
    bare.train(was_training)
    return evaluate_with(rows, data.records, cfg.eval, f"{data.split} predictions"), rows


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
    evaluate_here: bool = True,
) -> TrainState:
    """Train ``cfg.train.epochs`` epochs, validating every ``eval_every`` epochs, resuming from ``payload``.

    ``train_batches(epoch)`` yields the epoch's batches (0-based epoch). ``on_epoch_end`` receives the epoch result,
    the train state and a checkpoint payload, and decides what to keep (local files or a Ray checkpoint).
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
        )
        state.epoch = epoch + 1
        report = rows = None
        is_best = False
        due = state.epoch % max(cfg.train.eval_every, 1) == 0 or state.epoch == total
        if val_data is not None and due and evaluate_here:
            report, rows = evaluate_model(model, val_data, cfg, device, progress=cfg.train.progress)
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
