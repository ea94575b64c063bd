"""The prediction file: its row schema (defined here and nowhere else), a strict reader, and exporters.

A prediction file is JSON Lines, one row per query::

    {"query_id": "a1b2_0", "video_id": "clip9",
     "predictions": [[start_sec, end_sec, score], ...],     # best first (score descending)
     "windows": [[start_sec, end_sec, score], ...]}          # optional: windows ranked by context score, best first

``predictions`` may be empty (the query counts as a miss).  ``windows`` feeds the retrieval metric; a row without it
(or with ``null``) has no retrieval result.  Readers are strict: every problem is a :class:`DataError` naming the
file, the line (and query id when known) and the field, so a bad file fails before any number is computed.

Exporters convert rows to the public submission layouts: the Ego4D NLQ challenge JSON, Moment-DETR's (QVHighlights)
JSON Lines and CONE's MAD JSON Lines.  Each writes one entry per ground-truth query, in the annotation file's order,
capped at ``max_predictions``; a query without predictions gets :data:`PLACEHOLDER`.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rgnet.data.records import DataError, QueryRecord
from rgnet.io import atomic_write_json, atomic_write_jsonl

ROW_FIELDS = ("query_id", "video_id", "predictions", "windows")
REQUIRED_FIELDS = ("query_id", "video_id", "predictions")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictionRow:
    """The predictions for one query; spans in seconds of the video, ``[start, end, score]``, best first."""

    query_id: str
    video_id: str
    predictions: list[list[float]]  # moments, ranked by score (descending)
    windows: list[list[float]] | None = None  # windows ranked by context score (descending); None = not recorded

    def to_json(self) -> dict[str, Any]:
        row: dict[str, Any] = {"query_id": self.query_id, "video_id": self.video_id, "predictions": self.predictions}
        if self.windows is not None:
            row["windows"] = self.windows
        return row


def compact_row(row: PredictionRow) -> PredictionRow:
    """The row with its predictions and windows as (n, 3) float64 arrays: what the metrics read, at a tenth of the
    memory of nested lists (a MAD-size split holds 72k queries x 100 predictions x 100 windows)."""
    preds = np.asarray(row.predictions, dtype=np.float64).reshape(-1, 3)
    windows = None if row.windows is None else np.asarray(row.windows, dtype=np.float64).reshape(-1, 3)
    return PredictionRow(row.query_id, row.video_id, preds, windows)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------
# Reading and writing
# ---------------------------------------------------------------------------------------------------------------
def _check_triples(value: object, file: object, record: str, field: str) -> list[list[float]]:
    """``[[start, end, score], ...]`` with finite numbers, start <= end, scores non-increasing.

    The checks run on a numpy copy (a MAD test file holds millions of numbers); only the error path looks for the
    offending entry one by one.
    """
    if not isinstance(value, list):
        raise DataError(
            file,
            f"must be a list of [start_sec, end_sec, score], got {type(value).__name__}",
            record=record,
            field=field,
        )
    if not value:
        return []
    if {type(item) for item in value} != {list} or {len(item) for item in value} != {3}:
        i, item = next((i, v) for i, v in enumerate(value) if not (isinstance(v, list) and len(v) == 3))
        raise DataError(
            file, f"must be [start_sec, end_sec, score], got {item!r}", record=record, field=f"{field}[{i}]"
        )
    types = {type(x) for item in value for x in item}
    if not types <= {int, float}:  # bool, str, None: a mistake, not a number
        i, item = next((i, v) for i, v in enumerate(value) if not all(type(x) in (int, float) for x in v))
        raise DataError(
            file, f"start, end and score must be finite numbers, got {item!r}", record=record, field=f"{field}[{i}]"
        )
    arr = np.array(value, dtype=np.float64)  # (n, 3)
    bad = np.flatnonzero(~np.isfinite(arr).all(axis=1))
    if len(bad):
        raise DataError(
            file,
            f"start, end and score must be finite numbers, got {value[bad[0]]!r}",
            record=record,
            field=f"{field}[{bad[0]}]",
        )
    bad = np.flatnonzero(arr[:, 0] > arr[:, 1])
    if len(bad):
        i = int(bad[0])
        raise DataError(
            file,
            f"start {arr[i, 0]} is after end {arr[i, 1]}",
            record=record,
            field=f"{field}[{i}]",
            fix="write spans as [start_sec, end_sec, score]",
        )
    bad = np.flatnonzero(np.diff(arr[:, 2]) > 0)
    if len(bad):
        i = int(bad[0]) + 1
        raise DataError(
            file,
            f"score {arr[i, 2]} is higher than the previous entry's {arr[i - 1, 2]}",
            record=record,
            field=f"{field}[{i}]",
            fix="sort the list by score, highest first",
        )
    return value if types == {float} else arr.tolist()  # all floats: keep as is (no copy)


def parse_row(obj: object, file: object = "<predictions>", line: int | None = None) -> PredictionRow:
    """Validate one decoded JSON object against the row schema."""
    record = f"line {line}" if line is not None else "row"
    if not isinstance(obj, Mapping):
        raise DataError(file, f"a row must be a JSON object, got {type(obj).__name__}", record=record)
    qid = obj.get("query_id")
    if isinstance(qid, str):
        record = f"{record} (query {qid})"
    for key in obj:
        if key not in ROW_FIELDS:
            near = difflib.get_close_matches(str(key), ROW_FIELDS, n=1)
            raise DataError(
                file,
                "unknown field",
                record=record,
                field=str(key),
                fix=f"did you mean '{near[0]}'?" if near else f"a row has only {', '.join(ROW_FIELDS)}",
            )
    for key in REQUIRED_FIELDS:
        if key not in obj:
            raise DataError(file, "missing field", record=record, field=key)
    for key in ("query_id", "video_id"):
        if not isinstance(obj[key], str) or not obj[key]:
            raise DataError(file, f"must be a non-empty string, got {obj[key]!r}", record=record, field=key)
    predictions = _check_triples(obj["predictions"], file, record, "predictions")
    windows_raw = obj.get("windows")
    windows = None if windows_raw is None else _check_triples(windows_raw, file, record, "windows")
    return PredictionRow(obj["query_id"], obj["video_id"], predictions, windows)


def read_predictions(path: str | os.PathLike[str]) -> list[PredictionRow]:
    """Read and validate a prediction file (blank lines are skipped); query ids must be unique."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"prediction file not found: {path}") from None
    rows: list[PredictionRow] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                path,
                f"not valid JSON ({e.msg} at column {e.colno})",
                record=f"line {number}",
                fix="each line must be one JSON object",
            ) from None
        row = parse_row(obj, path, number)
        if row.query_id in seen:
            raise DataError(
                path,
                f"duplicate query id (first on line {seen[row.query_id]})",
                record=f"line {number} (query {row.query_id})",
                field="query_id",
                fix="write one row per query",
            )
        seen[row.query_id] = number
        rows.append(row)
    return rows


