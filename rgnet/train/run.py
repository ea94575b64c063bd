"""Training runs in one process (``rgnet train --local``) and what every run prints: the per-epoch progress line
and where the time went.  Plain PyTorch: the distributed run (``pipelines/trainer.py``) prints the same lines.

``train_local`` writes ``train.output_dir/train.run_name/``: ``config.yaml``, ``last.pt`` and ``best.pt`` (checkpoint
payloads, ``rgnet.train.checkpoint``), ``history.json``, ``best_val_report.json``, ``best_val_predictions.jsonl``,
``report_{val,test}.json``, ``predictions_{val,test}.jsonl`` and ``plots/{loss,val}.png``.  Re-running resumes from
``last.pt``; ``fresh`` starts over.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rgnet.config import Config, save_yaml
from rgnet.data.dataset import open_split
from rgnet.data.samples import TrainBatches
from rgnet.data.synthetic import ensure_configured_dataset
from rgnet.eval.metrics import format_table
from rgnet.eval.predictions import write_predictions
from rgnet.io import atomic_write_json
from rgnet.model import build_model
from rgnet.train import checkpoint as ckpt
from rgnet.train.loop import (
    EpochResult,
    TrainState,
    evaluate_model,
    fit,
    resolve_device,
    seed_everything,
    set_threads,
)

log = logging.getLogger("rgnet.train")

PROGRESS_METRICS = ("retrieval_R1", "R1@0.3", "R1@0.5", "R5@0.3", "mIoU")


def progress_line(epoch: int, epochs: int, train: dict[str, float], val: dict[str, float], is_best: bool) -> str:
    """One line per epoch: loss, pairs/s (of all workers), seconds, the validation metrics when validated."""
    line = f"epoch {epoch}/{epochs}: loss {train['loss']:.4f}  {train['pairs_per_s']:.1f} pairs/s  "
    line += f"{train['seconds']:.1f} s"
    shown = [k for k in PROGRESS_METRICS if k in val]
    if shown:
        line += "  val " + "  ".join(f"{k} {val[k]:.2f}" for k in shown) + ("  (best)" if is_best else "")
    return line


# history.json keeps bare names; these prefixes are the training ones (the rest are validation metrics)
TRAIN_KEYS = ("loss", "pairs_per_s", "queries_per_s", "lr", "steps", "seconds")


def named_history(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A local run's history (bare names: ``loss*``, rates, ``lr``, ``steps``, ``seconds`` and the validation
    metrics under their report names) under the names a distributed ``rgnet train`` run logs (``train/loss``,
    ``val/R1@0.3``, ...), so plots and the MLflow UI treat both alike."""
    return [
        {"epoch": h["epoch"]}
        | {(f"train/{k}" if k.startswith(TRAIN_KEYS) else f"val/{k}"): v for k, v in h.items() if k != "epoch"}
        for h in history
    ]


def write_epoch_plots(history: list[dict[str, Any]], out_dir: Path, selection_metric: str) -> list[Path]:
    """Per-epoch curves of a local run (``loss.png``, ``val.png``) from its history (see :func:`named_history`)."""
    from rgnet.eval.plots import epoch_curves

    rows = named_history(history)
    return epoch_curves(rows, out_dir, selection_metric) if rows else []


