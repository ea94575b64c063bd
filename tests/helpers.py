"""Builders that several test modules share (fixtures live in conftest.py): a small model config, a seeded untrained
tiny-preset checkpoint, and the arguments of a multi-seed command on the tiny preset."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rgnet.config import Config, ModelConfig
from rgnet.data.synthetic import ensure_configured_dataset
from rgnet.model import build_model
from rgnet.train.checkpoint import make_payload, save_checkpoint
from rgnet.train.loop import seed_everything

# The sizes both model-level test modules use: small enough for CPU unit tests, with D, the FFN width and Q distinct.
SMALL_MODEL = {"hidden_dim": 32, "ffn_dim": 48, "retrieval_layers": 2, "decoder_layers": 3, "num_queries": 4}


def small_model_config(**fields: object) -> ModelConfig:
    """A :class:`ModelConfig` with the :data:`SMALL_MODEL` sizes; ``fields`` set the other fields or override these."""
    return ModelConfig(**{**SMALL_MODEL, **fields})  # type: ignore[arg-type]


def save_tiny_checkpoint(cfg: Config, path: Path, *, epoch: int = 0, global_step: int = 0) -> Path:
    """Write ``cfg``'s synthetic dataset (if not there yet), then save a model built with seed 0 and never trained as a
    checkpoint at ``path`` (recorded as saved at ``epoch`` and ``global_step``); returns the checkpoint's path."""
    ensure_configured_dataset(cfg.data)
    seed_everything(0)
    model = build_model(cfg.model, cfg.data.video_dim, cfg.data.text_dim)
    return save_checkpoint(make_payload(model, cfg, epoch=epoch, global_step=global_step), path)


def tiny_seeds_argv(tmp: Path, *extra: str, epochs: int, options: Sequence[str] = (), seeds: str = "2") -> list[str]:
    """The arguments of a multi-seed command (``rgnet ablate``, ``rgnet study NAME``) on the tiny preset, two runs at
    a time: ``options`` right after the preset, ``extra`` before the overrides, which put the data, the runs and a
    SQLite MLflow store under ``tmp`` and train ``epochs`` epochs."""
    return [
        "--preset",
        "tiny",
        *options,
        "--seeds",
        seeds,
        "--parallel",
        "2",
        *extra,
        f"data.root={tmp / 'data'}",
        f"train.output_dir={tmp / 'runs'}",
        f"train.epochs={epochs}",
        f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
    ]
