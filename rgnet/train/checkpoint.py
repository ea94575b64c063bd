"""Checkpoint payloads: state dicts plus the resolved config as plain data.

Saved from the unwrapped module (no ``module.`` prefixes from DDP), written atomically, loaded with
``weights_only=True`` (no pickled objects: configs are nested dicts of plain values).
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rgnet.config import Config, ConfigError, ModelConfig, TrainConfig, from_dict, to_dict
from rgnet.io import atomic_path
from rgnet.model import RGNet, build_model

log = logging.getLogger(__name__)

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


def load_weights(model: nn.Module, state: Mapping[str, Tensor], source: object) -> None:
    """Strict ``load_state_dict`` whose error names every missing, unexpected and misshapen tensor (with shapes)."""
    own = unwrap(model).state_dict()
    problems = [f"missing tensor '{k}' (shape {tuple(v.shape)})" for k, v in own.items() if k not in state]
    problems += [f"unexpected tensor '{k}'" for k in state if k not in own]
    problems += [
        f"tensor '{k}' has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise ConfigError(f"the weights in {source} do not fit this model ({len(problems)} problem(s)):\n  {shown}")
    unwrap(model).load_state_dict(state)


def init_weights_from(model: nn.Module, train: TrainConfig, model_cfg: ModelConfig) -> bool:
    """Fine-tuning start: load the weights of ``train.init_from`` (a project checkpoint) into ``model`` (built from
    ``model_cfg``, whose ``compat`` is compared with the checkpoint's).

    Call it on the freshly built model; only the weights are taken (the optimizer, schedule, scaler, epoch and step
    start fresh), every name and shape is checked.  A run resuming from its own checkpoint loads that checkpoint
    afterwards, which replaces these weights: resume wins.  Returns False when ``train.init_from`` is empty.
    """
    path = train.init_from
    if not path:
        return False
    where = Path(path).expanduser()
    if where.is_dir():
        where = where / CHECKPOINT_FILE
    if not where.is_file():
        raise FileNotFoundError(
            f"train.init_from={path}: no checkpoint there (a relative path resolves against the working directory of "
            "the training process; Ray workers need an absolute path on storage they can read)"
        )
    try:
        payload = load_checkpoint(where)
    except (pickle.UnpicklingError, ValueError) as e:
        raise ConfigError(
            f"train.init_from={path} is not a checkpoint of this project ({str(e).splitlines()[0]}); a released RGNet "
            f"checkpoint must be imported first: rgnet import released {path} --out DIR"
        ) from e
    load_weights(model, payload["model"], where)
    stored = payload.get("config", {}).get("model", {}).get("compat", "clean")
    if stored != model_cfg.compat:
        log.warning(
            "train.init_from=%s was saved with model.compat=%s, this run uses model.compat=%s",
            path,
            stored,
            model_cfg.compat,
        )
    log.info("initialised the model from %s (weights only; fresh optimizer and schedule)", where)
    return True


def model_with_overrides(payload: dict[str, Any], overrides: list[str]) -> tuple[RGNet, Config]:
    """The checkpoint's model and its config with inference overrides (``eval.*``, ``data.root``, ...) applied;
    overriding what the weights fix (``model.*``, the feature widths) is an error."""
    from rgnet.config import apply_overrides

    model, cfg = model_from_payload(payload)
    new = apply_overrides(cfg, overrides)
    if new.model != cfg.model or new.data.video_dim != cfg.data.video_dim or new.data.text_dim != cfg.data.text_dim:
        raise ConfigError("model.* and data.{video,text}_dim are fixed by the trained checkpoint")
    return model, new
