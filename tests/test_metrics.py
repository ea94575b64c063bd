"""rgnet.eval.metrics (hand-computed cases, both profiles) and the `rgnet evaluate` prediction-file pipeline."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from rgnet.data.records import DataError, QueryRecord
from rgnet.eval.metrics import evaluate, format_table
from rgnet.eval.predictions import PredictionRow, write_predictions


def _rec(qid: str, start: float, end: float, vid: str = "v1", duration: float = 100.0) -> QueryRecord:
    return QueryRecord(qid, vid, f"query {qid}", start, end, duration, vid, qid)


# IoUs chosen to be exact in floating point: [1,3] vs [0,4] = 2/4 = 0.5; [0,3] vs [0,10] = 3/10 = 0.3.
RECORDS = [
    _rec("a", 0.0, 4.0),  # top-1 IoU exactly 0.5
    _rec("b", 0.0, 10.0),  # top-1 IoU 0, second IoU exactly 0.3
    _rec("c", 10.0, 20.0),  # empty prediction list
    _rec("d", 5.0, 6.0),  # no row at all
    _rec("e", 0.0, 1.0),  # perfect top-1 (tied scores)
]
ROWS = [
    PredictionRow("a", "v1", [[1.0, 3.0, 0.9]]),
    PredictionRow("b", "v1", [[20.0, 30.0, 0.9], [0.0, 3.0, 0.8]]),
    PredictionRow("c", "v1", []),
    PredictionRow("e", "v1", [[0.0, 1.0, 0.5], [50.0, 60.0, 0.5]]),
]


def _run(profile: str, rows: list[PredictionRow] = ROWS, **kw: object) -> dict:
    args: dict = {"recall_ks": [1, 5], "iou_thresholds": [0.3, 0.5], "retrieval_ks": [1, 2], "source": "p.jsonl"}
    args.update(kw)
    return evaluate(rows, RECORDS, profile=profile, **args)


def test_rgnet_profile_iou_strictly_greater() -> None:
    m = _run("rgnet")["metrics"]
    assert m["R1@0.3"] == pytest.approx(40.0)  # a (0.5 > 0.3), e
    assert m["R1@0.5"] == pytest.approx(20.0)  # e only: a's IoU 0.5 is not > 0.5
    assert m["R5@0.3"] == pytest.approx(40.0)  # b's second IoU 0.3 is not > 0.3
    assert m["R5@0.5"] == pytest.approx(20.0)


def test_geq_profile_iou_at_threshold_is_a_hit() -> None:
    m = _run("geq")["metrics"]
    assert m["R1@0.3"] == pytest.approx(40.0)
    assert m["R1@0.5"] == pytest.approx(40.0)  # a: 0.5 >= 0.5
    assert m["R5@0.3"] == pytest.approx(60.0)  # b's second prediction: 0.3 >= 0.3
    assert m["R5@0.5"] == pytest.approx(40.0)


def test_miou_counts_missing_queries_as_zero() -> None:
    m = _run("rgnet")["metrics"]
    assert m["mIoU"] == pytest.approx(100.0 * (0.5 + 0.0 + 0.0 + 0.0 + 1.0) / 5)


def test_report_counts_and_cap_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="rgnet.eval.metrics"):
        report = _run("rgnet")
    assert report["profile"] == "rgnet" and report["iou_rule"] == "IoU > m"
    assert report["num_queries"] == 5  # all GT queries, not only predicted ones
    assert report["num_without_predictions"] == 2  # c (empty list) and d (no row)
    assert report["prediction_cap"] == 2  # most predictions any row holds
    assert any("R5@… uses at most 2 predictions per query" in w for w in report["warnings"])
    assert not any(w.startswith("R1@") for w in report["warnings"])
    assert any("2 of 5 queries have no prediction" in w for w in report["warnings"])
    assert "uses at most 2 predictions" in caplog.text
    json.dumps(report)  # plain JSON data


def test_explicit_cap_truncates_predictions() -> None:
    report = _run("geq", max_predictions=1)
    m = report["metrics"]
    assert report["prediction_cap"] == 1
    assert m["R5@0.3"] == m["R1@0.3"] == pytest.approx(40.0)  # b's second prediction is beyond the cap
    assert any("R5@… uses at most 1 predictions" in w for w in report["warnings"])


def test_ties_in_scores_keep_file_order() -> None:
    swapped = [*ROWS[:3], PredictionRow("e", "v1", [[50.0, 60.0, 0.5], [0.0, 1.0, 0.5]])]
    m = _run("rgnet", swapped)["metrics"]
    assert m["R1@0.5"] == pytest.approx(0.0)  # e's hit is now second
    assert m["R5@0.5"] == pytest.approx(20.0)


def test_fewer_predictions_than_k_uses_those_present() -> None:
    m = _run("rgnet", recall_ks=[1, 100])["metrics"]
    assert m["R100@0.3"] == pytest.approx(40.0)
    assert set(m) >= {"R1@0.3", "R100@0.3", "R1@0.5", "R100@0.5"}


def test_no_predictions_at_all() -> None:
    report = _run("rgnet", [])
    assert report["num_without_predictions"] == 5
    assert all(v == 0.0 for v in report["metrics"].values())


def test_unknown_query_id_is_an_error() -> None:
    with pytest.raises(DataError) as info:
        _run("rgnet", [*ROWS, PredictionRow("zz", "v1", [[0.0, 1.0, 1.0]])])
    err = info.value
    assert err.file == "p.jsonl" and err.record == "zz" and err.field == "query_id"


def test_duplicate_rows_are_an_error() -> None:
    with pytest.raises(DataError, match="duplicate"):
        _run("rgnet", [*ROWS, ROWS[0]])


def test_bad_profile_rejected() -> None:
    with pytest.raises(ValueError, match="profile"):
        _run("strict")


# --- retrieval -------------------------------------------------------------------------------------------------------
def _win_rows(windows: dict[str, list[list[float]] | None]) -> list[PredictionRow]:
    return [PredictionRow(q, "v1", [], w) for q, w in windows.items()]


def test_retrieval_recall() -> None:
    records = [_rec("r1", 50.0, 55.0), _rec("r2", 96.0, 96.0), _rec("r3", 48.0, 48.0), _rec("r4", 0.0, 5.0)]
    # the video's windows: [0, 48) [24, 72) [48, 96) seconds
    rows = _win_rows(
        {
            "r1": [[0.0, 48.0, 0.9], [24.0, 72.0, 0.5], [48.0, 96.0, 0.3]],  # first positive at rank 2
            "r2": [[48.0, 96.0, 0.9], [0.0, 48.0, 0.5], [24.0, 72.0, 0.1]],  # point at the video's end: last window
            "r3": [[0.0, 48.0, 0.9], [48.0, 96.0, 0.8], [24.0, 72.0, 0.1]],  # point 48 is not in [0, 48)
            "r4": None,  # no ranked windows: a miss
        }
    )
    report = evaluate(rows, records, profile="rgnet", recall_ks=[1], iou_thresholds=[0.5], retrieval_ks=[1, 2, 3])
    m = report["metrics"]
    assert m["retrieval_R1"] == pytest.approx(25.0)  # r2
    assert m["retrieval_R2"] == pytest.approx(75.0)  # r1, r2, r3
    assert m["retrieval_R3"] == pytest.approx(75.0)
    assert any("1 of 4 queries have no ranked windows" in w for w in report["warnings"])


def test_retrieval_omitted_without_windows() -> None:
    report = _run("rgnet")
    assert not any(k.startswith("retrieval_") for k in report["metrics"])
    assert any("retrieval recall is not reported" in w for w in report["warnings"])


# --- vectorised == a plain loop on random data ------------------------------------------------------------------
@pytest.mark.parametrize("profile", ["rgnet", "geq"])
def test_matches_a_plain_loop(profile: str) -> None:
    rng = np.random.default_rng(0)
    records, rows = [], []
    for i in range(60):
        s = float(rng.integers(0, 50))
        records.append(_rec(f"q{i}", s, s + float(rng.integers(0, 10))))
        n = int(rng.integers(0, 8))
        starts = rng.integers(0, 50, n).astype(float)
        preds = [[st, st + float(rng.integers(0, 10)), float(sc)] for st, sc in zip(starts, -np.sort(-rng.random(n)))]
        if i % 7:
            rows.append(PredictionRow(f"q{i}", "v1", preds))
    ks, ious = [1, 3, 10], [0.1, 0.3, 0.5, 0.7]
    m = evaluate(rows, records, profile=profile, recall_ks=ks, iou_thresholds=ious, retrieval_ks=[1])["metrics"]

    def iou(p: list[float], r: QueryRecord) -> float:
        inter = max(0.0, min(p[1], r.end_sec) - max(p[0], r.start_sec))
        union = (p[1] - p[0]) + (r.end_sec - r.start_sec) - inter
        return inter / union if union > 0 else 0.0

    by_id = {r.query_id: r for r in rows}
    for t in ious:
        for k in ks:
            hits = 0
            for rec in records:
                preds = by_id[rec.query_id].predictions if rec.query_id in by_id else []
                hits += any((iou(p, rec) > t) if profile == "rgnet" else (iou(p, rec) >= t) for p in preds[:k])
            assert m[f"R{k}@{t:g}"] == pytest.approx(100.0 * hits / len(records))
    top1 = []
    for rec in records:
        row = by_id.get(rec.query_id)
        top1.append(iou(row.predictions[0], rec) if row is not None and row.predictions else 0.0)
    assert m["mIoU"] == pytest.approx(100.0 * float(np.mean(top1)))


def test_format_table() -> None:
    text = format_table(_run("geq", max_predictions=1))
    lines = text.splitlines()
    assert "profile geq (IoU >= m)" in lines[0] and "at most 1 predictions per query" in lines[0]
    assert lines[1].split() == ["IoU", "R@1", "R@5"]
    assert lines[2].split() == ["0.3", "40.00", "40.00"]
    assert lines[3].split() == ["0.5", "40.00", "40.00"]
    assert "mIoU 30.00" in text
    assert "warning:" in text


# --- the `rgnet evaluate` pipeline (prediction-file mode) -------------------------------------------------------------
def _write_native_annotations(path: Path) -> None:
    rows = [
        {
            "query_id": "a",
            "video_id": "v1",
            "query": "a man sits",
            "start_sec": 0.0,
            "end_sec": 4.0,
            "duration_sec": 96.0,
        },
        {
            "query_id": "b",
            "video_id": "v1",
            "query": "a door opens",
            "start_sec": 50.0,
            "end_sec": 55.0,
            "duration_sec": 96.0,
        },
        {
            "query_id": "c",
            "video_id": "v2",
            "query": "rain falls",
            "start_sec": 10.0,
            "end_sec": 20.0,
            "duration_sec": 40.0,
        },
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines.evaluate import main

    ann = tmp_path / "test.jsonl"
    _write_native_annotations(ann)
    preds = tmp_path / "preds.jsonl"
    write_predictions(
        preds,
        [
            PredictionRow("a", "v1", [[1.0, 3.0, 0.9], [0.0, 4.0, 0.8]], [[0.0, 48.0, 0.9], [48.0, 96.0, 0.2]]),
            PredictionRow("b", "v1", [[50.0, 55.0, 0.7]], [[0.0, 48.0, 0.6], [48.0, 96.0, 0.5]]),
        ],
    )
    out = tmp_path / "report.json"
    md = tmp_path / "md.jsonl"
    rc = main(
        [
            "--predictions",
            str(preds),
            "--annotations",
            str(ann),
            "--layout",
            "native",
            "--profile",
            "rgnet",
            "--out",
            str(out),
            "--recall-ks",
            "1",
            "5",
            "--iou",
            "0.3",
            "0.5",
            "--retrieval-ks",
            "1",
            "2",
            "--export-moment-detr",
            str(md),
        ]
    )
    assert rc == 0
    report = json.loads(out.read_text())
    m = report["metrics"]
    assert report["num_queries"] == 3 and report["num_without_predictions"] == 1
    assert m["R1@0.3"] == pytest.approx(200 / 3)  # a (IoU 0.5), b (IoU 1); c has no row
    assert m["R1@0.5"] == pytest.approx(100 / 3)  # a's 0.5 is not > 0.5 under the rgnet profile
    assert m["R5@0.5"] == pytest.approx(200 / 3)  # a's second prediction is exact
    assert m["mIoU"] == pytest.approx(100 * 1.5 / 3)
    assert m["retrieval_R1"] == pytest.approx(100 / 3) and m["retrieval_R2"] == pytest.approx(200 / 3)
    assert report["predictions_file"] == str(preds) and report["layout"] == "native"
    assert "R@1" in capsys.readouterr().out
    exported = [json.loads(line) for line in md.read_text().splitlines()]
    assert [d["qid"] for d in exported] == ["a", "b", "c"]  # every ground-truth query; c (no row) a placeholder
    assert exported[2]["pred_relevant_windows"] == [[0.0, 0.0, 0.0]]


def test_cli_unknown_query_id_fails_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines.evaluate import main

    ann = tmp_path / "test.jsonl"
    _write_native_annotations(ann)
    preds = tmp_path / "preds.jsonl"
    write_predictions(preds, [PredictionRow("nope", "v1", [])])
    rc = main(["--predictions", str(preds), "--annotations", str(ann), "--layout", "native"])
    assert rc == 2
    err = capsys.readouterr().err
    assert str(preds) in err and "'nope'" in err and "query_id" in err


def test_cli_requires_annotations(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines.evaluate import main

    assert main(["--predictions", str(tmp_path / "p.jsonl")]) == 2
    assert "--annotations" in capsys.readouterr().err
    assert main([]) == 2


def test_cli_set_is_gone_and_overrides_are_positional(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One override dialect: ``--set`` exits 2 with a line naming the positional form; positional key=value with a
    prediction file (which has no config) is refused, naming the overrides."""
    from pipelines.evaluate import build_parser, main

    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", "x.pt", "--set", "eval.top_k_windows=10"])
    assert e.value.code == 2
    assert capsys.readouterr().err == (
        "rgnet evaluate: error: --set was removed: give the overrides as positional key=value "
        "(e.g. eval.top_k_windows=10)\n"
    )
    args = build_parser().parse_args(["--checkpoint", "x.pt", "--split", "test", "eval.oracle=true", "--out", "r"])
    assert (args.overrides, args.split, args.out) == (["eval.oracle=true"], "test", "r")
    assert main(["--predictions", str(tmp_path / "p.jsonl"), "eval.top_k_windows=3"]) == 2
    assert "eval.top_k_windows=3" in capsys.readouterr().err


