"""``rgnet train`` / ``python -m pipelines.train``: train RGNet and evaluate the best checkpoint.

By default training is distributed with Ray Train and tracked in MLflow (``pipelines.trainer.train_on_ray``: Ray
Train workers in ``pipelines.train_worker``, their data in ``pipelines.data``, MLflow in ``pipelines.tracking``),
in order:

1. data: generate the synthetic dataset if asked and absent, then open every split here, so that a missing or
   malformed dataset fails with the reader's message before Ray or any worker starts;
2. tracking: probe the MLflow store (an unreachable server fails in seconds) and create the run, or reuse the run of
   an interrupted attempt with the same storage path and run name;
3. Ray: join ``ray.address`` (or the cluster of a ``ray job submit``) or start a local Ray;
4. ``TorchTrainer.fit()``: a run with the same ``RunConfig(name, storage_path)`` as an interrupted one resumes from
   its latest checkpoint (``--fresh`` deletes it and starts over); worker failures restart the worker group from
   the latest checkpoint, up to ``ray.max_failures`` times;
5. the best checkpoint (by ``train.selection_metric`` on the validation split) is evaluated on val and test, and
   logged to MLflow with the reports, the predictions and the plots; the command that opens the run is printed.

``--local`` trains in this one process (no Ray, no MLflow; ``rgnet.train.run.train_local``): checkpoints, the
validation predictions of the best epoch and the metric reports go to ``train.output_dir/train.run_name``.
Re-running the same command resumes from the last checkpoint of that run (``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pipelines.common import add_config_args, remove_flags, run_command
from rgnet.config import Config, from_dict, load_config

log = logging.getLogger("rgnet.train")

SMOKE_OVERRIDES = ["train.epochs=2"]  # --smoke-test: the tiny preset (unless one is given), 2 epochs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rgnet train",
        description="Train RGNet on a dataset (synthetic by default, generated on first use) and evaluate it. "
        "Distributed on Ray with MLflow tracking by default; --local trains in this process.",
        epilog="Often-used keys: tracking.uri=URI (the MLflow store: http://HOST:PORT for a server, which a multi-node "
        "cluster needs; default sqlite:///<absolute cwd>/mlflow.db), train.init_from=CHECKPOINT (fine-tune from a "
        "checkpoint's weights, e.g. the checkpoint.pt of rgnet import released: weights only, fresh optimizer; a run "
        "resuming from its own checkpoint ignores it), ray.address=ADDR, ray.num_workers=N, train.epochs=N.",
    )
    p.add_argument("--local", action="store_true", help="train in this process only (no Ray, no MLflow)")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint of this run and start over")
    p.add_argument(
        "--no-test", action="store_true", help="skip the final evaluation of the best model on the test split"
    )
    p.add_argument(
        "--smoke-test",
        action="store_true",
        help="a one-minute run: the tiny preset (unless --preset/--config), 2 epochs, run name <name>-smoke",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_config_args(p)
    remove_flags(
        p,
        {
            "--tracking-uri": "give tracking.uri=URI (http://HOST:PORT for a server; default sqlite:///<cwd>/mlflow.db)",
            "--init-from": "give train.init_from=CHECKPOINT (fine-tune from its weights; Ray runs read it absolute)",
        },
    )
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    if not args.smoke_test:
        return load_config(args.preset, args.config, overrides)
    preset = args.preset or (None if args.config else "tiny")
    cfg = load_config(preset, args.config, [*SMOKE_OVERRIDES, *overrides])
    if not any(o.startswith("train.run_name=") for o in overrides):
        cfg = from_dict({"train": {"run_name": f"{cfg.train.run_name}-smoke"}}, cfg)
    return cfg


def _main(args: argparse.Namespace) -> int:
    from pipelines.trainer import train_on_ray
    from rgnet.train.run import train_local

    cfg = config_from_args(args)
    if args.local:
        reports = train_local(cfg, fresh=args.fresh, test=not args.no_test)
    else:
        reports = train_on_ray(
            cfg,
            preset=args.preset or ("tiny" if args.smoke_test and not args.config else None),
            fresh=args.fresh,
            test=not args.no_test,
            verbose=args.verbose,
        )
    log.debug("final reports: %s", json.dumps(reports)[:2000])
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), _main, argv)


if __name__ == "__main__":
    sys.exit(main())
