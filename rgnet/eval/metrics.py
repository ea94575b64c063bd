"""Grounding and retrieval metrics over prediction rows, under a named protocol profile (DESIGN section 5).

- Recall@K at IoU m (``R{K}@{m}``): a query is a hit when any of its first K predictions reaches IoU m with the GT
  moment.  Profile ``rgnet`` (the official RGNet / CONE / Ego4D evaluators): IoU strictly greater than m; profile
  ``geq`` (MAD's VLG-Net evaluator, SOONet, Moment-DETR): IoU >= m.
- ``mIoU``: mean IoU of the top-1 prediction (Ego4D-NLQ's mIoU).
- ``retrieval_R{K}``: fraction of queries with a positive window (one overlapping the GT, as
  :func:`rgnet.data.windows.overlap_mask`) among the first K ranked windows (RGNet's "window pre-filtering" recall).

Every mean is over *all* ground-truth queries: a query without a prediction row is a miss and is counted in the
report (the official Ego4D evaluator averages over the submitted queries instead).  Numbers are percentages.  The
report states the profile and the prediction cap, because R@100 computed from 5 predictions silently equals R@5.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from rgnet.data.records import DataError, QueryRecord
from rgnet.data.windows import overlap_mask
from rgnet.eval.predictions import PredictionRow
from rgnet.span_ops import elementwise_iou

log = logging.getLogger(__name__)

PROFILES: dict[str, str] = {"rgnet": "IoU > m", "geq": "IoU >= m"}


def recall_name(k: int, iou: float) -> str:
    """``R5@0.3``: the metric key for Recall@K at IoU m."""
    return f"R{k}@{iou:g}"


def retrieval_name(k: int) -> str:
    return f"retrieval_R{k}"


def _pad(lists: Sequence[Sequence[Sequence[float]] | None], width: int) -> tuple[np.ndarray, np.ndarray]:
    """First ``width`` entries of each list -> (B, width, 3) float64 values and a (B, width) validity mask."""
    values = np.zeros((len(lists), width, 3), dtype=np.float64)
    valid = np.zeros((len(lists), width), dtype=bool)
    for b, items in enumerate(lists):  # one numpy copy per query, not per prediction
        n = min(len(items), width) if items is not None else 0
        if items is not None and n:
            values[b, :n] = np.asarray(items[:n], dtype=np.float64).reshape(n, 3)
            valid[b, :n] = True
    return values, valid


def _align(
    rows: Sequence[PredictionRow], records: Sequence[QueryRecord], source: str
) -> tuple[list[PredictionRow | None], list[str]]:
    """One row (or None) per GT record, in record order; unknown or duplicate query ids are errors."""
    index: dict[str, int] = {}
    for i, rec in enumerate(records):
        if rec.query_id in index:
            raise DataError("annotations", "duplicate query id", record=rec.query_id, field="query_id")
        index[rec.query_id] = i
    aligned: list[PredictionRow | None] = [None] * len(records)
    mismatched = 0
    for row in rows:
        if row.query_id not in index:
            raise DataError(
                source or "predictions",
                "query id is not in the annotations",
                record=row.query_id,
                field="query_id",
                fix="evaluate against the annotation file and split the predictions were made for",
            )
        i = index[row.query_id]
        if aligned[i] is not None:
            raise DataError(
                source or "predictions",
                "duplicate query id",
                record=row.query_id,
                field="query_id",
                fix="keep one row per query",
            )
        aligned[i] = row
        mismatched += row.video_id != records[i].video_id
    warnings = []
    if mismatched:
        warnings.append(f"{mismatched} prediction rows name a video_id different from the annotations' (ignored)")
    return aligned, warnings


def evaluate(
    rows: Sequence[PredictionRow],
    records: Sequence[QueryRecord],
    *,
    profile: str = "rgnet",
    recall_ks: Sequence[int] = (1, 5, 10, 50, 100),
    iou_thresholds: Sequence[float] = (0.3, 0.5),
    retrieval_ks: Sequence[int] = (1, 5, 10, 30),
    max_predictions: int | None = None,
    source: str = "",
) -> dict[str, Any]:
    """The metric report (plain JSON data) of ``rows`` against the GT ``records``.

    ``max_predictions`` caps the predictions used per query (None: all of them).  Keys: ``profile``,
    ``iou_rule``, ``num_queries`` (GT queries), ``num_without_predictions``, ``prediction_cap``,
    ``max_predictions_found``, ``metrics`` (percent), ``warnings``, and the ks/thresholds used.
    """
    if profile not in PROFILES:
        raise ValueError(f"unknown metric profile '{profile}'; use one of {sorted(PROFILES)}")
    if not records:
        raise ValueError("no ground-truth queries to evaluate against (empty annotations)")
    if max_predictions is not None and max_predictions < 1:
        raise ValueError(f"max_predictions must be >= 1 or None, got {max_predictions}")
    recall_ks = sorted({int(k) for k in recall_ks})
    retrieval_ks = sorted({int(k) for k in retrieval_ks})
    if any(k < 1 for k in [*recall_ks, *retrieval_ks]):
        raise ValueError(f"recall and retrieval ks must be >= 1, got {recall_ks} and {retrieval_ks}")
    iou_thresholds = [float(m) for m in iou_thresholds]

    aligned, warnings = _align(rows, records, source)
    num_q = len(records)
    gt_se = np.array([[r.start_sec, r.end_sec] for r in records], dtype=np.float64)  # (B, 2)

    # --- grounding: first K predictions per query, padded to (B, K) ---
    found = max((len(r.predictions) for r in aligned if r is not None), default=0)
    cap = max_predictions if max_predictions is not None else found
    usable = min(cap, found)  # the most predictions any query really contributes
    width = max(1, min(max(recall_ks, default=1), usable))
    preds, valid = _pad([None if r is None else r.predictions for r in aligned], width)  # (B, K, 3), (B, K)
    iou = elementwise_iou(torch.from_numpy(preds[..., :2]), torch.from_numpy(gt_se[:, None, :])).numpy()  # (B, K)
    iou = np.where(valid, iou, 0.0)
    num_without = sum(r is None or len(r.predictions) == 0 for r in aligned)

    metrics: dict[str, float] = {}
    for m in iou_thresholds:
        hit = (iou > m) if profile == "rgnet" else (iou >= m)
        hit &= valid  # (B, K)
        first_hit = np.where(hit.any(axis=1), hit.argmax(axis=1), np.iinfo(np.int64).max)  # (B,) rank of the 1st hit
        for k in recall_ks:
            metrics[recall_name(k, m)] = 100.0 * float(np.mean(first_hit < k))
    metrics["mIoU"] = 100.0 * float(iou[:, 0].mean())

    for k in recall_ks:
        if k > usable:
            warnings.append(
                f"R{k}@… uses at most {usable} predictions per query "
                f"({'the cap' if usable == cap and max_predictions is not None else 'the most any row holds'})"
            )
    if num_without:
        warnings.append(f"{num_without} of {num_q} queries have no prediction and count as misses")

    # --- retrieval: first K ranked windows per query ---
    with_windows = [r is not None and r.windows is not None for r in aligned]
    if not any(with_windows):
        warnings.append("no prediction row carries ranked 'windows': retrieval recall is not reported")
    else:
        if not all(with_windows):
            warnings.append(f"{num_q - sum(with_windows)} of {num_q} queries have no ranked windows (retrieval misses)")
        win_lists = [None if r is None else r.windows for r in aligned]
        video_stop = np.array([max((w[1] for w in ws), default=0.0) if ws is not None else 0.0 for ws in win_lists])
        wins, wvalid = _pad(win_lists, max(retrieval_ks))  # (B, Kr, 3)
        positive = (
            overlap_mask(wins[..., 0], wins[..., 1], gt_se[:, 0:1], gt_se[:, 1:2], video_stop[:, None]) & wvalid
        )  # (B, Kr)
        first_pos = np.where(positive.any(axis=1), positive.argmax(axis=1), np.iinfo(np.int64).max)
        for k in retrieval_ks:
            metrics[retrieval_name(k)] = 100.0 * float(np.mean(first_pos < k))

    for w in warnings:
        log.warning("%s: %s", source or "evaluation", w)
    return {
        "profile": profile,
        "iou_rule": PROFILES[profile],
        "source": source,
        "num_queries": num_q,
        "num_without_predictions": int(num_without),
        "prediction_cap": int(cap),
        "max_predictions_found": int(found),
        "recall_ks": recall_ks,
        "iou_thresholds": iou_thresholds,
        "retrieval_ks": retrieval_ks,
        "metrics": metrics,
        "warnings": warnings,
    }


# evaluate()'s metric settings; an ``eval`` config section and rgnet evaluate's options carry them under these names
METRIC_SETTINGS = ("profile", "recall_ks", "iou_thresholds", "retrieval_ks", "max_predictions")


def evaluate_with(
    rows: Sequence[PredictionRow], records: Sequence[QueryRecord], settings: Any, source: str = ""
) -> dict[str, Any]:
    """:func:`evaluate` with the :data:`METRIC_SETTINGS` (profile, ks, thresholds, prediction cap) read from
    ``settings``: an ``eval`` config section, or any object with those attributes."""
    return evaluate(rows, records, **{name: getattr(settings, name) for name in METRIC_SETTINGS}, source=source)


def _used(report: dict[str, Any]) -> int:
    """The most predictions any query really contributed: the cap, or fewer when no row holds that many."""
    return int(min(report["prediction_cap"], report.get("max_predictions_found", report["prediction_cap"])))


def format_table(report: dict[str, Any]) -> str:
    """A terminal table: one row per IoU threshold, one column per R@K, then mIoU and retrieval recall."""
    m = report["metrics"]
    ks = report.get("recall_ks") or sorted({int(k.split("@")[0][1:]) for k in m if k.startswith("R") and "@" in k})
    ious = report.get("iou_thresholds") or sorted({float(k.split("@")[1]) for k in m if k.startswith("R") and "@" in k})
    head = (
        f"profile {report['profile']} ({report.get('iou_rule', PROFILES.get(report['profile'], ''))}), "
        f"{report['num_queries']} queries ({report['num_without_predictions']} without predictions), "
        f"at most {_used(report)} predictions per query"
    )
    if report.get("max_predictions_found", report["prediction_cap"]) > report["prediction_cap"]:
        head += f" (cap {report['prediction_cap']})"
    cells = [f"{'IoU':>6}", *(f"{'R@' + str(k):>8}" for k in ks)]
    lines = [head, " ".join(cells)]
    for iou in ious:
        row = [f"{iou:>6g}"]
        for k in ks:
            value = m.get(recall_name(k, iou))
            row.append(f"{value:>8.2f}" if value is not None else f"{'-':>8}")
        lines.append(" ".join(row))
    if "mIoU" in m:
        lines.append(f"mIoU {m['mIoU']:.2f}")
    ret = sorted((int(k[len("retrieval_R") :]), v) for k, v in m.items() if k.startswith("retrieval_R"))
    if ret:
        lines.append("retrieval  " + "  ".join(f"R@{k} {v:.2f}" for k, v in ret))
    lines.extend(f"warning: {w}" for w in report.get("warnings", []))
    return "\n".join(lines)
