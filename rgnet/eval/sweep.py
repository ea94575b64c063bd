"""Evaluation-only sweeps: one trained model, several inference settings, no retraining.

The paper's Fig. 5 (grounding recall against the number of retrieved proposals) and its oracle-grounding experiment
change only ``eval.*``: how many windows the decoder sees per query (``eval.top_k_windows``), or the ground-truth
window alone (``eval.oracle``).  :func:`evaluate_settings` runs the same two-stage inference as ``rgnet evaluate
--checkpoint`` (:func:`rgnet.train.loop.evaluate_model`) once per setting, on one loaded model and one opened split;
a setting that would change ``model.*`` is refused (it would be another model).

``top_k_windows`` is capped per video by the windows the video has (``rgnet.eval.inference``), so a k above a
video's window count decodes every window of it; :func:`decoded_windows` reports the mean number really decoded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from rgnet.config import Config, ConfigError, apply_overrides
from rgnet.data.dataset import SplitData
from rgnet.eval.predictions import PredictionRow

ORACLE = "oracle"  # the setting name of oracle grounding (decode the ground-truth window only)


def topk_settings(ks: Sequence[int], *, oracle: bool = False) -> dict[str, list[str]]:
    """``{"k1": ["eval.top_k_windows=1"], ...}`` (and ``"oracle": ["eval.oracle=true"]``), in the order given."""
    if not ks and not oracle:
        raise ValueError("no setting to evaluate: give at least one k or oracle")
    if any(int(k) < 1 for k in ks):
        raise ValueError(f"top-k values must be >= 1, got {list(ks)}")
    out = {f"k{int(k)}": [f"eval.top_k_windows={int(k)}", "eval.oracle=false"] for k in ks}
    if oracle:
        out[ORACLE] = ["eval.oracle=true"]
    return out


def evaluate_settings(
    model: nn.Module,
    data: SplitData,
    cfg: Config,
    settings: Mapping[str, Sequence[str]],
    device: torch.device,
) -> dict[str, tuple[dict[str, Any], list[PredictionRow]]]:
    """The metric report and prediction rows of ``model`` on ``data`` under each named setting (``key=value``
    overrides of ``cfg``), in order."""
    from rgnet.train.loop import evaluate_model

    out = {}
    for name, overrides in settings.items():
        c = apply_overrides(cfg, list(overrides))
        if c.model != cfg.model:
            raise ConfigError(f"setting {name!r} ({', '.join(overrides)}) changes model.*: that is another model")
        out[name] = evaluate_model(model, data, c.windows, c.eval, device)
    return out


def decoded_windows(rows: Sequence[PredictionRow], k: int) -> float:
    """Mean over queries of min(k, windows of the query's video): the windows the decoder really saw per query.

    Needs rows with their ranked windows (two-stage inference attaches every window of the video)."""
    if not rows:
        raise ValueError("no prediction rows")
    counts = []
    for row in rows:
        if row.windows is None:
            raise ValueError(f"row {row.query_id} has no ranked windows (oracle rows have none)")
        counts.append(min(k, len(row.windows)))
    return float(sum(counts) / len(counts))
