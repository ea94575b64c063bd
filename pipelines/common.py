"""Shared command-line pieces: config options on every pipeline, logging set-up, the metric table."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rgnet.config import Config, ConfigError, available_presets, load_config

SPACE_DIR = Path(__file__).resolve().parent.parent / "tune_spaces"  # the shipped search spaces


def add_config_args(parser: argparse.ArgumentParser, default_preset: str | None = None) -> None:
    g = parser.add_argument_group("configuration (embedded default <- preset <- --config file <- key=value)")
    g.add_argument(
        "--preset",
        default=default_preset,
        choices=available_presets(),
        help=f"named preset shipped with the package (default: {default_preset or 'none: the embedded default'})",
    )
    g.add_argument("--config", metavar="FILE", help="YAML config file (e.g. a best-trial preset written by a sweep)")
    g.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides with dotted keys, e.g. train.epochs=5 model.sampler.temperature=0.5",
    )


class _Removed(argparse.Action):
    """A flag that is gone: using it exits 2 with one line saying what to give instead."""

    def __init__(self, option_strings: list[str], dest: str, instead: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.instead = instead

    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option: str | None = None) -> None:
        parser.exit(2, f"{parser.prog}: error: {option} was removed: {self.instead}\n")


def remove_flags(parser: argparse.ArgumentParser, removed: dict[str, str]) -> None:
    """Flags that are gone (``{flag: what to give instead}``): passing one exits 2 with one line naming the new form;
    hidden from ``--help``."""
    for flag, instead in removed.items():
        parser.add_argument(flag, action=_Removed, instead=instead, nargs="*", default=None, help=argparse.SUPPRESS)


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.preset, args.config, args.overrides)


def setup_logging(verbose: bool = False) -> None:
    """Entry points (never the library) configure the process."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    if not verbose:  # MLflow's progress chatter (store set-up, ...) only with -v; MLflow reads this when imported
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


class SetupError(RuntimeError):
    """The environment a job needs is not usable (tracking server, Ray cluster); the message says how to fix it."""


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def run_guarded(fn: Any, *args: Any) -> int:
    """Turn user errors (bad config, bad data, missing files) into one clear line and exit code 2."""
    from rgnet.data.records import DataError

    try:
        return int(fn(*args) or 0)
    except (ConfigError, DataError, SetupError, FileNotFoundError) as e:
        return fail(str(e))


def run_command(
    parser: argparse.ArgumentParser, body: Any, argv: Sequence[str] | None, intermixed: bool = False
) -> int:
    """A command's whole ``main``: parse ``argv`` (options and ``key=value`` in any order if ``intermixed``), set up
    logging (``-v``), run ``body(args)`` with user errors turned into one line and exit code 2."""
    args = parser.parse_intermixed_args(argv) if intermixed else parser.parse_args(argv)
    setup_logging(getattr(args, "verbose", False))
    return run_guarded(body, args)


def split_name(cfg: Config, name: str) -> str:
    """``train``/``val``/``test`` -> the dataset's split name from the config; any other name as given."""
    return {"train": cfg.data.train_split, "val": cfg.data.val_split, "test": cfg.data.test_split}.get(name, name)


def ray_run_dir(cfg: Config) -> str:
    """A Ray Train run's folder (``ray.storage_path/train.run_name``): its identity for resume, MLflow and console."""
    return f"{cfg.ray.storage_path.rstrip('/')}/{cfg.train.run_name}"


def abspath(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def resolve_space_path(name: str) -> Path:
    """A search-space file: a path, or the name of one in ``tune_spaces/`` (``proposals``, ``smoke``, ...)."""
    path = Path(name)
    if path.exists():
        return path
    candidate = SPACE_DIR / (name if name.endswith(".yaml") else f"{name}.yaml")
    if candidate.exists():
        return candidate
    have = ", ".join(sorted(p.stem for p in SPACE_DIR.glob("*.yaml")))
    raise ConfigError(f"search space {name!r} not found (neither a file nor one of tune_spaces/: {have})")
