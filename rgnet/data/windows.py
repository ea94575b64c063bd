"""Sliding windows over a video's feature frames: the proposal candidates of RGNet (paper Sec. 3.1).

A window has W frames and windows start every S frames (default S = W // 2, the released code's stride).  Window i
covers frames ``[i*S, min(i*S + W, T))``; the last one may be short (the model masks its padding).  Unlike the
released code there is no half-length duplicate window at the start, and no window is emitted that only repeats
frames the previous one already covers.

A window is *positive* for a query when it overlaps the ground-truth moment (intersection length > 0); a zero-length
moment at time t is inside the window that contains t.  Training samples positive windows and the retrieval metric
counts them, so both use :func:`overlap_mask`.

Spans inside a window are ``(center, width)`` normalised by the window's *valid* length (its real frame count, not W),
which is what the released code does and what :func:`window_cw_to_sec` inverts.

>>> window_bounds(10, 4, 2).tolist()
[[0, 4], [2, 6], [4, 8], [6, 10]]
>>> window_bounds(11, 4, 2).tolist()
[[0, 4], [2, 6], [4, 8], [6, 10], [8, 11]]
>>> positive_windows(window_bounds(11, 4, 2), 3.5, 4.0).tolist()
[0, 1]
"""

from __future__ import annotations

import math
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

from rgnet.span_ops import cw_to_se

ArrayOrTensor = TypeVar("ArrayOrTensor", np.ndarray, Tensor)


