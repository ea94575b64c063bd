"""A checkpoint's metrics on a split of its dataset: what ``rgnet evaluate --checkpoint/--model-uri`` prints and
``rgnet study`` tabulates (it imports no command module).

The model is a checkpoint file or an MLflow model URI (``runs:/<run_id>/model``, ``models:/<name>/<version>``); the
metrics follow the checkpoint's config (``eval.*``) with the given overrides, which cannot change ``model.*``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipelines.common import split_name
from rgnet.config import ConfigError


def evaluate_checkpoint(
    *,
    checkpoint: str | None = None,
    model_uri: str | None = None,
    tracking_uri: str | None = None,
    split: str = "val",
    overrides: Sequence[str] = (),
    predictions_out: str | None = None,
) -> dict[str, Any]:
    """Two-stage inference of a checkpoint (a file, else an MLflow ``model_uri``) on ``split`` (train, val, test or
    a split name) of its dataset; returns the metric report (with the checkpoint, its epoch and the split) and writes
    the predictions to ``predictions_out`` when given."""
    from pipelines.runtime import load_model_uri
    from rgnet.config import apply_overrides
    from rgnet.data.dataset import open_split
    from rgnet.eval.predictions import write_predictions
    from rgnet.train.checkpoint import load_checkpoint, model_from_payload
    from rgnet.train.loop import evaluate_model, resolve_device

    if bool(checkpoint) == bool(model_uri):
        raise ConfigError("give one of a checkpoint file or an MLflow model URI")
    payload = load_checkpoint(checkpoint) if checkpoint else load_model_uri(str(model_uri), tracking_uri)
    model, cfg = model_from_payload(payload)
    new_cfg = apply_overrides(cfg, list(overrides))
    if new_cfg.model != cfg.model:
        raise ConfigError("overrides cannot change model.* keys of a trained checkpoint")
    cfg = new_cfg
    split = split_name(cfg, split)
    device = resolve_device(cfg.train.device)
    data = open_split(cfg.data, split)
    report, rows = evaluate_model(model.to(device), data, cfg, device, progress=cfg.train.progress)
    report["checkpoint"] = str(checkpoint or model_uri)
    report["checkpoint_epoch"] = int(payload["epoch"])
    report["split"] = split
    if predictions_out:
        write_predictions(predictions_out, rows)
    return report
