"""rgnet.span_ops: format conversions, IoU / GIoU (hand cases, pairwise == elementwise), temporal NMS."""

from __future__ import annotations

import pytest
import torch

from rgnet.span_ops import (
    cw_to_se,
    elementwise_giou,
    elementwise_iou,
    pairwise_giou,
    pairwise_iou,
    se_to_cw,
    temporal_nms,
)


def _t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def _random_spans_se(gen: torch.Generator, n: int) -> torch.Tensor:
    start = torch.rand(n, generator=gen, dtype=torch.float64) * 10
    length = torch.rand(n, generator=gen, dtype=torch.float64) * 5
    return torch.stack([start, start + length], dim=-1)


# --- conversions --------------------------------------------------------------------------------------------------
def test_cw_to_se_hand_case() -> None:
    torch.testing.assert_close(cw_to_se(_t([[0.5, 0.2], [2.0, 4.0]])), _t([[0.4, 0.6], [0.0, 4.0]]))


def test_se_to_cw_hand_case() -> None:
    assert se_to_cw(_t([[1.0, 3.0], [2.0, 2.0]])).tolist() == [[2.0, 2.0], [2.0, 0.0]]


def test_conversions_round_trip_with_leading_dims() -> None:
    gen = torch.Generator().manual_seed(0)
    span_cw = torch.rand(3, 4, 2, generator=gen, dtype=torch.float64)
    assert cw_to_se(span_cw).shape == (3, 4, 2)
    torch.testing.assert_close(se_to_cw(cw_to_se(span_cw)), span_cw)
    span_se = _random_spans_se(gen, 7)
    torch.testing.assert_close(cw_to_se(se_to_cw(span_se)), span_se)


# --- IoU / GIoU -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("a", "b", "iou", "giou"),
    [
        ([0.0, 2.0], [1.0, 3.0], 1 / 3, 1 / 3),  # partial overlap: enclosing == union
        ([0.0, 4.0], [1.0, 2.0], 1 / 4, 1 / 4),  # containment
        ([0.0, 2.0], [0.0, 2.0], 1.0, 1.0),  # identical
        ([0.0, 1.0], [2.0, 3.0], 0.0, -1 / 3),  # disjoint: GIoU = -(gap) / enclosing
        ([0.0, 1.0], [1.0, 2.0], 0.0, 0.0),  # touching: no gap
    ],
)
def test_iou_and_giou_hand_cases(a: list[float], b: list[float], iou: float, giou: float) -> None:
    assert elementwise_iou(_t([a]), _t([b])).item() == pytest.approx(iou)
    assert elementwise_giou(_t([a]), _t([b])).item() == pytest.approx(giou)
    # symmetric
    assert elementwise_iou(_t([b]), _t([a])).item() == pytest.approx(iou)
    assert elementwise_giou(_t([b]), _t([a])).item() == pytest.approx(giou)


def test_zero_length_spans_give_finite_values() -> None:
    point = _t([[1.0, 1.0]])
    assert elementwise_iou(point, _t([[0.0, 2.0]])).item() == 0.0  # no length, no intersection length
    assert elementwise_iou(point, point).item() == 0.0  # 0 / 0 guarded
    assert elementwise_giou(point, point).item() == 0.0
    assert elementwise_giou(point, _t([[3.0, 3.0]])).item() == pytest.approx(-1.0)  # all of the enclosing is gap
    assert torch.isfinite(pairwise_giou(_t([[1.0, 1.0], [0.0, 2.0]]), point)).all()


def test_pairwise_equals_elementwise() -> None:
    gen = torch.Generator().manual_seed(1)
    a, b = _random_spans_se(gen, 6), _random_spans_se(gen, 4)
    iou, giou = pairwise_iou(a, b), pairwise_giou(a, b)
    assert iou.shape == giou.shape == (6, 4)
    for i in range(6):
        for j in range(4):
            assert iou[i, j].item() == pytest.approx(elementwise_iou(a[i], b[j]).item())
            assert giou[i, j].item() == pytest.approx(elementwise_giou(a[i], b[j]).item())
    assert ((iou >= 0) & (iou <= 1)).all()
    assert ((giou >= -1) & (giou <= iou + 1e-12)).all()  # GIoU never exceeds IoU


# --- temporal NMS ---------------------------------------------------------------------------------------------------
def test_nms_suppresses_overlaps_keeps_score_order() -> None:
    spans = _t([[1.0, 10.0], [20.0, 30.0], [0.0, 10.0]])
    scores = torch.tensor([0.8, 0.7, 0.9])
    # [0, 10] (0.9) suppresses [1, 10] (IoU 0.9); [20, 30] survives
    assert temporal_nms(spans, scores, 0.5).tolist() == [2, 1]


def test_nms_iou_exactly_at_threshold_is_kept() -> None:
    spans = _t([[0.0, 2.0], [0.0, 1.0]])  # IoU exactly 0.5: suppression needs IoU > threshold
    assert temporal_nms(spans, torch.tensor([0.9, 0.8]), 0.5).tolist() == [0, 1]
    assert temporal_nms(spans, torch.tensor([0.9, 0.8]), 0.49).tolist() == [0]


def test_nms_ties_keep_input_order() -> None:
    same = _t([[0.0, 10.0], [0.0, 10.0]])
    assert temporal_nms(same, torch.tensor([0.5, 0.5]), 0.5).tolist() == [0]
    disjoint = _t([[20.0, 30.0], [0.0, 10.0], [40.0, 50.0]])
    assert temporal_nms(disjoint, torch.tensor([0.5, 0.5, 0.5]), 0.5).tolist() == [0, 1, 2]


def test_nms_chain_suppression_is_greedy() -> None:
    # b overlaps a and c, a and c do not overlap: a suppresses b, so c survives (greedy, not transitive)
    spans = _t([[0.0, 10.0], [2.0, 12.0], [9.0, 19.0]])
    assert temporal_nms(spans, torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist() == [0, 2]


@pytest.mark.parametrize(("max_keep", "expected"), [(1, [3]), (2, [3, 0]), (3, [3, 0, 2]), (10, [3, 0, 2])])
def test_nms_max_keep(max_keep: int, expected: list[int]) -> None:
    spans = _t([[0.0, 1.0], [10.0, 11.2], [20.0, 21.0], [10.0, 11.0]])  # 1 and 3 overlap (IoU 1 / 1.2)
    scores = torch.tensor([0.8, 0.6, 0.7, 0.9])
    assert temporal_nms(spans, scores, 0.5, max_keep=max_keep).tolist() == expected


def test_nms_empty_input() -> None:
    keep = temporal_nms(torch.zeros(0, 2), torch.zeros(0), 0.5)
    assert keep.dtype == torch.long and keep.numel() == 0


def test_nms_matches_a_brute_force_reference() -> None:
    gen = torch.Generator().manual_seed(2)
    spans = _random_spans_se(gen, 40)
    scores = torch.rand(40, generator=gen)
    keep = temporal_nms(spans, scores, 0.3).tolist()
    expected: list[int] = []
    for i in sorted(range(40), key=lambda k: -float(scores[k])):
        if all(elementwise_iou(spans[i], spans[j]).item() <= 0.3 for j in expected):
            expected.append(i)
    assert keep == expected
