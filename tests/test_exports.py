"""Submission exports round-tripped against the official evaluators' input schemas, without the network.

Each test writes a small hand-written ground truth in the official layout, reads it with our reader, exports a
prediction set that has every awkward case (rows out of file order, an empty prediction list, a query with no row,
more predictions than the cap), and checks the exported file field by field against what the official script reads.
The schemas were read from the scripts themselves:

- Ego4D NLQ, ``EGO4D/episodic-memory`` ``NLQ/VSLNet/utils/evaluate_ego4d_nlq.py``: the submission's ``version``
  (must be "1.0"), ``challenge`` (must be "ego4d_nlq_challenge") and ``results``; per result ``clip_uid`` and
  ``annotation_uid`` (looked up as a pair in the ground truth, asserting it is there), ``query_idx`` (an index into
  that annotation's ``language_queries``) and ``predicted_times`` (a list of [start, end]; the script reads element
  0 unconditionally, so an empty list raises IndexError, and the first K for Recall@K).  It averages over the
  submitted results, not over the ground truth.
- Moment-DETR, ``jayleicn/moment_detr`` ``standalone_eval/eval.py``: JSON Lines rows with ``qid`` (the set of qids
  must equal the ground truth's, or it asserts) and ``pred_relevant_windows`` ([start, end, score]; element 0 is
  read for R1, the score for mAP); a ``pred_saliency_scores`` key would switch on highlight evaluation.
- CONE, ``houzhijian/CONE`` ``standalone_eval/evaluate_mad.py``: JSON Lines rows with ``query_id`` (the set must equal
  the ground truth's) and ``predicted_times`` (made a tensor; columns 0 and 1 are start and end, so the list must be
  non-empty and rectangular); the ground truth is CONE's JSON Lines of ``query_id`` and ``timestamps``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from rgnet.data.dataset import read_annotations
from rgnet.data.records import QueryRecord
from rgnet.eval.metrics import evaluate
from rgnet.eval.predictions import (
    PLACEHOLDER,
    PredictionRow,
    to_cone_mad_jsonl,
    write_cone_mad,
    write_ego4d_challenge,
    write_moment_detr,
    write_predictions,
)

CAP = 3


def _ranked(n: int, start: float) -> list[list[float]]:
    """``n`` predictions [s, s + 2, score], scores descending."""
    return [[start + i, start + i + 2.0, round(0.9 - 0.1 * i, 2)] for i in range(n)]


def _iou(a: list[float], b: list[float]) -> float:
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = max(a[1], b[1]) - min(a[0], b[0])
    return inter / union if union > 0 else 0.0


# --- Ego4D NLQ ------------------------------------------------------------------------------------------------------
EGO4D_GT: dict[str, Any] = {
    "version": "v1",
    "videos": [
        {
            "video_uid": "vid-1",
            "clips": [
                {
                    "clip_uid": "clip-b",
                    "clip_start_sec": 0.0,
                    "clip_end_sec": 480.0,
                    "annotations": [
                        {
                            "annotation_uid": "ann-2",
                            "language_queries": [
                                {"clip_start_sec": 10.0, "clip_end_sec": 14.0, "query": "where was the knife?"},
                                {"clip_start_sec": 30.0, "clip_end_sec": 31.0},  # no query text: skipped by readers
                                {"clip_start_sec": 50.0, "clip_end_sec": 55.0, "query": "who did I talk to?"},
                            ],
                        }
                    ],
                },
                {
                    "clip_uid": "clip-a",
                    "clip_start_sec": 0.0,
                    "clip_end_sec": 480.0,
                    "annotations": [
                        {
                            "annotation_uid": "ann-1",
                            "language_queries": [
                                {"clip_start_sec": 100.0, "clip_end_sec": 104.0, "query": "what did I pour?"},
                                {"clip_start_sec": 200.0, "clip_end_sec": 200.0, "query": "when did I sit?"},
                            ],
                        }
                    ],
                },
            ],
        }
    ],
}
# out of file order; ann-2_2 has an empty list, ann-1_1 (the zero-length moment) has no row, ann-1_0 has more
# predictions than the cap
EGO4D_ROWS = [
    PredictionRow("ann-1_0", "clip-a", _ranked(6, 99.0)),
    PredictionRow("ann-2_0", "clip-b", _ranked(2, 10.0)),
    PredictionRow("ann-2_2", "clip-b", []),
]


def check_ego4d_submission(sub: dict[str, Any], gt: dict[str, Any], cap: int) -> list[tuple[str, str, int]]:
    """What evaluate_ego4d_nlq.py reads, checked; returns the (clip_uid, annotation_uid, query_idx) keys in order."""
    assert sub["version"] == "1.0" and sub["challenge"] == "ego4d_nlq_challenge"
    gt_anns = {
        (clip["clip_uid"], ann["annotation_uid"]): ann
        for video in gt["videos"]
        for clip in video["clips"]
        for ann in clip["annotations"]
    }
    keys = []
    for result in sub["results"]:
        assert set(result) == {"clip_uid", "annotation_uid", "query_idx", "predicted_times"}, result
        key = (result["clip_uid"], result["annotation_uid"])
        assert key in gt_anns, key  # the script asserts "Instance not present!"
        assert isinstance(result["query_idx"], int)
        assert 0 <= result["query_idx"] < len(gt_anns[key]["language_queries"])
        times = result["predicted_times"]
        assert 1 <= len(times) <= cap  # non-empty: the script reads times[0]
        assert all(len(t) == 2 and all(isinstance(x, float) for x in t) for t in times), times
        keys.append((*key, result["query_idx"]))
    return keys


def test_ego4d_round_trip(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    gt_path = tmp_path / "nlq_val.json"
    gt_path.write_text(json.dumps(EGO4D_GT))
    records, _ = read_annotations("ego4d", gt_path, drop_zero_length=False)
    out = tmp_path / "submission.json"
    with caplog.at_level(logging.WARNING, logger="rgnet.eval.predictions"):
        write_ego4d_challenge(out, EGO4D_ROWS, records, max_predictions=CAP)
    sub = json.loads(out.read_text())
    keys = check_ego4d_submission(sub, EGO4D_GT, CAP)
    # one entry per ground-truth query with a text, in the file's order (index 1 has no text, so no record)
    assert keys == [("clip-b", "ann-2", 0), ("clip-b", "ann-2", 2), ("clip-a", "ann-1", 0), ("clip-a", "ann-1", 1)]
    times = [r["predicted_times"] for r in sub["results"]]
    assert times[0] == [[10.0, 12.0], [11.0, 13.0]]  # two predictions, under the cap
    assert times[1] == [[0.0, 0.0]]  # empty list -> placeholder
    assert times[2] == [[99.0, 101.0], [100.0, 102.0], [101.0, 103.0]]  # six predictions, capped at 3
    assert times[3] == [[0.0, 0.0]]  # no row -> placeholder
    # the GT entry each result points at is the moment of the record it came from
    for (clip, ann, idx), rec in zip(keys, records, strict=True):
        entry = next(
            a["language_queries"][idx]
            for v in EGO4D_GT["videos"]
            for c in v["clips"]
            for a in c["annotations"]
            if (c["clip_uid"], a["annotation_uid"]) == (clip, ann)
        )
        assert (entry["clip_start_sec"], entry["clip_end_sec"]) == (rec.start_sec, rec.end_sec)
    warnings = [r.getMessage() for r in caplog.records if "placeholder" in r.getMessage()]
    assert len(warnings) == 1 and "2 of 4 queries had no predictions" in warnings[0], warnings


def test_ego4d_script_average_equals_ours_once_every_query_is_submitted(tmp_path: Path) -> None:
    """The official script averages over the submitted results; with one result per ground-truth query (the
    placeholders scoring IoU 0) that is our average over all ground-truth queries."""
    gt_path = tmp_path / "nlq_val.json"
    gt_path.write_text(json.dumps(EGO4D_GT))
    records, _ = read_annotations("ego4d", gt_path, drop_zero_length=False)
    out = tmp_path / "submission.json"
    write_ego4d_challenge(out, EGO4D_ROWS, records, max_predictions=CAP)
    results = json.loads(out.read_text())["results"]
    by_key = {(r.video_id, *r.query_id.rsplit("_", 1)): r for r in records}
    ours = evaluate(
        EGO4D_ROWS, records, profile="rgnet", recall_ks=[1, 3], iou_thresholds=[0.3, 0.5], retrieval_ks=[1],
        max_predictions=CAP,
    )["metrics"]  # fmt: skip
    for k in (1, 3):
        for m in (0.3, 0.5):
            hits = []
            for res in results:  # the script's rule: any of the first K has IoU > m, mean over submitted results
                rec = by_key[(res["clip_uid"], res["annotation_uid"], str(res["query_idx"]))]
                hits.append(any(_iou(t, [rec.start_sec, rec.end_sec]) > m for t in res["predicted_times"][:k]))
            assert 100 * sum(hits) / len(hits) == pytest.approx(ours[f"R{k}@{m:g}"]), (k, m)


# --- Moment-DETR (QVHighlights) -------------------------------------------------------------------------------------
MD_GT = [  # what standalone_eval/eval.py is given as ground truth (one JSON object per line)
    {"qid": 7803, "query": "a man walks in", "duration": 150, "vid": "vA_0.0_150.0", "relevant_windows": [[26, 36]]},
    {"qid": 42, "query": "a dog runs", "duration": 150, "vid": "vB_0.0_150.0", "relevant_windows": [[0, 10]]},
    {"qid": 9, "query": "rain falls", "duration": 150, "vid": "vA_0.0_150.0", "relevant_windows": [[70, 90]]},
]


def _native_from(gt: list[dict[str, Any]], path: Path) -> None:
    """The same queries in our native layout (what rgnet evaluate --annotations reads)."""
    lines = [
        json.dumps(
            {
                "query_id": str(d["qid"]),
                "video_id": d["vid"],
                "query": d["query"],
                "start_sec": float(d["relevant_windows"][0][0]),
                "end_sec": float(d["relevant_windows"][0][1]),
                "duration_sec": float(d["duration"]),
            }
        )
        for d in gt
    ]
    path.write_text("\n".join(lines) + "\n")


def test_moment_detr_round_trip(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ann = tmp_path / "val.jsonl"
    _native_from(MD_GT, ann)
    records, _ = read_annotations("native", ann)
    rows = [PredictionRow("9", "vA_0.0_150.0", []), PredictionRow("7803", "vA_0.0_150.0", _ranked(5, 25.0))]
    out = tmp_path / "submission.jsonl"
    with caplog.at_level(logging.WARNING, logger="rgnet.eval.predictions"):
        write_moment_detr(out, rows, records, max_predictions=CAP)
    sub = [json.loads(line) for line in out.read_text().splitlines()]
    gt_by_qid = {d["qid"]: d for d in MD_GT}
    assert {d["qid"] for d in sub} == set(gt_by_qid)  # eval_submission asserts the qid sets are equal
    assert [d["qid"] for d in sub] == [7803, 42, 9]  # the ground truth's order; ints, as in the GT
    for d in sub:
        assert set(d) == {"qid", "query", "vid", "pred_relevant_windows"}  # no pred_saliency_scores
        assert (d["query"], d["vid"]) == (gt_by_qid[d["qid"]]["query"], gt_by_qid[d["qid"]]["vid"])
        windows = d["pred_relevant_windows"]
        assert 1 <= len(windows) <= CAP  # non-empty: compute_mr_r1 reads windows[0][:2]
        assert all(len(w) == 3 and all(isinstance(x, float) for x in w) for w in windows)
        assert [w[2] for w in windows] == sorted((w[2] for w in windows), reverse=True)
    assert sub[0]["pred_relevant_windows"] == _ranked(5, 25.0)[:CAP]  # capped
    assert sub[1]["pred_relevant_windows"] == [list(PLACEHOLDER)]  # no row
    assert sub[2]["pred_relevant_windows"] == [list(PLACEHOLDER)]  # empty list
    assert any("2 of 3 queries had no predictions" in r.getMessage() for r in caplog.records)


# --- CONE on MAD ----------------------------------------------------------------------------------------------------
MAD_GT: dict[str, Any] = {  # MAD_test.json: a dict keyed by annotation id, in file order
    "m2": {"movie": "1001", "sentence": "Someone opens a door.", "timestamps": [12.5, 15.0],
           "ext_timestamps": [12.0, 15.5], "movie_duration": 5400.0},
    "m10": {"movie": "1001", "sentence": "She smiles.", "timestamps": [300.0, 302.4],
            "ext_timestamps": [299.0, 303.0], "movie_duration": 5400.0},
    "m1": {"movie": "2002", "sentence": "A car drives away.", "timestamps": [60.0, 64.0],
           "ext_timestamps": [59.0, 65.0], "movie_duration": 7200.0},
}  # fmt: skip


def test_cone_mad_round_trip(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ann = tmp_path / "MAD_test.json"
    ann.write_text(json.dumps(MAD_GT))
    records, _ = read_annotations("mad", ann)
    # CONE's ground truth for evaluate_mad.py (data/reformat_data.py): one {query_id, timestamps, ...} per key
    cone_gt = [{"query_id": key, "timestamps": value["timestamps"]} for key, value in MAD_GT.items()]
    rows = [PredictionRow("m1", "2002", _ranked(7, 59.0)), PredictionRow("m2", "1001", [])]
    out = tmp_path / "cone_preds.jsonl"
    with caplog.at_level(logging.WARNING, logger="rgnet.eval.predictions"):
        write_cone_mad(out, rows, records, max_predictions=CAP)
    sub = [json.loads(line) for line in out.read_text().splitlines()]
    assert {d["query_id"] for d in sub} == {d["query_id"] for d in cone_gt}  # the script asserts equal sets
    assert [d["query_id"] for d in sub] == ["m2", "m10", "m1"]  # the annotation file's order
    for d in sub:
        assert set(d) == {"query_id", "video_id", "predicted_times"}
        assert d["video_id"] == MAD_GT[d["query_id"]]["movie"]
        times = torch.tensor(d["predicted_times"])  # what the script does with them
        assert times.ndim == 2 and 1 <= times.shape[0] <= CAP and times.shape[1] == 3
        assert bool((times[:, 0] <= times[:, 1]).all())
    assert [d["predicted_times"] for d in sub] == [[list(PLACEHOLDER)], [list(PLACEHOLDER)], _ranked(7, 59.0)[:CAP]]
    assert any("2 of 3 queries had no predictions" in r.getMessage() for r in caplog.records)


def test_the_placeholder_scores_iou_zero() -> None:
    """A zero-length span at 0 misses every ground truth of positive length, wherever it lies."""
    for gt in ([0.0, 4.0], [10.0, 14.0], [0.0, 0.5]):
        assert _iou(list(PLACEHOLDER[:2]), gt) == 0.0


def test_cone_float32_tie() -> None:
    """The README's example: prediction [2.8, 3.8] against ground truth [3.1, 4.2] has IoU 0.7 / 1.4 = 1/2 on paper.
    Our metrics (float64) give 0.49999999999999967: a miss at IoU > 0.5 (and even at >= 0.5). CONE's evaluate_mad.py
    casts to float32 (``.float()``), where it is 0.50000006: a hit at IoU > 0.5."""
    record = QueryRecord("q", "v", "s", 3.1, 4.2, 10.0, "v", "q")
    row = PredictionRow("q", "v", [[2.8, 3.8, 1.0]])
    for profile in ("rgnet", "geq"):
        report = evaluate([row], [record], profile=profile, recall_ks=[1], iou_thresholds=[0.5], retrieval_ks=[1])
        assert report["metrics"]["R1@0.5"] == 0.0, profile
        assert report["metrics"]["mIoU"] == pytest.approx(50.0)
    pred, gt = torch.tensor([[2.8, 3.8]]).float(), torch.tensor([3.1, 4.2]).float()
    inter = (pred[:, 1].min(gt[1]) - pred[:, 0].max(gt[0])).clamp(min=0)
    union = pred[:, 1].max(gt[1]) - pred[:, 0].min(gt[0])
    assert (inter / union).item() > 0.5 > 0.49999999999999967


def test_exports_refuse_a_duplicate_row() -> None:
    records = [QueryRecord("a", "v", "s", 1.0, 2.0, 10.0, "v", "a")]
    rows = [PredictionRow("a", "v", [[1.0, 2.0, 0.5]]), PredictionRow("a", "v", [])]
    with pytest.raises(ValueError, match="duplicate query id"):
        to_cone_mad_jsonl(rows, records)
    with pytest.raises(ValueError, match="max_predictions must be >= 1"):
        to_cone_mad_jsonl(rows[:1], records, max_predictions=0)


def test_cli_exports_every_query_capped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`rgnet evaluate --max-predictions 2` caps the metrics and all three exports alike; the zero-length moment is
    left out of the metrics (the default) but exported, with a placeholder since it has no row."""
    from pipelines.evaluate import main

    gt_path = tmp_path / "nlq_val.json"
    gt_path.write_text(json.dumps(EGO4D_GT))
    preds = tmp_path / "preds.jsonl"
    write_predictions(preds, EGO4D_ROWS)
    ego4d, md, cone, report = (tmp_path / n for n in ("ego4d.json", "md.jsonl", "cone.jsonl", "report.json"))
    with caplog.at_level(logging.WARNING):
        rc = main(
            ["--predictions", str(preds), "--annotations", str(gt_path), "--layout", "ego4d", "--max-predictions", "2",
             "--out", str(report), "--export-ego4d", str(ego4d), "--export-moment-detr", str(md),
             "--export-cone-mad", str(cone)]
        )  # fmt: skip
    assert rc == 0
    rep = json.loads(report.read_text())
    assert rep["prediction_cap"] == 2 and rep["num_queries"] == 3 and rep["num_zero_length_dropped"] == 1
    sub = json.loads(ego4d.read_text())
    check_ego4d_submission(sub, EGO4D_GT, cap=2)
    assert [len(r["predicted_times"]) for r in sub["results"]] == [2, 1, 2, 1]
    md_rows = [json.loads(line) for line in md.read_text().splitlines()]
    cone_rows = [json.loads(line) for line in cone.read_text().splitlines()]
    qids = ["ann-2_0", "ann-2_2", "ann-1_0", "ann-1_1"]
    assert [d["qid"] for d in md_rows] == qids and [d["query_id"] for d in cone_rows] == qids
    assert [len(d["pred_relevant_windows"]) for d in md_rows] == [2, 1, 2, 1]
    assert [len(d["predicted_times"]) for d in cone_rows] == [2, 1, 2, 1]
    counted = [r.getMessage() for r in caplog.records if "2 of 4 queries had no predictions" in r.getMessage()]
    assert len(counted) == 3  # one counted warning per export file