def test_cli_zero_length_moments_dropped_with_their_rows_unless_kept(tmp_path: Path) -> None:
    from pipelines.evaluate import main

    ann = tmp_path / "test.jsonl"
    _write_native_annotations(ann)
    with ann.open("a") as fh:
        fh.write(
            json.dumps(
                {
                    "query_id": "z",
                    "video_id": "v2",
                    "query": "a flash",
                    "start_sec": 5.0,
                    "end_sec": 5.0,
                    "duration_sec": 40.0,
                }
            )
            + "\n"
        )
    preds = tmp_path / "preds.jsonl"
    write_predictions(preds, [PredictionRow("a", "v1", [[0.0, 4.0, 0.9]]), PredictionRow("z", "v2", [[4.0, 6.0, 1.0]])])
    out = tmp_path / "report.json"
    base = ["--predictions", str(preds), "--annotations", str(ann), "--layout", "native", "--out", str(out)]
    assert main(base) == 0
    report = json.loads(out.read_text())
    assert report["num_queries"] == 3 and report["num_zero_length_dropped"] == 1
    assert report["metrics"]["R1@0.3"] == pytest.approx(100 / 3)
    assert main([*base, "--keep-zero-length", "--profile", "geq", "--iou", "0.0"]) == 0
    report = json.loads(out.read_text())
    assert report["num_queries"] == 4 and report["num_zero_length_dropped"] == 0
    assert report["metrics"]["R1@0"] == pytest.approx(50.0)  # IoU >= 0 holds for any prediction: a and z