def write_predictions(path: str | os.PathLike[str], rows: Iterable[PredictionRow]) -> None:
    """Write rows as JSON Lines (atomically: a temporary file renamed into place)."""
    atomic_write_jsonl(path, (row.to_json() for row in rows))


# ---------------------------------------------------------------------------------------------------------------
# Exporters
# ---------------------------------------------------------------------------------------------------------------
PLACEHOLDER: tuple[float, float, float] = (0.0, 0.0, 0.0)
"""What an export writes for a query without predictions (an empty list, or no row at all): one zero-length span at
0 s with score 0.  Every official evaluator accepts it and it has IoU 0 with any ground truth of positive length,
so the query counts as a miss, as our metrics count it.  The alternatives fail: an empty list crashes Ego4D's and
Moment-DETR's scripts (they read the first prediction), a missing entry fails Moment-DETR's and CONE's query-id
check and makes Ego4D's script average over fewer queries (higher numbers)."""


def export_entries(
    rows: Iterable[PredictionRow],
    records: Iterable[QueryRecord],
    *,
    max_predictions: int | None = None,
    source: object = "<predictions>",
    what: str = "export",
) -> list[tuple[QueryRecord, list[list[float]]]]:
    """One entry per ground-truth record, in the records' order (the annotation file's order, as the readers keep
    it): the record and its first ``max_predictions`` predictions, or ``[PLACEHOLDER]`` when the query has no row
    or an empty list.  A row for a query id that is not in the records, or a second row for one, is an error.  The
    number of placeholders is logged as one warning naming ``what``."""
    if max_predictions is not None and max_predictions < 1:
        raise ValueError(f"max_predictions must be >= 1 or None, got {max_predictions}")
    records = list(records)
    by_id: dict[str, PredictionRow] = {}
    known = {r.query_id for r in records}
    for row in rows:
        if row.query_id not in known:
            raise DataError(
                source,
                "query id is not in the annotations",
                record=row.query_id,
                field="query_id",
                fix="use the annotation file (and split) the predictions were made for",
            )
        if row.query_id in by_id:
            raise DataError(source, "duplicate query id", record=row.query_id, field="query_id")
        by_id[row.query_id] = row
    entries: list[tuple[QueryRecord, list[list[float]]]] = []
    missing = 0
    for rec in records:
        found = by_id.get(rec.query_id)
        preds = found.predictions[:max_predictions] if found is not None else []
        if not preds:
            missing += 1
            preds = [list(PLACEHOLDER)]
        entries.append((rec, preds))
    if missing:
        log.warning(
            "%s: %d of %d queries had no predictions: exported a zero-length placeholder at 0 s (score 0) for each, "
            "which has IoU 0 with every ground truth of positive length",
            what,
            missing,
            len(records),
        )
    return entries


