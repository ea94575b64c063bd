"""Evaluation and training plots, written as PNG files of a fixed pixel size.

- :func:`query_timeline`: one query over its whole video, in the style of the RGNet paper's Fig. 10: the window
  context score sigmoid(s_ctx) of every window, the frame sampling score s_j (Eq. 7), the ground-truth moment and
  the top predictions, on one time axis in seconds.  :func:`frame_score_curve` turns the per-window sampling scores
  into the per-frame curve it draws.
- :func:`draw_timeline`: :func:`query_timeline` of one query as ``timeline_<name>.png`` from window bounds in frames.
- :func:`recall_vs_k`: grounding Recall@K against K, one line per IoU threshold (values: :func:`recall_curve`).
- :func:`retrieval_vs_windows`: window retrieval recall against the number of windows kept per query (values:
  :func:`retrieval_curve`).
- :func:`epoch_curves`: training losses and validation metrics over epochs.
- :func:`variant_bars` (an ablation table, with intervals) and :func:`sweep_lines` (a metric against a swept value,
  one line per model, with interval bands): the ``rgnet ablate`` / ``rgnet study`` plots.

Figures are built with matplotlib's object API on an Agg canvas (no pyplot, no process-wide backend switch) and
saved at ``DPI`` without ``bbox_inches="tight"``, so a PNG is exactly the size its ``*_SIZE_PX`` constant says.
Every file is written to a temporary name in the target folder, then renamed (:func:`rgnet.io.atomic_path`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from rgnet.data.records import QueryRecord
from rgnet.data.windows import rank_windows
from rgnet.eval.metrics import PROFILES, evaluate, recall_name, retrieval_name
from rgnet.eval.predictions import PredictionRow
from rgnet.io import atomic_path

DPI = 100
TIMELINE_SIZE_PX = (1200, 600)  # (width, height) of query_timeline
CURVE_SIZE_PX = (800, 500)  # recall_vs_k, retrieval_vs_windows, epoch_curves
TIMELINE_BINS = 4000  # a curve with more points is max-pooled into this many bins before drawing
TIMELINE_PREDICTIONS = 5  # top predictions a timeline draws by default
TITLE_CHARS = 100  # longer query texts are cut to this many characters in a title


# ---------------------------------------------------------------------------------------------------------------
# Figure plumbing
# ---------------------------------------------------------------------------------------------------------------
@contextmanager
def _figure(size_px: tuple[int, int], **subplots: Any) -> Iterator[tuple[Figure, Any]]:
    """A figure of ``size_px`` (width, height) pixels at ``DPI`` with its axes (``Figure.subplots`` arguments)."""
    # pinned: a user's matplotlibrc with savefig.bbox = tight would change the PNG size
    with matplotlib.rc_context({"savefig.bbox": "standard", "savefig.transparent": False}):
        fig = Figure(figsize=(size_px[0] / DPI, size_px[1] / DPI), dpi=DPI, layout="constrained")
        FigureCanvasAgg(fig)
        yield fig, fig.subplots(**subplots)


def _save(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG under ``path`` atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return path


def _finish_k_axes(ax: Axes, max_k: int, xlabel: str, ylabel: str, title: str) -> None:
    """Shared dressing of the recall-vs-K plots: log K axis from 1 to ``max_k``, 0-100 % y axis, labels, legend."""
    if max_k > 1:
        _plain_log_ticks(ax, max_k)
        ax.set_xlim(1, max_k)
    ax.set_ylim(0, 100)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)


def _plain_log_ticks(ax: Axes, max_k: int) -> None:
    """Log-scaled x axis from 1 to ``max_k`` with ticks at 1, 2, 5, 10, 20, 50, ... written as plain numbers."""
    ax.set_xscale("log")
    ticks = [t for t in (m * 10**e for e in range(7) for m in (1, 2, 5)) if t <= max_k]
    if ticks[-1] != max_k:
        ticks.append(max_k)
    ax.set_xticks(ticks)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


# ---------------------------------------------------------------------------------------------------------------
# Timeline of one query
# ---------------------------------------------------------------------------------------------------------------
def frame_score_curve(bounds: np.ndarray, sampling: np.ndarray, num_frames: int) -> np.ndarray:
    """Per-frame sampling score: the maximum over the windows that cover the frame; NaN where no window does.

    ``bounds`` (P, 2) int ``[start, stop)`` frames of each window; ``sampling`` (P, W) scores, position j of window
    p being frame ``bounds[p, 0] + j`` (positions at or past ``stop`` are padding and ignored); -> (num_frames,)
    float64.  Overlapping windows score a frame differently (each sees its own context); the maximum shows where
    any window would sample it.

    >>> bounds = np.array([[0, 3], [2, 4]])
    >>> sampling = np.array([[1.0, 5.0, 2.0], [4.0, 0.5, 9.0]])  # window 1 holds 2 frames: its 9.0 is padding
    >>> frame_score_curve(bounds, sampling, 6).tolist()
    [1.0, 5.0, 4.0, 0.5, nan, nan]
    """
    bounds = np.asarray(bounds)
    sampling = np.asarray(sampling, dtype=np.float64)
    if bounds.ndim != 2 or bounds.shape[1] != 2:
        raise ValueError(f"bounds must have shape (P, 2) of [start, stop) frames, got {bounds.shape}")
    if len(bounds) == 0:
        raise ValueError("bounds is empty: there are no windows to take frame scores from")
    if sampling.ndim != 2 or sampling.shape[0] != len(bounds):
        raise ValueError(
            f"sampling must have shape (P, W) with P = {len(bounds)} (one row per window in bounds), "
            f"got {sampling.shape}"
        )
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    start, stop = bounds[:, 0].astype(np.int64), bounds[:, 1].astype(np.int64)  # (P,)
    length = stop - start  # (P,)
    bad = np.flatnonzero((start < 0) | (length < 0) | (stop > num_frames) | (length > sampling.shape[1]))
    if len(bad):
        p = int(bad[0])
        raise ValueError(
            f"bounds[{p}] = {bounds[p].tolist()} is not a window of 0 <= start <= stop <= num_frames = {num_frames} "
            f"holding at most W = {sampling.shape[1]} frames (the width of sampling)"
        )
    pos = np.arange(sampling.shape[1])  # (W,)
    inside = pos[None, :] < length[:, None]  # (P, W): False on padding
    frame = (start[:, None] + pos[None, :])[inside]  # (n,) frame of every real position
    out = np.full(num_frames, -np.inf)
    np.maximum.at(out, frame, sampling[inside])  # unbuffered max: frames repeat across overlapping windows
    covered = np.zeros(num_frames, dtype=bool)
    covered[frame] = True
    out[~covered] = np.nan
    return out


def _max_pool(x: np.ndarray, y: np.ndarray, lo: float, hi: float, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Points (x, y) sorted by x, or, when there are more than ``bins``, the maximum of y per bin of [lo, hi].

    Max rather than mean so that one high window or frame stays visible in a 3-hour video.  Empty bins (and bins of
    only NaN, e.g. frames no window covers) are NaN, which matplotlib draws as a gap.
    """
    if len(x) <= bins:
        order = np.argsort(x, kind="stable")
        return x[order], y[order]
    width = (hi - lo) / bins
    idx = np.clip(((x - lo) / width).astype(np.int64), 0, bins - 1)  # (N,) bin of each point
    pooled = np.full(bins, np.nan)
    np.fmax.at(pooled, idx, y)  # fmax: NaN only where every value in the bin is NaN
    centers = lo + (np.arange(bins) + 0.5) * width
    return centers, pooled


