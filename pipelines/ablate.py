"""``rgnet ablate`` / ``python -m pipelines.ablate``: the ablation table (paper Tab. 3-4) over seeds, from local runs.

The command only parses its arguments; the table (runs per (variant, seed), means, t intervals, paired differences,
files and MLflow runs) is :func:`pipelines.ablation.run_ablation`, whose module docstring says what it writes.
"""

from __future__ import annotations

import argparse
import sys

from pipelines.ablation import REFERENCE, AblationOptions, parse_seeds, run_ablation
from pipelines.common import run_command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rgnet ablate",
        description="Train every variant of a space file locally with N seeds (RGNet, ablations, disjoint baseline) "
        "and tabulate val and test metrics with 95% intervals and paired differences to the reference variant, "
        "next to the untrained model.",
    )
    p.add_argument("--space", default="ablations", help="space file with variants, or a tune_spaces/ name")
    p.add_argument("--preset", help="start from this preset instead of the space file's (e.g. tiny for a smoke run)")
    p.add_argument("--variants", help="comma-separated subset of the space's variants (default: all, in file order)")
    p.add_argument("--name", help="output folder under train.output_dir (default: the space file's name)")
    p.add_argument("--seeds", type=int, default=3, help="train every variant with train.seed = 0 .. N-1 (default: 3)")
    p.add_argument("--seed-list", help="comma-separated train.seed values instead of --seeds (e.g. 5,7,9)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of every training process, the same for every run of the table (default: %(default)s)",
    )
    p.add_argument("--parallel", type=int, default=1, help="runs trained at once (default: %(default)s)")
    p.add_argument(
        "--reference", help=f"the variant differences are taken against (default: {REFERENCE}, else the first)"
    )
    p.add_argument(
        "--runs-dir",
        help="folder of the run folders <variant>/seed<seed>; tables sharing it share runs of identical configs "
        "(default: the table folder)",
    )
    p.add_argument("--fresh", action="store_true", help="delete this table's earlier runs and start over")
    p.add_argument(
        "--tracking",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="log the table to MLflow: a parent run, a child run per variant and seed (default: tracking.enabled)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides on top of the space's base config"
    )
    return p


def options(args: argparse.Namespace) -> AblationOptions:
    return AblationOptions(
        space=args.space,
        preset=args.preset,
        variants=args.variants,
        name=args.name,
        seeds=tuple(parse_seeds(args.seeds, args.seed_list)),
        threads=args.threads,
        parallel=args.parallel,
        reference=args.reference,
        runs_dir=args.runs_dir,
        fresh=args.fresh,
        tracking=args.tracking,
        overrides=tuple(args.overrides),
    )


def _main(args: argparse.Namespace) -> int:
    run_ablation(options(args))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), _main, argv)


if __name__ == "__main__":
    sys.exit(main())
