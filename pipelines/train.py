"""``rgnet train`` / ``python -m pipelines.train``: train RGNet and evaluate the best checkpoint.

``--local`` trains in this one process (no Ray, no MLflow): checkpoints, the validation predictions of the best
epoch and the metric reports go to ``train.output_dir/train.run_name``.  Re-running the same command resumes from
the last checkpoint of that run (``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

from pipelines.common import add_config_args, config_from_args, run_guarded, setup_logging
from rgnet.config import Config, save_yaml

log = logging.getLogger("rgnet.train")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rgnet train",
        description="Train RGNet on a dataset (synthetic by default, generated on first use) and evaluate it.",
    )
    p.add_argument("--local", action="store_true", help="train in this process only (no Ray, no MLflow)")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint of this run and start over")
    p.add_argument(
        "--no-test", action="store_true", help="skip the final evaluation of the best model on the test split"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_config_args(p)
    return p


def prepare_data(cfg: Config) -> None:
    """Generate the synthetic dataset if the config asks for it and it is absent."""
    if cfg.data.generate_if_missing:
        from rgnet.data.synthetic import ensure_dataset

        ensure_dataset(cfg.data)


def run_local(cfg: Config, *, fresh: bool = False, test: bool = True) -> dict[str, Any]:
    """Train in one process; returns the final reports. Files land in ``output_dir/run_name``."""
    from rgnet.data.dataset import open_split
    from rgnet.data.samples import TrainBatches
    from rgnet.eval.metrics import format_table
    from rgnet.eval.predictions import write_predictions
    from rgnet.io import atomic_write_json
    from rgnet.model import build_model
    from rgnet.train import checkpoint as ckpt
    from rgnet.train.loop import EpochResult, TrainState, evaluate_model, fit, resolve_device, seed_everything

    prepare_data(cfg)
    run_dir = Path(cfg.train.output_dir) / cfg.train.run_name
    if fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, run_dir / "config.yaml")

    train_data = open_split(cfg.data, cfg.data.train_split)
    val_data = open_split(cfg.data, cfg.data.val_split)
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model, cfg.data.video_dim, cfg.data.text_dim).to(device)
    batches = TrainBatches(train_data, cfg)
    if batches.num_batches() == 0:
        raise ValueError(
            f"{len(train_data.records)} training queries make no full batch of train.batch_size={cfg.train.batch_size}"
        )
    last = run_dir / "last.pt"
    payload = ckpt.load_checkpoint(last) if last.exists() else None
    if payload is not None:
        log.info("resuming %s from %s (epoch %d)", cfg.train.run_name, last, payload["epoch"])
    log.info(
        "training %s on %s: %d train / %d val queries, %d steps per epoch, %d epochs",
        cfg.train.run_name,
        device,
        len(train_data.records),
        len(val_data.records),
        batches.num_batches(),
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
        t = result.train
        line = f"epoch {result.epoch}: loss {t['loss']:.4f}  {t['pairs_per_s']:.1f} pairs/s"
        if result.val_report:
            m = result.val_report["metrics"]
            shown = [k for k in ("retrieval_R1", "R1@0.3", "R1@0.5", "R5@0.3", "mIoU") if k in m]
            line += "  val " + "  ".join(f"{k} {m[k]:.2f}" for k in shown) + ("  (best)" if result.is_best else "")
        print(line, flush=True)

    fit(model, cfg, batches.epoch, batches.num_batches(), val_data, device, payload=payload, on_epoch_end=on_epoch_end)

    best_model, _ = ckpt.load_model(run_dir / "best.pt", device)
    out: dict[str, Any] = {}
    splits = [("val", val_data)]
    if test and cfg.data.test_split and cfg.data.test_split != cfg.data.val_split:
        splits.append(("test", open_split(cfg.data, cfg.data.test_split)))
    for name, data in splits:
        report, rows = evaluate_model(best_model.to(device), data, cfg, device)
        atomic_write_json(run_dir / f"report_{name}.json", report)
        write_predictions(run_dir / f"predictions_{name}.jsonl", rows)
        print(f"\n{name} split ({data.split}), best checkpoint:\n{format_table(report)}")
        out[name] = report
    print(f"\nrun folder: {run_dir}\n  evaluate again: rgnet evaluate --checkpoint {run_dir / 'best.pt'} --split val")
    return out


def _main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if not args.local:
        print(
            "error: distributed training on Ray is not built yet; run `rgnet train --local` (one process)",
            file=sys.stderr,
        )
        return 2
    reports = run_local(cfg, fresh=args.fresh, test=not args.no_test)
    log.debug("final reports: %s", json.dumps(reports)[:2000])
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    return run_guarded(_main, args)


if __name__ == "__main__":
    sys.exit(main())