def _shade_gt(ax: Axes, gt: tuple[float, float] | None, min_width: float) -> None:
    """The ground-truth span, with a line at its centre when it is too narrow to see (a short moment, long video)."""
    if gt is None:
        return
    ax.axvspan(gt[0], gt[1], color="tab:green", alpha=0.25, lw=0, label="ground truth")
    if gt[1] - gt[0] < min_width:
        ax.axvline(0.5 * (gt[0] + gt[1]), color="tab:green", lw=1.5)


def _check_1d(name: str, value: np.ndarray, length: int | None = None) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if len(arr) == 0:
        raise ValueError(f"{name} is empty")
    if length is not None and len(arr) != length:
        raise ValueError(f"{name} has {len(arr)} entries but window_bounds_sec has {length} windows")
    return arr


def query_timeline(
    path: str | Path,
    *,
    duration_sec: float,
    window_bounds_sec: np.ndarray,
    context_logit: np.ndarray,
    frame_times_sec: np.ndarray | None = None,
    frame_scores: np.ndarray | None = None,
    gt: tuple[float, float] | None = None,
    predictions: Sequence[Sequence[float]],
    top_k_windows: int,
    query: str,
    top_n: int = 5,
) -> Path:
    """One query over its whole video (the paper's Fig. 10), as a ``TIMELINE_SIZE_PX`` PNG at ``path``.

    Panels, sharing one axis of seconds from 0 to ``duration_sec``:

    1. the window context score sigmoid(s_ctx) at each window's centre; the ``top_k_windows`` best windows (those
       decoded into moments) are marked over their span;
    2. the frame sampling score (when ``frame_times_sec`` and ``frame_scores``, both (T,), are given; frames no window
       covers are NaN and drawn as gaps), e.g. from :func:`frame_score_curve`;
    3. the ``top_n`` first ``predictions`` ([start_sec, end_sec, score], best first), one bar per rank, labelled
       with rank and score.

    ``window_bounds_sec`` (P, 2) and ``context_logit`` (P,) describe the windows.  The ground truth ``gt``
    (start_sec, end_sec) is shaded in every panel.  Curves with more than ``TIMELINE_BINS`` points are max-pooled,
    so a 3-hour video (P ~ 20000 windows, T ~ 54000 frames) draws in about a second.
    """
    if not duration_sec > 0 or not np.isfinite(duration_sec):
        raise ValueError(f"duration_sec must be a positive number of seconds, got {duration_sec}")
    bounds = np.asarray(window_bounds_sec, dtype=np.float64)
    if bounds.ndim != 2 or bounds.shape[1] != 2:
        raise ValueError(f"window_bounds_sec must have shape (P, 2) of [start_sec, end_sec], got {bounds.shape}")
    if len(bounds) == 0:
        raise ValueError("window_bounds_sec is empty: the timeline needs at least one window")
    logit = _check_1d("context_logit", context_logit, len(bounds))
    if (frame_times_sec is None) != (frame_scores is None):
        raise ValueError("give frame_times_sec and frame_scores together (or neither, for no sampling-score panel)")
    frames: tuple[np.ndarray, np.ndarray] | None = None
    if frame_times_sec is not None and frame_scores is not None:
        times = _check_1d("frame_times_sec", frame_times_sec)
        scores = np.asarray(frame_scores, dtype=np.float64)
        if scores.shape != times.shape:
            raise ValueError(
                f"frame_scores has shape {scores.shape} but frame_times_sec has {times.shape}: give one score per frame"
            )
        frames = (times, scores)
    if gt is not None and not gt[0] <= gt[1]:
        raise ValueError(f"gt must be (start_sec, end_sec) with start <= end, got {gt}")
    if top_k_windows < 0 or top_n < 0:
        raise ValueError(f"top_k_windows and top_n must be >= 0, got {top_k_windows} and {top_n}")
    shown = [list(p) for p in predictions[:top_n]]
    for i, p in enumerate(shown):
        if len(p) != 3:
            raise ValueError(f"predictions[{i}] must be [start_sec, end_sec, score], got {p}")

    prob = 1.0 / (1.0 + np.exp(-logit))  # (P,) sigmoid(s_ctx)
    centers = bounds.mean(axis=1)  # (P,)
    top = rank_windows(logit)[:top_k_windows]  # ranked like the predictions file's windows
    pixel_sec = duration_sec / TIMELINE_SIZE_PX[0]  # one pixel of the x axis, in seconds

    names = ["context", *(["frames"] if frames is not None else []), "predictions"]
    heights = {"context": 3.0, "frames": 3.0, "predictions": 1.6}
    with _figure(
        TIMELINE_SIZE_PX,
        nrows=len(names),
        sharex=True,
        squeeze=False,
        gridspec_kw={"height_ratios": [heights[n] for n in names]},
    ) as (fig, axes):
        ax_of = dict(zip(names, axes[:, 0]))

        ax = ax_of["context"]
        x, y = _max_pool(centers, prob, 0.0, duration_sec, TIMELINE_BINS)
        ax.plot(x, y, color="tab:blue", lw=0.8, label="window context score")
        if len(top):
            ax.hlines(prob[top], bounds[top, 0], bounds[top, 1], color="tab:orange", lw=3)
            ax.scatter(centers[top], prob[top], color="tab:orange", s=18, zorder=3, label=f"top-{len(top)} windows")
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("context score\nsigmoid(s_ctx)")

        if frames is not None:
            ax = ax_of["frames"]
            x, y = _max_pool(frames[0], frames[1], 0.0, duration_sec, TIMELINE_BINS)
            ax.plot(x, y, color="tab:purple", lw=0.8, label="frame sampling score (max over windows)")
            ax.set_ylabel("sampling score s_j")

        ax = ax_of["predictions"]
        for rank, (s, e, score) in enumerate(shown, start=1):
            ax.hlines(rank, s, e, color="tab:red", lw=5)
            if e - s < 2 * pixel_sec:  # a short moment in a long video: a bar under a pixel wide
                ax.plot([0.5 * (s + e)], [rank], marker="|", ms=10, color="tab:red")
            right = e < 0.8 * duration_sec
            ax.annotate(
                f"#{rank} {score:.3f}",
                (e if right else s, rank),
                xytext=(4 if right else -4, 0),
                textcoords="offset points",
                ha="left" if right else "right",
                va="center",
                fontsize=7,
            )
        ax.set_ylim(len(shown) + 0.7, 0.3)  # rank 1 on top
        ax.set_yticks(range(1, len(shown) + 1), [f"#{r}" for r in range(1, len(shown) + 1)], fontsize=7)
        ax.set_ylabel(f"top-{len(shown)}\npredictions")
        ax.set_xlabel("time (s)")

        for ax in ax_of.values():
            _shade_gt(ax, None if gt is None else (float(gt[0]), float(gt[1])), 2 * pixel_sec)
            ax.set_xlim(0.0, duration_sec)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(loc="upper right", fontsize=7)
        text = " ".join(query.split())
        fig.suptitle(text if len(text) <= TITLE_CHARS else text[: TITLE_CHARS - 1] + "…", fontsize=10)
        return _save(fig, path)


