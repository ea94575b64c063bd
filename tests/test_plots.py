"""rgnet.eval.plots: PNG files of the stated pixel size, written atomically; hand-computed frame scores and recall
curves that agree with rgnet.eval.metrics.evaluate; each bad input."""

from __future__ import annotations

import itertools
import struct
from pathlib import Path

import numpy as np
import pytest

from rgnet.data.records import QueryRecord
from rgnet.eval.metrics import evaluate, recall_name, retrieval_name
from rgnet.eval.plots import (
    CURVE_SIZE_PX,
    TIMELINE_SIZE_PX,
    epoch_curves,
    frame_score_curve,
    query_timeline,
    recall_curve,
    recall_vs_k,
    retrieval_curve,
    retrieval_vs_windows,
    variant_bars,
)
from rgnet.eval.predictions import PredictionRow

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, which a valid PNG has right after its 8-byte signature."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    length, kind = struct.unpack(">I4s", head[8:16])
    assert kind == b"IHDR" and length == 13
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def assert_png(path: Path, size_px: tuple[int, int]) -> None:
    assert path.is_file()
    assert png_size(path) == size_px
    assert sorted(p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")) == []  # no temporary left


def _rec(qid: str, start: float, end: float, duration: float = 100.0) -> QueryRecord:
    return QueryRecord(qid, "v1", f"query {qid}", start, end, duration, "v1", qid)


# Hand-made grounding case (profile rgnet: IoU strictly above the threshold).
RECORDS = [
    _rec("a", 10.0, 20.0),  # exact hit at rank 3 only
    _rec("b", 0.0, 10.0),  # rank 1 has IoU 0.4 (hit at 0.3, not at 0.5), rank 2 is exact
    _rec("c", 30.0, 40.0),  # no row: a miss at every K
]
ROWS = [
    PredictionRow(
        "a",
        "v1",
        [[50.0, 60.0, 0.9], [70.0, 80.0, 0.8], [10.0, 20.0, 0.7]],
        windows=[[40.0, 70.0, 0.9], [0.0, 30.0, 0.8]],  # first positive window at rank 2
    ),
    PredictionRow("b", "v1", [[0.0, 4.0, 0.9], [0.0, 10.0, 0.5]], windows=[[0.0, 30.0, 0.7]]),
]
THIRD, TWO_THIRDS = 100.0 / 3, 200.0 / 3


# ---------------------------------------------------------------------------------------------------------------
# frame_score_curve
# ---------------------------------------------------------------------------------------------------------------
def test_frame_score_curve_hand_computed() -> None:
    bounds = np.array([[0, 4], [2, 6], [7, 9]])  # frame 6 and 9 are covered by no window
    sampling = np.array(
        [
            [1.0, 2.0, 3.0, 4.0],
            [5.0, 0.0, 7.0, 1.0],
            [-1.0, -2.0, 99.0, 99.0],  # positions 2 and 3 are padding (window of 2 frames)
        ]
    )
    got = frame_score_curve(bounds, sampling, 10)
    want = [1.0, 2.0, 5.0, 4.0, 7.0, 1.0, np.nan, -1.0, -2.0, np.nan]
    np.testing.assert_array_equal(got, np.array(want))
    assert got.shape == (10,) and got.dtype == np.float64


def test_frame_score_curve_single_window_is_its_scores() -> None:
    rng = np.random.default_rng(0)
    sampling = rng.standard_normal((1, 8))
    got = frame_score_curve(np.array([[3, 11]]), sampling, 12)
    np.testing.assert_array_equal(got[3:11], sampling[0])
    assert np.isnan(got[:3]).all() and np.isnan(got[11:]).all()


@pytest.mark.parametrize(
    ("bounds", "sampling", "num_frames", "names"),
    [
        (np.zeros((0, 2), dtype=int), np.zeros((0, 4)), 10, "bounds is empty"),
        (np.array([0, 4]), np.zeros((1, 4)), 10, "bounds must have shape"),
        (np.array([[0, 4], [2, 6]]), np.zeros((3, 4)), 10, "sampling must have shape"),
        (np.array([[0, 4]]), np.zeros((1, 4)), 0, "num_frames"),
        (np.array([[8, 12]]), np.zeros((1, 4)), 10, "bounds[0]"),  # past the last frame
        (np.array([[0, 6]]), np.zeros((1, 4)), 10, "bounds[0]"),  # longer than W
        (np.array([[-1, 2]]), np.zeros((1, 4)), 10, "bounds[0]"),
    ],
)
def test_frame_score_curve_bad_input(bounds: np.ndarray, sampling: np.ndarray, num_frames: int, names: str) -> None:
    with pytest.raises(ValueError, match=names.replace("[", r"\[").replace("]", r"\]")):
        frame_score_curve(bounds, sampling, num_frames)


# ---------------------------------------------------------------------------------------------------------------
# query_timeline
# ---------------------------------------------------------------------------------------------------------------
def _small_timeline_args() -> dict:
    bounds = np.array([[0.0, 30.0], [15.0, 45.0], [30.0, 60.0], [45.0, 75.0], [60.0, 90.0]])
    return {
        "duration_sec": 90.0,
        "window_bounds_sec": bounds,
        "context_logit": np.array([-2.0, 1.0, 3.0, 0.0, -1.0]),
        "gt": (33.0, 41.0),
        "predictions": [[32.0, 40.0, 0.9], [80.0, 88.0, 0.6], [5.0, 9.0, 0.4]],
        "top_k_windows": 2,
        "query": "person opens the fridge " * 10,  # longer than a title: cut
    }


def test_query_timeline_png_size(tmp_path: Path) -> None:
    times = np.arange(0.0, 90.0, 0.5)
    scores = np.sin(times / 10.0)
    scores[:4] = np.nan  # frames no window covers
    out = query_timeline(tmp_path / "q.png", frame_times_sec=times, frame_scores=scores, **_small_timeline_args())
    assert out == tmp_path / "q.png"
    assert_png(out, TIMELINE_SIZE_PX)


def test_query_timeline_without_frame_scores_or_gt(tmp_path: Path) -> None:
    args = _small_timeline_args() | {"gt": None, "predictions": [], "top_k_windows": 0}
    assert_png(query_timeline(tmp_path / "sub" / "q.png", **args), TIMELINE_SIZE_PX)


def test_query_timeline_three_hour_video(tmp_path: Path) -> None:
    """MAD-sized input (P = 20000 windows, T = 54000 frames at 5 fps), frame scores from frame_score_curve."""
    rng = np.random.default_rng(0)
    fps, num_frames, width, num_windows = 5.0, 54000, 150, 20000
    starts = np.linspace(0, num_frames - width, num_windows).astype(np.int64)
    bounds = np.stack([starts, starts + width], axis=1)  # (P, 2)
    sampling = rng.standard_normal((num_windows, width)).astype(np.float32)  # (P, W)
    frame_scores = frame_score_curve(bounds, sampling, num_frames)
    assert frame_scores.shape == (num_frames,) and not np.isnan(frame_scores).any()
    out = query_timeline(
        tmp_path / "long.png",
        duration_sec=num_frames / fps,
        window_bounds_sec=bounds / fps,
        context_logit=rng.standard_normal(num_windows),
        frame_times_sec=np.arange(num_frames) / fps,
        frame_scores=frame_scores,
        gt=(5000.0, 5004.0),  # a few pixels wide at most
        predictions=[[5000.5 + i, 5003.0 + i, 0.9 - 0.1 * i] for i in range(10)],
        top_k_windows=30,
        query="the man walks to the door",
    )
    assert_png(out, TIMELINE_SIZE_PX)


@pytest.mark.parametrize(
    ("change", "names"),
    [
        ({"window_bounds_sec": np.zeros((0, 2))}, "window_bounds_sec is empty"),
        ({"window_bounds_sec": np.zeros(5)}, "window_bounds_sec must have shape"),
        ({"context_logit": np.zeros(4)}, "context_logit has 4 entries"),
        ({"frame_times_sec": np.arange(3.0)}, "frame_times_sec and frame_scores together"),
        ({"frame_times_sec": np.arange(3.0), "frame_scores": np.zeros(4)}, "frame_scores has shape"),
        ({"duration_sec": 0.0}, "duration_sec"),
        ({"gt": (50.0, 40.0)}, "gt must be"),
        ({"predictions": [[1.0, 2.0]]}, r"predictions\[0\]"),
        ({"top_k_windows": -1}, "top_k_windows"),
    ],
)
def test_query_timeline_bad_input(tmp_path: Path, change: dict, names: str) -> None:
    with pytest.raises(ValueError, match=names):
        query_timeline(tmp_path / "q.png", **(_small_timeline_args() | change))
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# recall_curve / recall_vs_k
# ---------------------------------------------------------------------------------------------------------------
def test_recall_curve_hand_computed_and_matches_evaluate() -> None:
    curve = recall_curve(ROWS, RECORDS, max_k=5)
    assert set(curve) == {0.3, 0.5}
    np.testing.assert_allclose(curve[0.3], [THIRD, THIRD, TWO_THIRDS, TWO_THIRDS, TWO_THIRDS])
    np.testing.assert_allclose(curve[0.5], [0.0, THIRD, TWO_THIRDS, TWO_THIRDS, TWO_THIRDS])
    report = evaluate(ROWS, RECORDS, recall_ks=(1, 5), iou_thresholds=(0.3, 0.5), retrieval_ks=(1,))
    for m, values in curve.items():  # K=5 is past the 3 predictions the rows hold
        assert values[0] == report["metrics"][recall_name(1, m)]
        assert values[4] == report["metrics"][recall_name(5, m)]
    for values in curve.values():
        assert all(a <= b for a, b in itertools.pairwise(values))  # non-decreasing in K


def test_recall_curve_geq_profile_counts_equal_iou() -> None:
    # rgnet profile: IoU 0.4 is not > 0.4; geq: it is >= 0.4, so query b is a hit at K=1
    assert recall_curve(ROWS, RECORDS, iou_thresholds=(0.4,), max_k=1)[0.4] == [0.0]
    assert recall_curve(ROWS, RECORDS, profile="geq", iou_thresholds=(0.4,), max_k=1)[0.4] == [pytest.approx(THIRD)]


def test_recall_vs_k_png(tmp_path: Path) -> None:
    out = recall_vs_k(tmp_path / "recall.png", ROWS, RECORDS, max_k=100)
    assert_png(out, CURVE_SIZE_PX)
    assert_png(recall_vs_k(tmp_path / "one.png", ROWS, RECORDS, iou_thresholds=(0.5,), max_k=1), CURVE_SIZE_PX)


@pytest.mark.parametrize(
    ("rows", "records", "kw", "names"),
    [
        ([], RECORDS, {}, "rows is empty"),
        (ROWS, [], {}, "records is empty"),
        (ROWS, RECORDS, {"iou_thresholds": ()}, "iou_thresholds is empty"),
        (ROWS, RECORDS, {"max_k": 0}, "max_k"),
    ],
)
def test_recall_curve_bad_input(rows: list, records: list, kw: dict, names: str) -> None:
    with pytest.raises(ValueError, match=names):
        recall_curve(rows, records, **kw)


# ---------------------------------------------------------------------------------------------------------------
# retrieval_curve / retrieval_vs_windows
# ---------------------------------------------------------------------------------------------------------------
def test_retrieval_curve_hand_computed_and_matches_evaluate() -> None:
    curve = retrieval_curve(ROWS, RECORDS)  # the most windows a row holds: 2
    np.testing.assert_allclose(curve, [THIRD, TWO_THIRDS])
    report = evaluate(ROWS, RECORDS, retrieval_ks=(1, 2))
    assert curve == [report["metrics"][retrieval_name(k)] for k in (1, 2)]
    past = retrieval_curve(ROWS, RECORDS, max_windows=4)  # past the windows the rows hold: flat
    np.testing.assert_allclose(past, [THIRD, *[TWO_THIRDS] * 3])
    assert past[3] == evaluate(ROWS, RECORDS, retrieval_ks=(4,))["metrics"][retrieval_name(4)]


def test_retrieval_vs_windows_png(tmp_path: Path) -> None:
    assert_png(retrieval_vs_windows(tmp_path / "retrieval.png", ROWS, RECORDS), CURVE_SIZE_PX)
    assert_png(retrieval_vs_windows(tmp_path / "r50.png", ROWS, RECORDS, max_windows=50), CURVE_SIZE_PX)


def test_retrieval_vs_windows_needs_windows(tmp_path: Path) -> None:
    rows = [ROWS[0], PredictionRow("b", "v1", ROWS[1].predictions)]  # b without windows
    with pytest.raises(ValueError, match=r"no ranked 'windows' \(first: query 'b'\)"):
        retrieval_vs_windows(tmp_path / "r.png", rows, RECORDS)
    empty = [PredictionRow(r.query_id, r.video_id, r.predictions, windows=[]) for r in ROWS]
    with pytest.raises(ValueError, match="'windows' is empty"):
        retrieval_vs_windows(tmp_path / "r.png", empty, RECORDS)
    with pytest.raises(ValueError, match="max_windows"):
        retrieval_vs_windows(tmp_path / "r.png", ROWS, RECORDS, max_windows=0)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# epoch_curves
# ---------------------------------------------------------------------------------------------------------------
def test_epoch_curves_writes_loss_and_val(tmp_path: Path) -> None:
    history = [
        {
            "epoch": e,
            "train/loss": 2.0 / (e + 1),
            "train/loss_sampling": 0.5 / (e + 1),
            "val/R1@0.3": 10.0 + e,
            "val/R5@0.3": 20.0 + e,
            "val/mIoU": 5.0 + e,
            "val/retrieval_R1": 30.0 + e,
            "val/R50@0.3": 40.0 + e,  # not a headline metric
        }
        for e in range(3)
    ]
    written = epoch_curves(history, tmp_path, "R1@0.3")
    assert written == [tmp_path / "loss.png", tmp_path / "val.png"]
    for path in written:
        assert_png(path, CURVE_SIZE_PX)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "val.png"]


def test_epoch_curves_skips_empty_groups(tmp_path: Path) -> None:
    assert epoch_curves([], tmp_path, "R1@0.3") == []
    assert epoch_curves([{"epoch": 0, "train/loss": 1.0}], tmp_path, "R1@0.3") == [tmp_path / "loss.png"]


def test_variant_bars_size_and_errors(tmp_path) -> None:
    values = {"untrained": {"retrieval_R1": 10.8, "R1@0.3": 0.0}, "full": {"retrieval_R1": 90.0}}  # a gap, not 0
    path = variant_bars(tmp_path / "bars.png", values, ["retrieval_R1", "R1@0.3"], title="t")
    assert png_size(path) == CURVE_SIZE_PX
    with pytest.raises(ValueError, match="at least one variant and one metric"):
        variant_bars(tmp_path / "none.png", {}, ["retrieval_R1"], title="t")
    assert not (tmp_path / "none.png").exists()
