"""rgnet.data.windows: window layout, positive windows, clipping to a window, window-relative spans to seconds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rgnet.data.windows import (
    clip_to_window_cw,
    clip_to_windows_cw,
    frame_to_sec,
    num_windows,
    overlap_mask,
    positive_windows,
    rank_windows,
    sec_to_frame,
    window_bounds,
    window_cw_to_sec,
    window_frames,
    window_starts,
)


# --- sizes ----------------------------------------------------------------------------------------------------------
def test_window_frames_paper_settings() -> None:
    assert window_frames(180.0, 0.0, 5.0) == (900, 450)  # MAD
    assert window_frames(48.0, 0.0, 1.875) == (90, 45)  # Ego4D
    assert window_frames(48.0, 12.0, 1.875) == (90, 22)  # explicit stride, rounded
    assert window_frames(0.4, 0.0, 1.0) == (1, 1)  # both at least one frame


@pytest.mark.parametrize(
    ("length", "stride", "fps"), [(0.0, 0.0, 5.0), (10.0, -1.0, 5.0), (10.0, 0.0, 0.0), (10.0, 20.0, 5.0)]
)
def test_window_frames_rejects_bad_values(length: float, stride: float, fps: float) -> None:
    with pytest.raises(ValueError):
        window_frames(length, stride, fps)


# --- layout ---------------------------------------------------------------------------------------------------------
def test_short_last_window() -> None:
    bounds = window_bounds(11, 4, 2)
    assert bounds.tolist() == [[0, 4], [2, 6], [4, 8], [6, 10], [8, 11]]
    assert bounds.dtype == np.int64


def test_no_half_length_duplicate_at_start() -> None:
    # The released code's layout for T=10, W=4, S=2 starts with [0, 2), a prefix of [0, 4); ours does not.
    bounds = window_bounds(10, 4, 2)
    assert bounds.tolist() == [[0, 4], [2, 6], [4, 8], [6, 10]]
    assert window_starts(10, 4, 2).tolist() == [0, 2, 4, 6]


def test_no_window_repeating_covered_frames() -> None:
    # [6, 10) reaches the end: no [8, 10) after it
    assert window_bounds(10, 4, 2)[-1].tolist() == [6, 10]
    assert window_bounds(900, 900, 450).tolist() == [[0, 900]]
    assert window_bounds(901, 900, 450).tolist() == [[0, 900], [450, 901]]


def test_video_shorter_than_a_window_is_one_window() -> None:
    assert window_bounds(3, 90, 45).tolist() == [[0, 3]]
    assert window_bounds(1, 4, 2).tolist() == [[0, 1]]


def test_empty_video_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one"):
        window_bounds(0, 4, 2)


@settings(derandomize=True, max_examples=200, deadline=None)
@given(t=st.integers(1, 400), w=st.integers(1, 60), s_frac=st.floats(0.01, 1.0))
def test_layout_invariants(t: int, w: int, s_frac: float) -> None:
    s = max(1, min(w, round(w * s_frac)))
    bounds = window_bounds(t, w, s)
    starts, stops = bounds[:, 0], bounds[:, 1]
    assert len(bounds) == num_windows(t, w, s)
    assert (starts == np.arange(len(bounds)) * s).all()
    assert (stops == np.minimum(starts + w, t)).all()
    covered = np.zeros(t, dtype=bool)
    for a, b in bounds:
        covered[a:b] = True
    assert covered.all()  # every frame is in some window
    assert stops[-1] == t and (stops[:-1] < t).all()  # only the last window reaches the end: each adds new frames


# --- positive windows -----------------------------------------------------------------------------------------------
def test_gt_spanning_two_windows() -> None:
    bounds = window_bounds(12, 4, 4)  # [0,4) [4,8) [8,12)
    assert positive_windows(bounds, 3.0, 5.0).tolist() == [0, 1]
    assert positive_windows(bounds, 1.0, 11.0).tolist() == [0, 1, 2]


def test_gt_touching_a_window_edge_is_not_an_overlap() -> None:
    bounds = window_bounds(12, 4, 4)
    assert positive_windows(bounds, 4.0, 8.0).tolist() == [1]
    assert positive_windows(bounds, 2.0, 4.0).tolist() == [0]


def test_overlapping_windows_all_positive() -> None:
    bounds = window_bounds(11, 4, 2)  # [0,4) [2,6) [4,8) [6,10) [8,11)
    assert positive_windows(bounds, 5.0, 6.5).tolist() == [1, 2, 3]


def test_zero_length_gt() -> None:
    bounds = window_bounds(11, 4, 2)
    assert positive_windows(bounds, 5.0, 5.0).tolist() == [1, 2]  # windows containing frame time 5
    assert positive_windows(bounds, 0.0, 0.0).tolist() == [0]
    assert positive_windows(bounds, 4.0, 4.0).tolist() == [1, 2]  # 4 is outside [0, 4)
    assert positive_windows(bounds, 11.0, 11.0).tolist() == [4]  # at the very end: the last window
    assert positive_windows(bounds, 10.0, 10.0).tolist() == [4]  # [6, 10) ends before 10 and is not the last


def test_gt_past_the_end_has_no_positive_window() -> None:
    assert positive_windows(window_bounds(11, 4, 2), 12.0, 13.0).tolist() == []


def test_gt_end_before_start_is_an_error() -> None:
    with pytest.raises(ValueError, match="before"):
        positive_windows(window_bounds(11, 4, 2), 5.0, 4.0)


def test_overlap_mask_broadcasts_in_seconds() -> None:
    win_start = np.array([[0.0, 24.0], [0.0, 24.0]])  # (B, K) ranked windows of two queries
    win_stop = np.array([[48.0, 60.0], [48.0, 60.0]])
    gt_start = np.array([[50.0], [60.0]])
    gt_end = np.array([[55.0], [60.0]])
    mask = overlap_mask(win_start, win_stop, gt_start, gt_end, np.array([[60.0], [60.0]]))
    assert mask.tolist() == [[False, True], [False, True]]


# --- clipping and conversion -----------------------------------------------------------------------------------------
def test_clip_to_window_cw_hand_cases() -> None:
    assert clip_to_window_cw(3.0, 5.0, 2, 6) == (0.5, 0.5)
    assert clip_to_window_cw(0.0, 5.0, 2, 6) == (0.375, 0.75)  # clipped at the window start
    assert clip_to_window_cw(5.0, 20.0, 2, 6) == (0.875, 0.25)  # clipped at the window stop
    assert clip_to_window_cw(8.0, 9.0, 8, 11) == pytest.approx((1 / 6, 1 / 3))  # short last window: valid length 3
    assert clip_to_window_cw(4.0, 4.0, 2, 6) == (0.5, 0.0)  # zero length stays zero


def test_clip_to_windows_cw_batched_equals_single() -> None:
    bounds = window_bounds(11, 4, 2)
    batched = clip_to_windows_cw(1.5, 9.25, bounds)
    assert batched.shape == (5, 2)
    for i, (a, b) in enumerate(bounds):
        assert tuple(batched[i]) == pytest.approx(clip_to_window_cw(1.5, 9.25, int(a), int(b)))
    assert ((batched >= 0) & (batched <= 1)).all()


def test_window_cw_to_sec_inverts_clipping() -> None:
    fps, bounds = 1.875, window_bounds(200, 90, 45)
    start_f, end_f = 50.0, 80.0
    pos = positive_windows(bounds, start_f, end_f)
    span_cw = clip_to_windows_cw(start_f, end_f, bounds[pos])  # (n, 2)
    sec = window_cw_to_sec(span_cw, bounds[pos, 0], bounds[pos, 1] - bounds[pos, 0], fps)  # (n, 2)
    clipped = np.stack([np.maximum(start_f, bounds[pos, 0]), np.minimum(end_f, bounds[pos, 1])], axis=1) / fps
    np.testing.assert_allclose(sec, clipped)


def test_window_cw_to_sec_batched_tensor() -> None:
    span_cw = torch.tensor([[[0.5, 0.5], [0.5, 1.0]], [[0.25, 0.5], [1.0, 0.0]]])  # (P=2, Q=2, 2)
    starts = torch.tensor([0, 45])  # (P,)
    lens = torch.tensor([90, 60])
    sec = window_cw_to_sec(span_cw, starts, lens, 1.875)
    assert isinstance(sec, torch.Tensor) and sec.shape == (2, 2, 2)
    torch.testing.assert_close(sec, torch.tensor([[[12.0, 36.0], [0.0, 48.0]], [[24.0, 40.0], [56.0, 56.0]]]))
    # scalars work too, and numpy matches torch
    np.testing.assert_allclose(window_cw_to_sec(span_cw.numpy()[1], 45, 60, 1.875), sec[1].numpy())


def test_rank_windows_best_first_ties_in_window_order() -> None:
    logit = torch.tensor([[0.5, 2.0, 0.5, -1.0, 2.0], [0.0, 0.0, 0.0, 0.0, 1.0]])  # (q=2, P=5)
    order = rank_windows(logit)
    assert order.tolist() == [[1, 4, 0, 2, 3], [4, 0, 1, 2, 3]]
    # an array (e.g. a timeline's float64 logits) ranks the same way, as an array
    assert rank_windows(logit.double().numpy()[0]).tolist() == [1, 4, 0, 2, 3]
    assert isinstance(rank_windows(np.array([1.0, 3.0])), np.ndarray)
    # saturated sigmoids tie, logits do not: the ranking is by the logit
    assert rank_windows(np.array([40.0, 50.0, 45.0])).tolist() == [1, 2, 0]


def test_sec_frame_round_trip() -> None:
    assert sec_to_frame(4.0, 1.875) == 7.5
    assert frame_to_sec(7.5, 1.875) == 4.0
    assert frame_to_sec(sec_to_frame(123.4, 5.0), 5.0) == pytest.approx(123.4)
