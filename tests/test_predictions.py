"""rgnet.eval.predictions: prediction file round trip, every malformed-row error, exporters' structure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rgnet.data.records import DataError, QueryRecord
from rgnet.eval.predictions import (
    PredictionRow,
    read_predictions,
    to_ego4d_challenge,
    to_moment_detr_jsonl,
    write_ego4d_challenge,
    write_moment_detr,
    write_predictions,
)


def _record(qid: str, vid: str = "v1", query: str = "a person opens the door") -> QueryRecord:
    return QueryRecord(qid, vid, query, 1.0, 3.0, 60.0, vid, qid)


ROWS = [
    PredictionRow("ann7_0", "clipA", [[1.0, 3.5, 0.9], [10.0, 12.0, 0.4]], [[0.0, 48.0, 0.8], [24.0, 60.0, 0.1]]),
    PredictionRow("ann7_12", "clipA", []),
    PredictionRow("xy_z_3", "clipB", [[2.0, 2.0, 0.5], [0.0, 1.0, 0.5]]),  # tied scores, zero-length span
]
RECORDS = [_record("ann7_0", "clipA"), _record("ann7_12", "clipA"), _record("xy_z_3", "clipB")]


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "preds.jsonl"
    write_predictions(path, ROWS)
    assert read_predictions(path) == ROWS
    first = json.loads(path.read_text().splitlines()[0])
    assert set(first) == {"query_id", "video_id", "predictions", "windows"}
    assert "windows" not in json.loads(path.read_text().splitlines()[1])  # None is omitted, not null
    assert [p.name for p in path.parent.iterdir()] == ["preds.jsonl"]  # no temporary file left behind


def test_blank_lines_skipped_and_null_windows_accepted(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('\n{"query_id": "q", "video_id": "v", "predictions": [[0, 1, 2]], "windows": null}\n\n')
    assert read_predictions(path) == [PredictionRow("q", "v", [[0.0, 1.0, 2.0]], None)]


def _write_lines(tmp_path: Path, *objs: object) -> Path:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(o if isinstance(o, str) else json.dumps(o) for o in objs) + "\n")
    return path


GOOD = {"query_id": "q1", "video_id": "v1", "predictions": [[0.0, 1.0, 0.9]]}


@pytest.mark.parametrize(
    ("bad", "field", "message"),
    [
        ('{"query_id": "q2", "video_id": ', None, "not valid JSON"),
        ("[1, 2]", None, "JSON object"),
        ({"query_id": "q2", "predictions": []}, "video_id", "missing field"),
        ({"video_id": "v", "predictions": []}, "query_id", "missing field"),
        ({"query_id": "q2", "video_id": "v"}, "predictions", "missing field"),
        ({"query_id": 7, "video_id": "v", "predictions": []}, "query_id", "non-empty string"),
        ({"query_id": "q2", "video_id": "", "predictions": []}, "video_id", "non-empty string"),
        ({"query_id": "q2", "video_id": "v", "predictions": [[0, "1", 0.5]]}, "predictions[0]", "finite numbers"),
        ({"query_id": "q2", "video_id": "v", "predictions": [[0, 1, True]]}, "predictions[0]", "finite numbers"),
        ({"query_id": "q2", "video_id": "v", "predictions": [[0, 1, None]]}, "predictions[0]", "finite numbers"),
        ('{"query_id": "q2", "video_id": "v", "predictions": [[0, NaN, 1]]}', "predictions[0]", "finite numbers"),
        ({"query_id": "q2", "video_id": "v", "predictions": [[0, 1]]}, "predictions[0]", "[start_sec, end_sec"),
        ({"query_id": "q2", "video_id": "v", "predictions": {"a": 1}}, "predictions", "must be a list"),
        ({"query_id": "q2", "video_id": "v", "predictions": [[0, 1, 0.2], [3, 2, 0.1]]}, "predictions[1]", "after end"),
        (
            {"query_id": "q2", "video_id": "v", "predictions": [[0, 1, 0.2], [2, 3, 0.5]]},
            "predictions[1]",
            "sort the list by score",
        ),
        ({"query_id": "q2", "video_id": "v", "predictions": [], "windows": [[5, 4, 1]]}, "windows[0]", "after end"),
        ({"query_id": "q2", "video_id": "v", "predictions": [], "window": []}, "window", "did you mean 'windows'"),
        ({"query_id": "q1", "video_id": "v", "predictions": []}, "query_id", "duplicate query id"),
    ],
)
def test_malformed_rows(tmp_path: Path, bad: object, field: str | None, message: str) -> None:
    path = _write_lines(tmp_path, GOOD, bad)
    with pytest.raises(DataError) as info:
        read_predictions(path)
    err = info.value
    assert err.file == str(path)
    assert "line 2" in str(err.record)
    assert err.field == field
    assert message in str(err)


def test_error_names_query_id_when_known(tmp_path: Path) -> None:
    path = _write_lines(tmp_path, {"query_id": "q9", "video_id": "v", "predictions": [[2, 1, 0.3]]})
    with pytest.raises(DataError, match=r"line 1 \(query q9\).*predictions\[0\]"):
        read_predictions(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="prediction file not found"):
        read_predictions(tmp_path / "nope.jsonl")


# --- exporters ------------------------------------------------------------------------------------------------------
def test_ego4d_challenge_structure(tmp_path: Path) -> None:
    sub = to_ego4d_challenge(ROWS, RECORDS)
    assert sub["version"] == "1.0" and sub["challenge"] == "ego4d_nlq_challenge"
    assert sub["results"] == [
        {"clip_uid": "clipA", "annotation_uid": "ann7", "query_idx": 0, "predicted_times": [[1.0, 3.5], [10.0, 12.0]]},
        {"clip_uid": "clipA", "annotation_uid": "ann7", "query_idx": 12, "predicted_times": [[0.0, 0.0]]},  # empty
        {
            "clip_uid": "clipB",
            "annotation_uid": "xy_z",
            "query_idx": 3,  # split on the last underscore
            "predicted_times": [[2.0, 2.0], [0.0, 1.0]],
        },
    ]
    capped = to_ego4d_challenge(ROWS, RECORDS, max_predictions=1)
    assert [len(r["predicted_times"]) for r in capped["results"]] == [1, 1, 1]
    path = tmp_path / "ego4d.json"
    write_ego4d_challenge(path, ROWS, RECORDS)
    assert json.loads(path.read_text()) == sub


def test_ego4d_challenge_rejects_non_ego4d_query_ids() -> None:
    rows = [PredictionRow("noindex", "v1", [])]
    with pytest.raises(DataError, match="annotation_uid") as info:
        to_ego4d_challenge(rows, [_record("noindex")])
    assert info.value.field == "query_id"


def test_exporters_reject_unknown_query_ids() -> None:
    rows = [PredictionRow("ann9_0", "v1", [])]
    for export in (to_ego4d_challenge, to_moment_detr_jsonl):
        with pytest.raises(DataError, match="not in the annotations") as info:
            export(rows, RECORDS, source="preds.jsonl")
        assert info.value.field == "query_id" and info.value.file == "preds.jsonl"


def test_moment_detr_structure(tmp_path: Path) -> None:
    rows = [*ROWS, PredictionRow("42", "vid9", [[3.0, 4.0, 0.7]])]
    records = [*RECORDS, _record("42", "vid9", "a dog runs")]
    out = to_moment_detr_jsonl(rows, records)
    assert out[0] == {
        "qid": "ann7_0",
        "query": "a person opens the door",
        "vid": "clipA",
        "pred_relevant_windows": [[1.0, 3.5, 0.9], [10.0, 12.0, 0.4]],
    }
    assert out[3] == {"qid": 42, "query": "a dog runs", "vid": "vid9", "pred_relevant_windows": [[3.0, 4.0, 0.7]]}
    path = tmp_path / "md.jsonl"
    write_moment_detr(path, rows, records)
    assert [json.loads(line) for line in path.read_text().splitlines()] == out
