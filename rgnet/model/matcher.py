"""Hungarian matching of moment predictions to the ground truth (DETR, Carion et al. 2020; RGNet Eq. 9).

Glossary (``rgnet`` package docstring): M decoded pairs (samples), Q moment queries, G ground-truth spans per sample.

Cost of prediction k against a target: match_l1 * ||b_k - b||_1 - match_giou * GIoU(b_k, b) - match_fg * p_k(fg),
with spans b = (center, width) and p = softmax(logits).  Every positive window has exactly one GT span, so the
optimal assignment is the argmin of the cost over Q; :func:`match` is the general G-target solver
(scipy's ``linear_sum_assignment``) that the fast path is tested against.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from rgnet.span_ops import cw_to_se, elementwise_giou


def match(cost: Tensor) -> list[tuple[Tensor, Tensor]]:
    """General assignment: cost (M, Q, G) -> per sample (query indices, target indices), sorted by target."""
    out = []
    for c in cost.detach().cpu().numpy():
        rows, cols = linear_sum_assignment(c)
        order = np.argsort(cols)
        out.append((torch.as_tensor(rows[order], dtype=torch.long), torch.as_tensor(cols[order], dtype=torch.long)))
    return out


class HungarianMatcher:
    """One GT span per sample -> the index of the matched query per sample."""

    def __init__(self, cost_l1: float = 10.0, cost_giou: float = 1.0, cost_fg: float = 4.0) -> None:
        self.cost_l1 = cost_l1
        self.cost_giou = cost_giou
        self.cost_fg = cost_fg

    @torch.no_grad()
    def cost(self, logits: Tensor, spans_cw: Tensor, target_cw: Tensor) -> Tensor:
        """logits (M, Q, 2), spans_cw (M, Q, 2), target_cw (M, 2) -> cost (M, Q), in one tensor op per term."""
        target = target_cw[:, None, :].float()  # (M, 1, 2)
        spans = spans_cw.float()
        l1 = (spans - target).abs().sum(-1)  # (M, Q)
        giou = elementwise_giou(cw_to_se(spans), cw_to_se(target))  # (M, Q)
        p_fg = logits.float().softmax(-1)[..., 0]  # (M, Q)
        return self.cost_l1 * l1 - self.cost_giou * giou - self.cost_fg * p_fg

    @torch.no_grad()
    def __call__(self, logits: Tensor, spans_cw: Tensor, target_cw: Tensor) -> Tensor:
        """-> (M,) long: the matched query of each sample (argmin = the one-target Hungarian solution)."""
        return self.cost(logits, spans_cw, target_cw).argmin(dim=1)