def _split_ego4d_query_id(query_id: str, source: object) -> tuple[str, int]:
    """``"<annotation_uid>_<index>"`` -> (annotation_uid, index), splitting on the last underscore."""
    uid, sep, idx = query_id.rpartition("_")
    if not sep or not uid or not idx.isdigit():
        raise DataError(
            source,
            "is not an Ego4D-NLQ query id '<annotation_uid>_<index>'",
            record=query_id,
            field="query_id",
            fix="export to the Ego4D challenge layout only predictions on Ego4D-NLQ",
        )
    return uid, int(idx)


def to_ego4d_challenge(
    rows: Iterable[PredictionRow],
    records: Iterable[QueryRecord],
    *,
    max_predictions: int | None = None,
    source: object = "<predictions>",
) -> dict[str, Any]:
    """The Ego4D NLQ challenge submission: ``{"version": "1.0", "challenge": "ego4d_nlq_challenge", "results":
    [{clip_uid, annotation_uid, query_idx, predicted_times: [[start, end], ...]}]}``, one result per record (see
    :func:`export_entries`).  The official ``evaluate_ego4d_nlq.py`` looks each result up by (clip_uid,
    annotation_uid) and ``language_queries[query_idx]``, and reads the first 1/3/5 ``predicted_times``."""
    results = []
    for rec, preds in export_entries(
        rows, records, max_predictions=max_predictions, source=source, what="Ego4D NLQ export"
    ):
        uid, idx = _split_ego4d_query_id(rec.query_id, source)
        results.append(
            {
                "clip_uid": rec.video_id,
                "annotation_uid": uid,
                "query_idx": idx,
                "predicted_times": [[p[0], p[1]] for p in preds],
            }
        )
    return {"version": "1.0", "challenge": "ego4d_nlq_challenge", "results": results}


def _moment_detr_qid(query_id: str) -> int | str:
    # QVHighlights qids are integers and Moment-DETR's evaluator matches them by value: keep digit ids numeric.
    return int(query_id) if query_id.isdigit() else query_id


def to_moment_detr_jsonl(
    rows: Iterable[PredictionRow],
    records: Iterable[QueryRecord],
    *,
    max_predictions: int | None = None,
    source: object = "<predictions>",
) -> list[dict[str, Any]]:
    """Moment-DETR submission rows ``{"qid", "query", "vid", "pred_relevant_windows": [[s, e, score], ...]}``, one
    per record (see :func:`export_entries`).  ``qid`` is an int when the query id is all digits (as in
    QVHighlights), else the string."""
    return [
        {
            "qid": _moment_detr_qid(rec.query_id),
            "query": rec.query,
            "vid": rec.video_id,
            "pred_relevant_windows": [list(p) for p in preds],
        }
        for rec, preds in export_entries(
            rows, records, max_predictions=max_predictions, source=source, what="Moment-DETR export"
        )
    ]


def to_cone_mad_jsonl(
    rows: Iterable[PredictionRow],
    records: Iterable[QueryRecord],
    *,
    max_predictions: int | None = None,
    source: object = "<predictions>",
) -> list[dict[str, Any]]:
    """CONE's MAD submission rows ``{"query_id", "video_id", "predicted_times": [[s, e, score], ...]}``, one per
    record (see :func:`export_entries`); CONE's ``standalone_eval/evaluate_mad.py`` matches ``query_id`` (the MAD
    annotation key) against its ground truth and reads start and end of the first K ``predicted_times``."""
    return [
        {"query_id": rec.query_id, "video_id": rec.video_id, "predicted_times": [list(p) for p in preds]}
        for rec, preds in export_entries(
            rows, records, max_predictions=max_predictions, source=source, what="CONE MAD export"
        )
    ]


def write_ego4d_challenge(
    path: str | os.PathLike[str], rows: Iterable[PredictionRow], records: Iterable[QueryRecord], **kwargs: Any
) -> None:
    """Write :func:`to_ego4d_challenge` as one JSON file (atomically)."""
    atomic_write_json(path, to_ego4d_challenge(rows, records, **kwargs))


def write_moment_detr(
    path: str | os.PathLike[str], rows: Iterable[PredictionRow], records: Iterable[QueryRecord], **kwargs: Any
) -> None:
    """Write :func:`to_moment_detr_jsonl` as JSON Lines (atomically)."""
    atomic_write_jsonl(path, to_moment_detr_jsonl(rows, records, **kwargs))


def write_cone_mad(
    path: str | os.PathLike[str], rows: Iterable[PredictionRow], records: Iterable[QueryRecord], **kwargs: Any
) -> None:
    """Write :func:`to_cone_mad_jsonl` as JSON Lines (atomically)."""
    atomic_write_jsonl(path, to_cone_mad_jsonl(rows, records, **kwargs))