def train_local(cfg: Config, *, fresh: bool = False, test: bool = True) -> dict[str, Any]:
    """Train in one process; returns the final reports and the time split. Files land in ``output_dir/run_name``."""
    t_start = time.perf_counter()
    ensure_configured_dataset(cfg.data)
    run_dir = Path(cfg.train.output_dir) / cfg.train.run_name
    if fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, run_dir / "config.yaml")

    train_data = open_split(cfg.data, cfg.data.train_split)
    val_data = open_split(cfg.data, cfg.data.val_split)
    device = resolve_device(cfg.train.device)
    threads = set_threads(cfg.train.threads, os.cpu_count() or 1)
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model, cfg.data.video_dim, cfg.data.text_dim).to(device)
    ckpt.init_weights_from(model, cfg.train, cfg.model)  # train.init_from (fine-tuning); a resume replaces it
    batches = TrainBatches(train_data, windows=cfg.windows, train=cfg.train, loss=cfg.loss)
    if batches.num_batches() == 0:
        raise ValueError(
            f"{len(train_data.records)} training queries make no full batch of train.batch_size={cfg.train.batch_size}"
        )
    last = run_dir / "last.pt"
    payload = ckpt.load_checkpoint(last) if last.exists() else None
    if payload is not None:
        log.info("resuming %s from %s (epoch %d)", cfg.train.run_name, last, payload["epoch"])
    log.info(
        "training %s on %s (%d torch threads): %d train / %d val queries, %d steps per epoch of %d queries, %d epochs",
        cfg.train.run_name,
        device,
        threads,
        len(train_data.records),
        len(val_data.records),
        batches.num_batches(),
        cfg.train.batch_size,
        cfg.train.epochs,
    )

    def on_epoch_end(result: EpochResult, state: TrainState, p: dict[str, Any]) -> None:
        if result.is_best:
            ckpt.save_checkpoint(p, run_dir / "best.pt")
            assert result.val_rows is not None and result.val_report is not None
            write_predictions(run_dir / "best_val_predictions.jsonl", result.val_rows)
            atomic_write_json(run_dir / "best_val_report.json", {"epoch": result.epoch, **result.val_report})
        ckpt.save_checkpoint(p, last)  # after best.pt: a crash in between never loses the best
        atomic_write_json(run_dir / "history.json", state.history)
        val = result.val_report["metrics"] if result.val_report else {}
        print(progress_line(result.epoch, cfg.train.epochs, result.train, val, result.is_best), flush=True)

    t_fit = time.perf_counter()
    final = fit(
        model, cfg, batches.epoch, batches.num_batches(), val_data, device, payload=payload, on_epoch_end=on_epoch_end
    )
    fit_s = time.perf_counter() - t_fit
    write_epoch_plots(final.history, run_dir / "plots", cfg.train.selection_metric)

    best_model, _ = ckpt.load_model(run_dir / "best.pt", device)
    out: dict[str, Any] = {}
    splits = [("val", val_data)]
    if test and cfg.data.test_split and cfg.data.test_split != cfg.data.val_split:
        splits.append(("test", open_split(cfg.data, cfg.data.test_split)))
    out.update(evaluate_best(best_model, splits, cfg, device, run_dir)[0])
    print(f"\nrun folder: {run_dir}\n  evaluate again: rgnet evaluate --checkpoint {run_dir / 'best.pt'} --split val")
    history = [{f"train/{k}": v for k, v in h.items()} for h in final.history]
    final_s = time.perf_counter() - t_fit - fit_s
    out["time"] = time_split(history, 0.0, fit_s, final_s, time.perf_counter() - t_start)
    print(format_time_split(out["time"], local=True), flush=True)
    return out


def evaluate_best(
    model: Any, splits: Sequence[tuple[str, Any]], cfg: Config, device: Any, run_dir: Path, label: str = ""
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The best checkpoint's model on each ``(name, split)``: ``report_<name>.json`` and ``predictions_<name>.jsonl``
    in ``run_dir`` and the metric table printed; returns the reports by name and the printed tables.  The one rule
    of a run's final evaluation, local (``train_local``) or distributed (``pipelines.trainer``); ``label``: what
    follows "best checkpoint" in a table's title (e.g. the epoch)."""
    reports: dict[str, dict[str, Any]] = {}
    tables = []
    for name, data in splits:
        report, rows = evaluate_model(model.to(device), data, cfg.windows, cfg.eval, device)
        atomic_write_json(run_dir / f"report_{name}.json", report)
        write_predictions(run_dir / f"predictions_{name}.jsonl", rows)
        table = f"{name} split ({data.split}), best checkpoint{label}:\n{format_table(report)}"
        print("\n" + table, flush=True)
        reports[name] = report
        tables.append(table)
    return reports, tables


def time_split(
    history: list[dict[str, Any]], ray_start_s: float, fit_s: float, final_s: float, total_s: float
) -> dict[str, float]:
    """Where a run's wall time went, from the driver's clocks and the epochs' own (``train/seconds``: the steps,
    ``train/data_wait_s``: of which waiting for batches, ``train/eval_s``: validation).  Only the epochs this attempt
    trained are summed (a resumed run's history also holds the earlier attempts' epochs)."""
    attempt = history[-1].get("resumed_after_epoch", 0) if history else 0
    mine = [h for h in history if h.get("resumed_after_epoch", 0) == attempt]
    steps = sum(float(h.get("train/seconds", 0.0)) for h in mine)
    wait = sum(float(h.get("train/data_wait_s", 0.0)) for h in mine)
    val = sum(float(h.get("train/eval_s", 0.0)) for h in mine)
    return {
        "total_s": total_s,
        "setup_s": max(0.0, total_s - ray_start_s - fit_s - final_s),  # data checks, MLflow run, Ray job set-up
        "ray_start_s": ray_start_s,
        "train_run_s": fit_s,
        "compute_s": steps - wait,
        "data_wait_s": wait,
        "validation_s": val,
        "workers_checkpoints_other_s": max(0.0, fit_s - steps - val),
        "final_evaluation_s": final_s,
    }


def format_time_split(t: dict[str, float], *, local: bool = False) -> str:
    """One line; ``local``: a run in this process (no Ray start, no workers to start)."""
    head = "training" if local else f"Ray start {t['ray_start_s']:.0f} s + Ray Train run"
    other = "checkpoints" if local else "worker start + checkpoints + reports"
    return (
        f"time: total {t['total_s']:.0f} s = set-up {t['setup_s']:.0f} s + {head} {t['train_run_s']:.0f} s (compute "
        f"{t['compute_s']:.0f} s, waiting for data {t['data_wait_s']:.1f} s, validation {t['validation_s']:.0f} s, "
        f"{other} {t['workers_checkpoints_other_s']:.0f} s) + final evaluation and logging "
        f"{t['final_evaluation_s']:.0f} s"
    )
