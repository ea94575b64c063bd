"""Checkpoint payloads: state dicts plus the resolved config as plain data.

Saved from the unwrapped module (no ``module.`` prefixes from DDP), written atomically, loaded with
``weights_only=True`` (no pickled objects: configs are nested dicts of plain values).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rgnet.config import Config, from_dict, to_dict
from rgnet.io import atomic_path
from rgnet.model import RGNet, build_model

FORMAT_VERSION = 1
CHECKPOINT_FILE = "checkpoint.pt"


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside a DDP/FSDP/compile wrapper."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module  # type: ignore[assignment]
    inner = getattr(model, "_orig_mod", model)
    assert isinstance(inner, nn.Module)
    return inner


def make_payload(
    model: nn.Module,
    cfg: Config,
    *,
    epoch: int,
    global_step: int,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    metrics: dict[str, float] | None = None,
) -> dict[str, Any]:
    """``epoch`` is the number of finished epochs: a resumed run starts at epoch ``epoch``."""
    return {
        "format_version": FORMAT_VERSION,
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "epoch": epoch,
        "global_step": global_step,
        "config": to_dict(cfg),
        "metrics": dict(metrics or {}),
    }


def save_checkpoint(payload: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not an rgnet checkpoint (format_version {FORMAT_VERSION} expected)")
    return payload


def model_from_payload(payload: dict[str, Any]) -> tuple[RGNet, Config]:
    cfg = from_dict(payload["config"], source=" (config stored in the checkpoint)")
    model = build_model(cfg.model, cfg.data.video_dim, cfg.data.text_dim)
    model.load_state_dict(payload["model"])
    model.eval()
    return model, cfg


def load_model(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> tuple[RGNet, Config]:
    return model_from_payload(load_checkpoint(path, map_location))
