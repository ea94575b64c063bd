"""Hungarian matcher and RGNet losses: matcher invariants and hand-computed loss values."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from rgnet.config import LossConfig
from rgnet.model import Criterion, HungarianMatcher
from rgnet.model.criterion import contrastive_loss, sampling_hinge
from rgnet.model.matcher import match
from rgnet.model.rgnet import DecoderOutput, EncoderOutput
from rgnet.span_ops import cw_to_se, elementwise_giou


def random_predictions(m: int, q: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(m, q, 2, generator=g)
    spans_cw = torch.rand(m, q, 2, generator=g) * torch.tensor([1.0, 0.5])
    target_cw = torch.rand(m, 2, generator=g) * torch.tensor([1.0, 0.5]) + torch.tensor([0.0, 0.05])
    return logits, spans_cw, target_cw


def test_matcher_batched_equals_per_sample() -> None:
    matcher = HungarianMatcher()
    logits, spans_cw, target_cw = random_predictions(7, 5, seed=0)
    batched = matcher(logits, spans_cw, target_cw)
    single = torch.cat([matcher(logits[i : i + 1], spans_cw[i : i + 1], target_cw[i : i + 1]) for i in range(7)])
    assert batched.shape == (7,) and batched.dtype == torch.long
    assert torch.equal(batched, single)


def test_matcher_cost_is_the_documented_formula() -> None:
    matcher = HungarianMatcher(cost_l1=10.0, cost_giou=1.0, cost_fg=4.0)
    logits, spans_cw, target_cw = random_predictions(1, 3, seed=1)
    cost = matcher.cost(logits, spans_cw, target_cw)
    for k in range(3):
        l1 = (spans_cw[0, k] - target_cw[0]).abs().sum()
        giou = elementwise_giou(cw_to_se(spans_cw[0, k]), cw_to_se(target_cw[0]))
        p_fg = logits[0, k].softmax(-1)[0]
        torch.testing.assert_close(cost[0, k], 10 * l1 - giou - 4 * p_fg)


def test_one_target_fast_path_equals_linear_sum_assignment() -> None:
    g = torch.Generator().manual_seed(2)
    cost = torch.randn(50, 6, 1, generator=g)
    assignment = match(cost)
    expected = torch.stack([rows[0] for rows, cols in assignment])
    assert all(cols.tolist() == [0] for _, cols in assignment)
    assert torch.equal(cost[..., 0].argmin(dim=1), expected)
    # and through the matcher: the argmin of its cost matrix is what linear_sum_assignment picks
    matcher = HungarianMatcher()
    logits, spans_cw, target_cw = random_predictions(20, 5, seed=3)
    via_lsa = torch.stack([rows[0] for rows, _ in match(matcher.cost(logits, spans_cw, target_cw)[..., None])])
    assert torch.equal(matcher(logits, spans_cw, target_cw), via_lsa)


def test_general_match_is_optimal_for_several_targets() -> None:
    g = torch.Generator().manual_seed(4)
    cost = torch.rand(3, 4, 2, generator=g)
    for c, (rows, cols) in zip(cost, match(cost)):
        assert cols.tolist() == [0, 1]
        best = min(c[a, 0] + c[b, 1] for a, b in itertools.permutations(range(4), 2))
        torch.testing.assert_close(c[rows, cols].sum(), best)


def _outputs(logits: torch.Tensor, spans_cw: torch.Tensor, n: int = 4, lv: int = 6) -> dict[str, object]:
    """A model output with the given decoder tensors (L, M, Q, 2) and a dummy encoder for N pairs."""
    ones = torch.ones(n, lv)
    enc = EncoderOutput(
        memory=torch.zeros(n, lv, 2),
        memory_mask=ones.bool(),
        pos=torch.zeros(n, lv, 2),
        context_logit=torch.zeros(n),
        frame_logit=torch.zeros(n, lv),
        gate=ones,
        sampling_score=torch.zeros(n, lv),
    )
    return {"encoder": enc, "decoder": DecoderOutput(logits, spans_cw), "learned_context": torch.tensor(True)}


def _batch(target_cw: torch.Tensor, b: int = 2, lv: int = 6) -> dict[str, torch.Tensor]:
    q = torch.arange(b)
    return {
        "span_cw": target_cw,
        "in_frame": torch.zeros(b, dtype=torch.long),
        "out_frame": torch.ones(b, dtype=torch.long),
        "pair_text": q.repeat_interleave(b),
        "pair_window": q.repeat(b),
        "positive_pair": q * (b + 1),
        "video_mask": torch.ones(b, lv, dtype=torch.bool),
        "neg_window": torch.full((b,), -1),
    }


def test_perfect_prediction_gives_zero_span_losses() -> None:
    target_cw = torch.tensor([[0.4, 0.2], [0.7, 0.1]])
    spans_cw = torch.tensor([[[0.9, 0.05], [0.4, 0.2], [0.1, 0.1]], [[0.7, 0.1], [0.2, 0.3], [0.5, 0.5]]])
    logits = torch.zeros(2, 3, 2)
    criterion = Criterion(LossConfig())
    idx = criterion.matcher(logits, spans_cw, target_cw)
    assert idx.tolist() == [1, 0]
    terms = criterion.grounding_terms(logits, spans_cw, target_cw)
    assert terms["l1"].item() == 0.0
    assert terms["giou"].abs().item() < 1e-6


def test_class_loss_is_weighted_mean_over_elements() -> None:
    target_cw = torch.tensor([[0.5, 0.2]])
    spans_cw = torch.tensor([[[0.5, 0.2], [0.1, 0.05]]])  # query 0 matches
    logits = torch.tensor([[[1.0, 0.0], [0.5, 2.0]]])
    terms = Criterion(LossConfig(eos_coef=0.1)).grounding_terms(logits, spans_cw, target_cw)

    def nll(row: list[float], label: int) -> float:
        return -(row[label] - math.log(sum(math.exp(v) for v in row)))

    # query 0 foreground (weight 1), query 1 background (weight 0.1); the mean is over the 2 elements
    expected = (1.0 * nll([1.0, 0.0], 0) + 0.1 * nll([0.5, 2.0], 1)) / 2
    assert terms["fg"].item() == pytest.approx(expected, rel=1e-6)


def test_total_is_layers_plus_weighted_terms() -> None:
    target_cw = torch.tensor([[0.4, 0.2], [0.7, 0.1]])
    g = torch.Generator().manual_seed(5)
    layer_logits = torch.randn(1, 2, 3, 2, generator=g)
    layer_spans = torch.rand(1, 2, 3, 2, generator=g) * 0.5 + 0.1
    logits, spans = layer_logits.expand(3, -1, -1, -1), layer_spans.expand(3, -1, -1, -1)  # 3 identical layers
    out = _outputs(logits, spans)
    enc = out["encoder"]
    assert isinstance(enc, EncoderOutput)
    out["encoder"] = enc._replace(
        context_logit=torch.tensor([2.0, 0.5, -1.0, 1.0]), sampling_score=torch.randn(4, 6, generator=g)
    )
    batch = _batch(target_cw)
    cfg = LossConfig(sampling_weight=2.0, contrastive_weight=3.0)
    losses = Criterion(cfg).forward(out, batch)
    one = Criterion(cfg).grounding_terms(layer_logits[0], layer_spans[0], target_cw)
    per_layer = 10 * one["l1"] + 1 * one["giou"] + 4 * one["fg"]
    torch.testing.assert_close(losses["loss_ground"], 3 * per_layer)
    torch.testing.assert_close(
        losses["loss"], 3 * per_layer + 2.0 * losses["loss_sampling"] + 3.0 * losses["loss_contrastive"]
    )
    last_only = Criterion(LossConfig(aux_loss=False)).forward(out, batch)
    torch.testing.assert_close(last_only["loss_ground"], per_layer)
    # zero weights and frozen ranking skip their terms
    skipped = Criterion(LossConfig(sampling_weight=0.0, fg_weight=0.0)).forward(out, batch)
    assert skipped["loss_sampling"].item() == 0.0 and skipped["loss_fg"].item() == 0.0
    out["learned_context"] = torch.tensor(False)
    frozen = Criterion(cfg).forward(out, batch)
    assert frozen["loss_contrastive"].item() == 0.0


def test_sampling_hinge_by_hand() -> None:
    scores = torch.tensor([[0.5, 0.1, 0.9], [0.0, 2.0, -1.0]])
    loss = sampling_hinge(scores, torch.tensor([0, 1]), torch.tensor([2, 2]), margin=0.2)
    # query 0: max(0, 0.2 + 0.9 - 0.5) = 0.6; query 1: max(0, 0.2 - 1.0 - 2.0) = 0
    assert loss.item() == pytest.approx(0.3)


def _lse(values: list[float]) -> float:
    return math.log(sum(math.exp(v) for v in values))


def test_infonce_in_batch_by_hand() -> None:
    a = [[1.0, 0.2], [-0.5, 0.3]]  # a[q][w], pairs in q * B + w order
    logit = torch.tensor([a[0][0], a[0][1], a[1][0], a[1][1]])
    pair_text, pair_window = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])
    t = 0.5
    loss = contrastive_loss(logit, pair_text, pair_window, 2, 2, "in_batch", t)
    s = [[v / t for v in row] for row in a]
    row = sum(_lse(s[q]) - s[q][q] for q in range(2)) / 2
    col = sum(_lse([s[0][w], s[1][w]]) - s[w][w] for w in range(2)) / 2
    assert loss.item() == pytest.approx(0.5 * (row + col), rel=1e-6)


def test_infonce_same_video_and_both_by_hand() -> None:
    t = 0.25
    # same_video, B = 2: query 0 has negative window 2, query 1 has none; pairs (0,0), (1,1), (0,2)
    logit = torch.tensor([0.8, -0.2, 0.5])
    loss = contrastive_loss(logit, torch.tensor([0, 1, 0]), torch.tensor([0, 1, 2]), 2, 3, "same_video", t)
    row0 = _lse([0.8 / t, 0.5 / t]) - 0.8 / t
    assert loss.item() == pytest.approx((row0 + 0.0) / 2, rel=1e-6)  # a row with only its positive costs 0

    # both, B = 2: the 2 x 2 block, then (0, 2) and (1, 3)
    a = [[0.3, -0.1], [0.6, 0.9]]
    neg = [0.4, 1.2]
    logit = torch.tensor([a[0][0], a[0][1], a[1][0], a[1][1], neg[0], neg[1]])
    pair_text = torch.tensor([0, 0, 1, 1, 0, 1])
    pair_window = torch.tensor([0, 1, 0, 1, 2, 3])
    loss = contrastive_loss(logit, pair_text, pair_window, 2, 4, "both", t)
    s = [[v / t for v in row] for row in a]
    row = sum(_lse([*s[q], neg[q] / t]) - s[q][q] for q in range(2)) / 2
    col = sum(_lse([s[0][w], s[1][w]]) - s[w][w] for w in range(2)) / 2
    assert loss.item() == pytest.approx(0.5 * (row + col), rel=1e-6)