def window_frames(length_sec: float, stride_sec: float, fps: float) -> tuple[int, int]:
    """Window length W and stride S in frames; ``stride_sec`` 0 means W // 2.

    >>> window_frames(180.0, 0.0, 5.0)   # MAD: 900 frames, stride 450
    (900, 450)
    >>> window_frames(48.0, 0.0, 1.875)  # Ego4D: 90 frames, stride 45
    (90, 45)
    """
    if fps <= 0 or not math.isfinite(fps):
        raise ValueError(f"fps must be a positive number, got {fps}")
    if length_sec <= 0:
        raise ValueError(f"window length must be > 0 seconds, got {length_sec} (windows.length_sec)")
    if stride_sec < 0:
        raise ValueError(f"window stride must be >= 0 seconds, got {stride_sec} (windows.stride_sec; 0 = half length)")
    length = max(1, round(length_sec * fps))
    stride = max(1, round(stride_sec * fps)) if stride_sec > 0 else max(1, length // 2)
    if stride > length:
        raise ValueError(
            f"window stride {stride} frames exceeds the length {length} frames: frames between windows would never "
            "be seen (set windows.stride_sec <= windows.length_sec)"
        )
    return length, stride


def _check_geometry(num_frames: int, length: int, stride: int) -> None:
    if num_frames < 1:
        raise ValueError(f"a video needs at least one feature frame to be windowed, got {num_frames}")
    if length < 1 or stride < 1:
        raise ValueError(f"window length and stride must be >= 1 frame, got W={length}, S={stride}")
    if stride > length:
        raise ValueError(f"window stride S={stride} must not exceed the length W={length} (frames would be skipped)")


def num_windows(num_frames: int, length: int, stride: int) -> int:
    """P = 1 if T <= W, else 1 + ceil((T - W) / S): the first window whose end reaches T is the last.

    >>> num_windows(900, 900, 450), num_windows(901, 900, 450), num_windows(1800, 900, 450)
    (1, 2, 3)
    """
    _check_geometry(num_frames, length, stride)
    if num_frames <= length:
        return 1
    return 1 + -(-(num_frames - length) // stride)  # ceil division on ints


def window_starts(num_frames: int, length: int, stride: int) -> np.ndarray:
    """(P,) int64 start frames 0, S, 2S, ...: the fewest windows that cover every frame.

    >>> window_starts(5, 90, 45).tolist()
    [0]
    """
    return np.arange(num_windows(num_frames, length, stride), dtype=np.int64) * stride


def window_bounds(num_frames: int, length: int, stride: int) -> np.ndarray:
    """(P, 2) int64 ``[start, stop)`` frames of every window; stop = min(start + W, T)."""
    starts = window_starts(num_frames, length, stride)
    stops = np.minimum(starts + length, num_frames)
    return np.stack([starts, stops], axis=1)


def overlap_mask(
    win_start: np.ndarray,
    win_stop: np.ndarray,
    gt_start: np.ndarray | float,
    gt_end: np.ndarray | float,
    video_stop: np.ndarray | float,
) -> np.ndarray:
    """Which windows are positive for a ground-truth moment (all arguments broadcast together).

    Positive = the intersection of ``[win_start, win_stop)`` and ``[gt_start, gt_end]`` has length > 0.  A
    zero-length moment at t has no length to intersect, so it is positive for the window with
    ``win_start <= t < win_stop``, and a moment at the very end (t == ``video_stop``) for the window ending there.
    Works in frames or seconds alike (the retrieval metric calls it with seconds).

    >>> starts, stops = np.array([0, 4, 8]), np.array([4, 8, 10])
    >>> overlap_mask(starts, stops, 4.0, 4.0, 10).tolist(), overlap_mask(starts, stops, 10.0, 10.0, 10).tolist()
    ([False, True, False], [False, False, True])
    >>> overlap_mask(starts, stops, 3.0, 4.0, 10).tolist()
    [True, False, False]
    """
    win_start = np.asarray(win_start, dtype=np.float64)
    win_stop = np.asarray(win_stop, dtype=np.float64)
    gt_start = np.asarray(gt_start, dtype=np.float64)
    gt_end = np.asarray(gt_end, dtype=np.float64)
    video_stop = np.asarray(video_stop, dtype=np.float64)
    inter = np.minimum(win_stop, gt_end) - np.maximum(win_start, gt_start)
    contains = (win_start <= gt_start) & ((gt_start < win_stop) | ((gt_start == win_stop) & (win_stop >= video_stop)))
    return np.where(gt_end > gt_start, inter > 0, contains)


def positive_windows(bounds: np.ndarray, start_frame: float, end_frame: float) -> np.ndarray:
    """Indices (int64, ascending) of the windows in ``bounds`` (P, 2) that overlap the GT ``[start, end]`` frames.

    Every overlapping window counts, not only those containing the whole moment (as the released code's positive
    set).  A moment starting at or past the end of the video has no positive window.

    >>> b = window_bounds(10, 4, 2)
    >>> positive_windows(b, 2.0, 2.0).tolist(), positive_windows(b, 10.0, 10.0).tolist()
    ([0, 1], [3])
    >>> positive_windows(b, 4.0, 6.0).tolist()  # touching a window's edge is no overlap
    [1, 2]
    """
    if end_frame < start_frame:
        raise ValueError(f"moment end {end_frame} is before its start {start_frame}")
    bounds = np.asarray(bounds)
    if len(bounds) == 0:
        return np.zeros(0, dtype=np.int64)
    mask = overlap_mask(bounds[:, 0], bounds[:, 1], start_frame, end_frame, bounds[:, 1].max())
    return np.flatnonzero(mask).astype(np.int64)


def clip_to_window_cw(start_frame: float, end_frame: float, win_start: int, win_stop: int) -> tuple[float, float]:
    """The GT moment clipped to one window, as (center, width) relative to the window's valid length.

    >>> clip_to_window_cw(3.0, 5.0, 2, 6)   # inside: frames 1..3 of a 4-frame window
    (0.5, 0.5)
    >>> clip_to_window_cw(0.0, 5.0, 2, 6)   # clipped at the window's start
    (0.375, 0.75)
    """
    span_cw = clip_to_windows_cw(start_frame, end_frame, np.array([[win_start, win_stop]]))
    return float(span_cw[0, 0]), float(span_cw[0, 1])


def clip_to_windows_cw(start_frame: float, end_frame: float, bounds: np.ndarray) -> np.ndarray:
    """Batched :func:`clip_to_window_cw`: one moment against windows ``bounds`` (n, 2) -> (n, 2) float64 (c, w)."""
    bounds = np.asarray(bounds, dtype=np.float64).reshape(-1, 2)
    win_start, win_stop = bounds[:, 0], bounds[:, 1]
    valid = win_stop - win_start
    if np.any(valid <= 0):
        raise ValueError(f"windows must have a positive length, got bounds {bounds[valid <= 0].tolist()}")
    s = (np.clip(start_frame, win_start, win_stop) - win_start) / valid  # (n,)
    e = (np.clip(end_frame, win_start, win_stop) - win_start) / valid
    return np.stack([0.5 * (s + e), e - s], axis=1)


def window_cw_to_sec(
    span_cw: ArrayOrTensor,
    win_start_frame: ArrayOrTensor | float,
    win_len_frames: ArrayOrTensor | float,
    fps: float,
) -> ArrayOrTensor:
    """Window-relative (center, width) spans -> absolute (start, end) seconds.

    ``span_cw`` is (..., 2); ``win_start_frame`` and ``win_len_frames`` (the valid length) are scalars or have the
    leading shape of ``span_cw`` up to some depth, e.g. spans (P, Q, 2) with per-window starts (P,).  No clipping to
    the video: the caller clips to [0, duration].  Formula of the released inference (reference notes section 4):
    t = (window start + (c -/+ w / 2) * valid length) / fps.

    >>> window_cw_to_sec(torch.tensor([[[0.5, 0.5]], [[0.25, 0.5]]]), torch.tensor([0, 45]), torch.tensor([90, 60]),
    ...                  1.875).tolist()
    [[[12.0, 36.0]], [[24.0, 40.0]]]
    """
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    if not isinstance(span_cw, Tensor):  # the same arithmetic in float64, back as an array
        out = window_cw_to_sec(
            torch.from_numpy(np.asarray(span_cw, dtype=np.float64)),
            torch.as_tensor(np.asarray(win_start_frame, dtype=np.float64)),
            torch.as_tensor(np.asarray(win_len_frames, dtype=np.float64)),
            fps,
        )
        return out.numpy()
    start = torch.as_tensor(win_start_frame, dtype=span_cw.dtype, device=span_cw.device)
    length = torch.as_tensor(win_len_frames, dtype=span_cw.dtype, device=span_cw.device)
    start = start.reshape(start.shape + (1,) * (span_cw.dim() - start.dim()))  # align leading dims, and (s, e)
    length = length.reshape(length.shape + (1,) * (span_cw.dim() - length.dim()))
    return (start + cw_to_se(span_cw) * length) / fps


def rank_windows(context_logit: ArrayOrTensor) -> ArrayOrTensor:
    """Window indices best first by context score s_ctx over the last axis (P,) or (q, P), ties in window order:
    the ranking of a prediction row's windows, of an answer's windows and of a timeline's top-k marks."""
    if isinstance(context_logit, Tensor):
        return torch.sort(context_logit, dim=-1, descending=True, stable=True).indices
    return rank_windows(torch.as_tensor(np.ascontiguousarray(context_logit))).numpy()


def sec_to_frame(t_sec: float, fps: float) -> float:
    """Seconds -> (fractional) feature frame index: frame f covers [f / fps, (f + 1) / fps)."""
    return t_sec * fps


def frame_to_sec(frame: float, fps: float) -> float:
    """(Fractional) feature frame index -> seconds."""
    return frame / fps
