"""RGNet's training losses (paper Sec. 3.5, Eq. 6-10; DESIGN section 4).

Glossary (``rgnet`` package docstring): B queries (= decoded positive pairs), N query-window pairs, P windows, Lv
frames, Q moment queries, L decoder layers.

- Grounding (Eq. 9), on every decoder layer (or the last only without ``aux_loss``), each matched independently:
  span_l1_weight * L1 + giou_weight * (1 - GIoU) + fg_weight * CE(fg/bg).  L1 is the mean over matched pairs and
  the 2 coordinates; CE weighs foreground 1 and background ``eos_coef`` and is the plain mean over the M*Q
  elements, not normalised by the weights (as released).
- Sampling hinge (Eq. 6): mean over positive pairs of max(0, margin + s[out_frame] - s[in_frame]).  This is the plain
  mean; the released code scales it by 2 (2 / (B * n_pairs) with one pair per query), i.e. our
  ``sampling_weight`` = 1 equals the released weight 0.5.
- Inter-proposal InfoNCE (Eq. 8) on context logits / contrastive_temperature, see :func:`contrastive_loss`.
- Total (Eq. 10): L_ground + sampling_weight * L_samp + contrastive_weight * L_cont.  A term with weight 0 is not
  computed; with frozen ranking (retrieval="none") the contrastive term has nothing to train and is skipped.

Sharded steps (``rgnet.data.samples`` module docstring): a rank holding queries [offset, offset + B_r) of a global
batch of B computes its *share* of every term: sums over its queries divided by the global B (or B * Q, B * 2), and
the InfoNCE columns of its own positive windows over the logits of all ranks (``QueryShard.gather``, differentiable).
The shares of all ranks add up to the one-process loss; with one rank the share is the loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rgnet.config import LossConfig
from rgnet.model.matcher import HungarianMatcher
from rgnet.model.rgnet import DecoderOutput, EncoderOutput
from rgnet.span_ops import cw_to_se, elementwise_giou


@dataclass(frozen=True)
class QueryShard:
    """Where a rank's B_r queries sit in the global batch of ``total`` queries (one rank: offset 0, total B_r).

    ``gather`` maps a (B_r, ...) tensor of this rank to the (total, ...) tensor of all ranks in slot order, with
    gradients flowing back to every rank's rows (``rgnet.train.distributed``); None when one rank holds the batch.
    """

    offset: int
    total: int
    gather: Callable[[Tensor], Tensor] | None = None


def sampling_hinge(
    sampling_score: Tensor, in_frame: Tensor, out_frame: Tensor, margin: float, total: int | None = None
) -> Tensor:
    """Eq. 6: sampling_score (B, Lv) of the positive pairs, in_frame / out_frame (B,) -> scalar: the sum over the B
    pairs divided by ``total`` (default B: the plain mean)."""
    s_in = sampling_score.gather(1, in_frame[:, None]).squeeze(1)  # (B,)
    s_out = sampling_score.gather(1, out_frame[:, None]).squeeze(1)
    return F.relu(margin + s_out - s_in).sum() / (total or len(in_frame))


def contrastive_loss(
    context_logit: Tensor,
    pair_text: Tensor,
    pair_window: Tensor,
    num_queries: int,
    num_windows: int,
    negatives: str,
    temperature: float,
    shard: QueryShard | None = None,
) -> Tensor:
    """Eq. 8: InfoNCE over the (B, P) matrix of context logits; the positive of query q is window q.

    Entries without a pair are -inf (they drop out of the softmax).
    - in_batch: symmetric CE over the B x B block (rows and columns averaged; CLIP-style, as released).
    - same_video: row CE over the row's pairs {own positive, own same-video negative}.
    - both: row CE over all of the row's pairs, averaged with the column CE of the B x B block.

    With a ``shard`` the rows are the rank's B_r queries (query q's positive is window offset + q, the first
    ``shard.total`` windows are the global batch's positives): the rank's share is its rows' CE plus the CE of the
    columns of its own positive windows over every rank's rows (gathered), both summed and divided by the global B.
    """
    b = num_queries
    shard = shard or QueryShard(0, b)
    total, offset = shard.total, shard.offset
    logits = context_logit.new_full((b, num_windows), float("-inf"))
    logits = logits.index_put((pair_text, pair_window), context_logit / temperature)  # (B_r, P)
    target = torch.arange(b, device=logits.device) + offset  # each row's positive window
    row = F.cross_entropy(logits, target, reduction="sum") / total
    if negatives == "same_video":
        return row
    if negatives not in ("in_batch", "both"):
        raise ValueError(f"loss.negatives={negatives!r} is not one of in_batch, same_video, both")
    block = logits[:, :total]  # (B_r, B): this rank's queries against the B positive windows
    if shard.gather is not None and total != b:
        block = shard.gather(block)  # (B, B): every rank's queries
    own_columns = block[:, offset : offset + b].t()  # (B_r, B): column w lists every query's logit for window w
    column = F.cross_entropy(own_columns, target, reduction="sum") / total
    return 0.5 * (row + column)


class Criterion(nn.Module):
    """All of RGNet's losses; ``forward`` returns the total under "loss" plus detached terms for logging."""

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.matcher = HungarianMatcher(cfg.match_l1, cfg.match_giou, cfg.match_fg)
        self.class_weight: Tensor
        self.register_buffer("class_weight", torch.tensor([1.0, cfg.eos_coef]), persistent=False)  # fg, bg

    def grounding_terms(
        self, logits: Tensor, spans_cw: Tensor, target_cw: Tensor, total: int | None = None
    ) -> dict[str, Tensor]:
        """One decoder layer: logits (M, Q, 2), spans_cw (M, Q, 2), target_cw (M, 2) -> unweighted l1/giou/fg, each
        summed over the M pairs and divided by ``total`` pairs (default M: the plain means)."""
        cfg = self.cfg
        logits, spans_cw, target_cw = logits.float(), spans_cw.float(), target_cw.float()
        m, q = logits.shape[:2]
        total = total or m
        rows = torch.arange(m, device=logits.device)
        idx = self.matcher(logits, spans_cw, target_cw)  # (M,)
        matched = spans_cw[rows, idx]  # (M, 2)
        zero = logits.new_zeros(())
        l1 = (matched - target_cw).abs().sum() / (2 * total) if cfg.span_l1_weight else zero
        giou = (1 - elementwise_giou(cw_to_se(matched), cw_to_se(target_cw))).sum() / total if cfg.giou_weight else zero
        if cfg.fg_weight:
            labels = torch.ones(m, q, dtype=torch.long, device=logits.device)  # 1 = background
            labels[rows, idx] = 0  # the matched query is foreground
            ce = F.cross_entropy(logits.reshape(m * q, 2), labels.view(-1), weight=self.class_weight, reduction="none")
            fg = ce.sum() / (total * q)  # plain mean over elements, not divided by the summed weights (released)
        else:
            fg = zero
        return {"l1": l1, "giou": giou, "fg": fg}

    def forward(
        self, out: dict[str, Any], batch: dict[str, Tensor], shard: QueryShard | None = None
    ) -> dict[str, Tensor]:
        """Losses of ``out`` on ``batch``; with a ``shard``, this rank's share of the global batch's losses."""
        cfg = self.cfg
        num_queries = shard.total if shard is not None else int(batch["positive_pair"].shape[0])  # the global B
        enc: EncoderOutput = out["encoder"]
        dec: DecoderOutput = out["decoder"]
        target_cw = batch["span_cw"]
        num_layers = dec.logits.shape[0]
        layers = range(num_layers) if cfg.aux_loss else range(num_layers - 1, num_layers)
        ground = enc.context_logit.new_zeros((), dtype=torch.float32)
        terms: dict[str, Tensor] = {}
        for layer in layers:
            terms = self.grounding_terms(dec.logits[layer], dec.spans_cw[layer], target_cw, num_queries)
            ground = ground + cfg.span_l1_weight * terms["l1"] + cfg.giou_weight * terms["giou"]
            ground = ground + cfg.fg_weight * terms["fg"]

        zero = ground.new_zeros(())
        sampling = zero
        if cfg.sampling_weight:
            scores = enc.sampling_score.float().index_select(0, batch["positive_pair"])  # (B, Lv)
            sampling = sampling_hinge(scores, batch["in_frame"], batch["out_frame"], cfg.sampling_margin, num_queries)
        contrastive = zero
        learned = out.get("learned_context")
        if cfg.contrastive_weight and (learned is None or bool(learned)):
            contrastive = contrastive_loss(
                enc.context_logit.float(),
                batch["pair_text"],
                batch["pair_window"],
                int(batch["positive_pair"].shape[0]),
                int(batch["video_mask"].shape[0]),
                cfg.negatives,
                cfg.contrastive_temperature,
                shard,
            )
        total = ground + cfg.sampling_weight * sampling + cfg.contrastive_weight * contrastive
        return {
            "loss": total,
            "loss_ground": ground.detach(),
            # the last decoder layer's unweighted terms (the layer whose predictions are used)
            "loss_l1": terms["l1"].detach(),
            "loss_giou": terms["giou"].detach(),
            "loss_fg": terms["fg"].detach(),
            "loss_sampling": sampling.detach(),
            "loss_contrastive": contrastive.detach(),
        }