def draw_timeline(
    out_dir: str | Path,
    name: str,
    *,
    fps: float,
    bounds: np.ndarray,
    frame_scores: np.ndarray | None,
    top_k_windows: int,
    **query: Any,
) -> Path:
    """``out_dir/timeline_<name>.png`` (:func:`query_timeline`, the name made file-safe) from window ``bounds`` (P, 2)
    in frames and the per-frame sampling scores (T,) (:func:`frame_score_curve`) at ``fps``; ``query`` holds the
    other arguments of :func:`query_timeline` (duration_sec, context_logit, gt, predictions, query)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80]
    times = None if frame_scores is None else (np.arange(len(frame_scores)) + 0.5) / fps
    return query_timeline(
        Path(out_dir) / f"timeline_{safe}.png",
        window_bounds_sec=bounds / fps,
        frame_times_sec=times,
        frame_scores=frame_scores,
        top_k_windows=top_k_windows,
        top_n=TIMELINE_PREDICTIONS,
        **query,
    )


# ---------------------------------------------------------------------------------------------------------------
# Recall curves
# ---------------------------------------------------------------------------------------------------------------
def _check_rows(rows: Sequence[PredictionRow], records: Sequence[QueryRecord]) -> None:
    if not records:
        raise ValueError("records is empty: there are no ground-truth queries to measure recall against")
    if not rows:
        raise ValueError("rows is empty: there are no predictions to plot (every query would be a miss)")


def _recall_values(
    rows: Sequence[PredictionRow],
    records: Sequence[QueryRecord],
    profile: str,
    iou_thresholds: Sequence[float],
    max_k: int,
) -> tuple[dict[float, list[float]], dict[str, Any]]:
    """``{iou: [R1, ..., R{max_k}]}`` and the report they come from."""
    _check_rows(rows, records)
    if not iou_thresholds:
        raise ValueError("iou_thresholds is empty: give at least one IoU threshold, e.g. (0.3, 0.5)")
    if max_k < 1:
        raise ValueError(f"max_k must be >= 1, got {max_k}")
    # Past the most predictions any row holds, evaluate's R@K stays at that K's value, and it warns once per such K
    # (97 lines for K up to 100 from 3 predictions): ask for the Ks up to there, then continue the curve flat.
    computed = max(1, min(max_k, max(len(r.predictions) for r in rows)))
    report = evaluate(
        rows,
        records,
        profile=profile,
        recall_ks=range(1, computed + 1),
        iou_thresholds=iou_thresholds,
        retrieval_ks=(1,),
        source="recall curve",
    )
    metrics = report["metrics"]
    curve = {
        float(m): [metrics[recall_name(min(k, computed), float(m))] for k in range(1, max_k + 1)]
        for m in iou_thresholds
    }
    return curve, report


def recall_curve(
    rows: Sequence[PredictionRow],
    records: Sequence[QueryRecord],
    *,
    profile: str = "rgnet",
    iou_thresholds: Sequence[float] = (0.3, 0.5),
    max_k: int = 100,
) -> dict[float, list[float]]:
    """Grounding Recall@K (percent) for K = 1..max_k at each IoU threshold: ``{iou: [R1, R2, ..., R{max_k}]}``.

    The numbers are :func:`rgnet.eval.metrics.evaluate`'s (same profile, every GT query counted); past the most
    predictions any row holds, the curve is flat.
    """
    return _recall_values(rows, records, profile, iou_thresholds, max_k)[0]


def recall_vs_k(
    path: str | Path,
    rows: Sequence[PredictionRow],
    records: Sequence[QueryRecord],
    *,
    profile: str = "rgnet",
    iou_thresholds: Sequence[float] = (0.3, 0.5),
    max_k: int = 100,
) -> Path:
    """Grounding Recall@K against K (log axis), one line per IoU threshold, as a ``CURVE_SIZE_PX`` PNG at ``path``.

    A dotted line marks the most predictions per query the rows hold, when it is below ``max_k``: the curve cannot
    rise after it.
    """
    curve, report = _recall_values(rows, records, profile, iou_thresholds, max_k)
    ks = np.arange(1, max_k + 1)
    used = report["max_predictions_found"]
    with _figure(CURVE_SIZE_PX) as (fig, ax):
        for m, values in curve.items():
            rule = PROFILES[profile].replace("m", f"{m:g}")  # "IoU > 0.3"
            ax.plot(ks, values, marker="o" if max_k <= 20 else None, ms=3, label=rule)
        if used < max_k:
            ax.axvline(max(used, 1), color="gray", ls=":", label=f"{used} predictions per query (most any row holds)")
        title = f"grounding recall, profile {profile}, {report['num_queries']} queries"
        _finish_k_axes(ax, max_k, "K (predictions per query)", "Recall@K (%)", title)
        return _save(fig, path)


def _retrieval_values(
    rows: Sequence[PredictionRow], records: Sequence[QueryRecord], max_windows: int | None
) -> tuple[list[float], dict[str, Any], int]:
    """``[retrieval_R1, ..., retrieval_R{max_windows}]``, the report, and the most windows any row holds."""
    _check_rows(rows, records)
    missing = [r.query_id for r in rows if r.windows is None]
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(rows)} rows have no ranked 'windows' (first: query {missing[0]!r}); "
            "retrieval recall needs the windows ranked by context score: predict with windows recorded"
        )
    found = max(0 if r.windows is None else len(r.windows) for r in rows)
    if max_windows is None:
        if found == 0:
            raise ValueError("every row's 'windows' is empty: there is no retrieval recall to plot")
        max_windows = found
    if max_windows < 1:
        raise ValueError(f"max_windows must be >= 1 or None, got {max_windows}")
    # evaluate pads every query's windows to the largest K: stop at the most windows a row holds (the curve is
    # flat after it) so a large max_windows costs no memory.
    computed = max(1, min(max_windows, found))
    report = evaluate(rows, records, recall_ks=(1,), retrieval_ks=range(1, computed + 1), source="retrieval curve")
    metrics = report["metrics"]
    return [metrics[retrieval_name(min(k, computed))] for k in range(1, max_windows + 1)], report, found


def retrieval_curve(
    rows: Sequence[PredictionRow], records: Sequence[QueryRecord], *, max_windows: int | None = None
) -> list[float]:
    """Window retrieval recall (percent) for K = 1..max_windows windows kept: ``[retrieval_R1, retrieval_R2, ...]``.

    ``max_windows`` None: the most windows any row holds.  Every row needs its ranked ``windows``.
    """
    return _retrieval_values(rows, records, max_windows)[0]


def retrieval_vs_windows(
    path: str | Path,
    rows: Sequence[PredictionRow],
    records: Sequence[QueryRecord],
    *,
    max_windows: int | None = None,
) -> Path:
    """Window retrieval recall against K, the windows kept per query (log axis), as a ``CURVE_SIZE_PX`` PNG.

    A query counts at K when one of its first K ranked windows overlaps the GT moment; this bounds the grounding
    recall of a model that decodes only K windows.  ``max_windows`` None: the most windows any row holds.
    """
    values, report, found = _retrieval_values(rows, records, max_windows)
    ks = np.arange(1, len(values) + 1)
    with _figure(CURVE_SIZE_PX) as (fig, ax):
        ax.plot(ks, values, color="tab:blue", marker="o" if len(ks) <= 20 else None, ms=3, label="positive window kept")
        if found < len(ks):
            ax.axvline(max(found, 1), color="gray", ls=":", label=f"{found} windows (most any row holds)")
        xlabel = "K (windows kept per query, ranked by context score)"
        title = f"window retrieval, {report['num_queries']} queries"
        _finish_k_axes(ax, len(ks), xlabel, "retrieval Recall@K (%)", title)
        return _save(fig, path)


# ---------------------------------------------------------------------------------------------------------------
# Training curves
# ---------------------------------------------------------------------------------------------------------------
def epoch_curves(history: list[dict[str, Any]], out_dir: str | Path, selection_metric: str) -> list[Path]:
    """``loss.png`` (training losses) and ``val.png`` (headline validation metrics) over epochs, in ``out_dir``.

    ``history`` is the run's epoch history (one dict per epoch: ``epoch``, ``train/loss*``, ``val/<metric>``).
    The validation plot shows R1 and R5 at every IoU, mIoU, window retrieval R1 / R5 and the selection metric
    (drawn thicker).  A plot with nothing to draw is not written; returns the paths written.
    """
    out_dir = Path(out_dir)
    epochs = [int(h["epoch"]) for h in history]
    shown = {selection_metric, "mIoU", "retrieval_R1", "retrieval_R5"}
    shown |= {k.split("/", 1)[1] for h in history for k in h if k.startswith(("val/R1@", "val/R5@"))}
    groups = {
        "loss.png": (
            "training losses",
            "loss",
            [k for k in history[0] if k.startswith("train/loss")] if history else [],
        ),
        "val.png": (
            f"validation (best by {selection_metric}; every metric is in the run's metrics)",
            "metric (%)",
            sorted({k for h in history for k in h if k.split("/", 1)[-1] in shown}),
        ),
    }
    written = []
    for name, (title, ylabel, keys) in groups.items():
        if not keys:
            continue
        with _figure(CURVE_SIZE_PX) as (fig, ax):
            for key in keys:
                pts = [(e, h[key]) for e, h in zip(epochs, history) if key in h]
                if pts:
                    ax.plot(
                        *zip(*pts),
                        marker="o",
                        label=key.split("/", 1)[1],
                        linewidth=2.5 if key == f"val/{selection_metric}" else 1.2,
                    )
            ax.set_xlabel("epoch")
            ax.set_ylabel(ylabel)
            ax.set_title(title, fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, ncol=2)
            written.append(_save(fig, out_dir / name))
    return written


# ---------------------------------------------------------------------------------------------------------------
# Comparing runs
# ---------------------------------------------------------------------------------------------------------------
def variant_bars(
    path: str | Path,
    values: dict[str, dict[str, float]],
    metrics: Sequence[str],
    *,
    title: str,
    errors: dict[str, dict[str, tuple[float, float]]] | None = None,
) -> Path:
    """Grouped bars, one group per variant (in the given order) and one bar per metric, as a ``CURVE_SIZE_PX`` PNG.

    ``values[variant][metric]`` in percent; a metric a variant lacks is drawn as a gap, not as 0.  ``errors``
    (optional, same keys): the (low, high) interval drawn as an error bar on each bar.
    """
    if not values or not metrics:
        raise ValueError("variant_bars needs at least one variant and one metric")
    names = list(values)
    x = np.arange(len(names), dtype=float)
    width = 0.8 / len(metrics)
    with _figure(CURVE_SIZE_PX) as (fig, ax):
        for i, metric in enumerate(metrics):
            heights = np.array([values[n].get(metric, np.nan) for n in names], dtype=float)
            yerr = None
            if errors is not None:
                lo = np.array([errors.get(n, {}).get(metric, (np.nan, np.nan))[0] for n in names], dtype=float)
                hi = np.array([errors.get(n, {}).get(metric, (np.nan, np.nan))[1] for n in names], dtype=float)
                yerr = np.stack([np.nan_to_num(heights - lo), np.nan_to_num(hi - heights)]).clip(min=0.0)
            bars = ax.bar(x + (i - (len(metrics) - 1) / 2) * width, heights, width, label=metric, yerr=yerr, capsize=2)
            ax.bar_label(bars, fmt="%.0f", fontsize=6, padding=1)
        ax.set_xticks(x, names, rotation=25, ha="right", fontsize=8)
        ax.set_ylabel("metric (%)")
        ax.set_ylim(0, 105)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
        return _save(fig, path)


def sweep_lines(
    path: str | Path,
    xs: Sequence[float],
    lines: Mapping[str, Sequence[tuple[float, float, float]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    log_x: bool = False,
) -> Path:
    """One line per series over ``xs`` (e.g. R@1 against the number of decoded windows, one line per model), with
    a shaded band where a point has an interval: ``lines[label][i] = (mean, low, high)`` at ``xs[i]`` (low = high =
    mean for a single value, drawn without a band).  A ``CURVE_SIZE_PX`` PNG."""
    if not lines or not len(xs):
        raise ValueError("sweep_lines needs at least one series and one x value")
    for label, points in lines.items():
        if len(points) != len(xs):
            raise ValueError(f"series {label!r} has {len(points)} points for {len(xs)} x values")
    x = np.asarray(xs, dtype=float)
    with _figure(CURVE_SIZE_PX) as (fig, ax):
        for label, points in lines.items():
            mean, low, high = (np.asarray(col, dtype=float) for col in zip(*points, strict=True))
            (line,) = ax.plot(x, mean, "o-", label=label, markersize=4)
            if np.any(high > low):
                ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        if log_x:
            ax.set_xscale("log")
        ax.set_xticks(x, [f"{v:g}" for v in x])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        return _save(fig, path)
