"""1-D span geometry: format conversions, IoU / generalized IoU, temporal NMS.

Formats are named in variables: ``_cw`` = (center, width), ``_se`` = (start, end).  Spans are the last dimension
(size 2) of a tensor; leading dimensions broadcast.  GIoU follows Rezatofighi et al. (CVPR 2019) in 1-D, as
Moment-DETR's span utilities use it.

>>> import torch
>>> cw_to_se(torch.tensor([0.5, 0.2]))
tensor([0.4000, 0.6000])
>>> elementwise_iou(torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, 3.0]]))
tensor([0.3333])
"""

from __future__ import annotations

import torch
from torch import Tensor


def cw_to_se(span_cw: Tensor) -> Tensor:
    """(..., 2) center/width -> (..., 2) start/end."""
    c, w = span_cw.unbind(-1)
    return torch.stack([c - 0.5 * w, c + 0.5 * w], dim=-1)


def se_to_cw(span_se: Tensor) -> Tensor:
    """(..., 2) start/end -> (..., 2) center/width."""
    s, e = span_se.unbind(-1)
    return torch.stack([0.5 * (s + e), e - s], dim=-1)


def _inter_union(a_se: Tensor, b_se: Tensor) -> tuple[Tensor, Tensor]:
    inter = (torch.minimum(a_se[..., 1], b_se[..., 1]) - torch.maximum(a_se[..., 0], b_se[..., 0])).clamp(min=0)
    union = (a_se[..., 1] - a_se[..., 0]) + (b_se[..., 1] - b_se[..., 0]) - inter
    return inter, union


def elementwise_iou(a_se: Tensor, b_se: Tensor) -> Tensor:
    """IoU of matching rows: (..., 2), (..., 2) -> (...). Two zero-length spans have IoU 0 (no division by 0)."""
    inter, union = _inter_union(a_se, b_se)
    return inter / union.clamp(min=1e-12)


def pairwise_iou(a_se: Tensor, b_se: Tensor) -> Tensor:
    """IoU of every pair: (N, 2), (M, 2) -> (N, M)."""
    return elementwise_iou(a_se[:, None, :], b_se[None, :, :])


def elementwise_giou(a_se: Tensor, b_se: Tensor) -> Tensor:
    """Generalized IoU of matching rows, in [-1, 1]: IoU - (enclosing - union) / enclosing."""
    inter, union = _inter_union(a_se, b_se)
    iou = inter / union.clamp(min=1e-12)
    enclosing = torch.maximum(a_se[..., 1], b_se[..., 1]) - torch.minimum(a_se[..., 0], b_se[..., 0])
    return iou - (enclosing - union) / enclosing.clamp(min=1e-12)


def pairwise_giou(a_se: Tensor, b_se: Tensor) -> Tensor:
    """Generalized IoU of every pair: (N, 2), (M, 2) -> (N, M)."""
    return elementwise_giou(a_se[:, None, :], b_se[None, :, :])


def temporal_nms(spans_se: Tensor, scores: Tensor, iou_threshold: float, max_keep: int | None = None) -> Tensor:
    """Greedy NMS over 1-D spans. Returns indices of kept spans, highest score first.

    A span is suppressed when its IoU with an already kept, higher-scored span is strictly greater than
    ``iou_threshold`` (the released RGNet/CONE rule).  Ties in score keep the original order (stable sort).
    The IoU matrix is computed once; the greedy pass is a loop over kept candidates only.
    """
    if max_keep is not None and max_keep < 1:
        raise ValueError(f"max_keep must be >= 1 or None, got {max_keep}")
    if spans_se.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=spans_se.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    spans = spans_se[order]
    iou = pairwise_iou(spans, spans)  # (N, N) in score order
    n = spans.shape[0]
    suppressed = torch.zeros(n, dtype=torch.bool, device=spans.device)
    over = (iou > iou_threshold).triu(diagonal=1)  # over[i, j]: j (lower score) overlaps i too much
    keep: list[int] = []
    over_rows = over.tolist()
    suppressed_list = suppressed.tolist()
    for i in range(n):
        if suppressed_list[i]:
            continue
        keep.append(i)
        if max_keep is not None and len(keep) >= max_keep:
            break
        row = over_rows[i]
        for j in range(i + 1, n):
            if row[j]:
                suppressed_list[j] = True
    return order[torch.tensor(keep, dtype=torch.long, device=spans.device)]
