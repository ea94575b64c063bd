"""``rgnet tune`` / ``python -m pipelines.tune``: Ray Tune + Optuna sweeps over a space file, compared in MLflow.

The command only parses its arguments; the sweep (Tune-drives-Train trials, Optuna or grid search, ASHA, MLflow
parent and child runs, the summary) is :func:`pipelines.sweep.run_sweep`, whose module docstring says how.
"""

from __future__ import annotations

import argparse
import sys

from pipelines.common import run_command
from pipelines.sweep import SweepOptions, run_sweep
from rgnet.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rgnet tune",
        description="Sweep a search space (tune_spaces/*.yaml) with Ray Tune + Optuna + ASHA; trials train on Ray.",
    )
    p.add_argument("--space", help="space file, or the name of one in tune_spaces/ (e.g. proposals)")
    p.add_argument("--trials", type=int, default=8, help="number of trials (grid spaces: rounded up to whole grids)")
    p.add_argument("--concurrency", type=int, default=1, help="trials running at once (default: %(default)s)")
    p.add_argument("--name", help="sweep name (default: the space file's name); the same name restores a sweep")
    p.add_argument("--fresh", action="store_true", help="delete an earlier sweep of this name and start over")
    p.add_argument("--seed", type=int, default=0, help="Optuna sampler seed (default: %(default)s)")
    p.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs before a trial may be stopped")
    p.add_argument("--reduction-factor", type=int, default=2, help="ASHA: keep 1/N of trials at each rung")
    p.add_argument("--best-out", help="where the best config is written (default: <output_dir>/<name>/best.yaml)")
    p.add_argument(
        "--loggers",
        default="json",
        help="Tune's per-trial loggers, comma-separated from csv, json, tensorboard (default: %(default)s; json is "
        "always on: the summary reads it)",
    )
    p.add_argument(
        "--smoke-test", action="store_true", help="tune_spaces/smoke.yaml, 4 trials (about 3 minutes on 2 cores)"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides on top of the space's base config"
    )
    return p


def options(args: argparse.Namespace) -> SweepOptions:
    space, trials = args.space, args.trials
    if args.smoke_test and not space:
        space, trials = "smoke", 4 if trials == 8 else trials
    if not space:
        raise ConfigError("--space is required (a file, or one of tune_spaces/: e.g. --space proposals)")
    return SweepOptions(
        space=space,
        trials=trials,
        concurrency=args.concurrency,
        name=args.name,
        fresh=args.fresh,
        seed=args.seed,
        grace_period=args.grace_period,
        reduction_factor=args.reduction_factor,
        best_out=args.best_out,
        loggers=args.loggers,
        overrides=tuple(args.overrides),
    )


def _main(args: argparse.Namespace) -> int:
    summary = run_sweep(options(args))
    return 130 if summary.get("interrupted") else 0


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), _main, argv)


if __name__ == "__main__":
    sys.exit(main())
