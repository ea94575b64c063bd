"""Proposal retrieval (paper Sec. 3.3, Eq. 3-5): the attention mask from the sampler's gate, retrieval attention
over [retrieval token; frames], the encoded proposal, the context score that ranks windows, and the disjoint
baseline's frozen ranker.

Glossary (``rgnet`` package docstring): N query-window pairs, P windows, B queries, Lv frames per window, L = 1 + Lv,
D hidden, H heads.

- Eq. 3 (:func:`retrieval_attention_mask`, :func:`hard_mask_parts`): a frame the sampler calls irrelevant (g = 0)
  may attend only to itself; the retrieval token's row is never restricted.  ``model.mask_mode``: ``hard`` (the
  paper), ``additive`` (what the released code computes: +1 on the other keys' logits), ``none`` (ablation).
- Eq. 4 (:func:`retrieval_attention`): self-attention layers over [t_ret; frames] with the token's own learnable
  position; the token's final state is the context r, the frames' are the content c.
- Eq. 5 (:func:`encoded_proposal`): P_j = c_j + g_j * r.
- Context score (Sec. 3.3, :class:`ContextScore`): s_ctx = w . r (+ a fixed offset), one logit per pair; windows are
  ranked by sigmoid(s_ctx) at inference and trained by the InfoNCE of Eq. 8 (``rgnet.model.criterion``).
- The frozen ranker (:func:`frozen_context_logit`): the disjoint (CONE-like) baseline's window score from frozen
  features, used with ``model.retrieval=none``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rgnet.model.randomness import RowRandom

MaskMode = Literal["hard", "additive", "none"]


def hard_mask_parts(gate: Tensor, frame_valid: Tensor) -> tuple[Tensor | None, Tensor]:
    """The ``hard`` mask of :func:`retrieval_attention_mask`, factored for the fused attention kernels.

    An irrelevant frame's row may read only itself and every other row reads every valid key, so the (N, L, L)
    mask is a key-padding mask (N, 1, 1, L) (None when nothing is padded) plus the set of self-only rows (N, L)
    (see ``SelfAttentionLayer.forward``).  Same result as the full mask on every row that matters, with O(L) instead
    of O(L^2) mask memory; only a *padded* relevant frame's row differs (the full mask lets it read its own padded
    key), and a padded row feeds nothing (it is a masked key everywhere downstream).
    """
    n = gate.shape[0]
    key_valid = torch.cat([frame_valid.new_ones(n, 1), frame_valid], dim=1)  # (N, L)
    self_only = torch.cat([frame_valid.new_zeros(n, 1), gate.detach() < 0.5], dim=1)  # (N, L) irrelevant rows
    key_mask = None if bool(key_valid.all()) else key_valid[:, None, None, :]
    return key_mask, self_only


def retrieval_attention_mask(gate: Tensor, frame_valid: Tensor, mode: MaskMode) -> Tensor:
    """Eq. 3 over the sequence [retrieval token; frames] of length L = 1 + Lv.

    gate (N, Lv) in {0, 1} (detached here: the mask carries no gradient, as released); frame_valid (N, Lv) bool.
    Returns a mask for SDPA, broadcastable to (N, H, L, L):
    - ``hard`` (the paper): bool; an irrelevant frame's row attends only to itself; (N, 1, L, L).
    - ``additive`` (the released code): float; +1 on every non-self key of an irrelevant frame's row (a float 0/1
      mask is *added* to the logits), -inf on padded keys; (N, 1, L, L).
    - ``none`` (ablation): bool padding mask only; (N, 1, 1, L).
    The token row is never restricted and padded keys are always masked.  Every row keeps at least one key: its
    own (hard) or the always-valid token (additive, none).
    """
    n = gate.shape[0]
    key_valid = torch.cat([frame_valid.new_ones(n, 1), frame_valid], dim=1)  # (N, L)
    if mode == "none":
        return key_valid[:, None, None, :]
    restricted = torch.cat([frame_valid.new_zeros(n, 1), gate.detach() < 0.5], dim=1)  # (N, L) irrelevant rows
    length = key_valid.shape[1]
    eye = torch.eye(length, dtype=torch.bool, device=gate.device)  # (L, L)
    if mode == "hard":
        allowed = key_valid[:, None, :] & ~restricted[:, :, None]  # (N, L, L)
        return (allowed | eye)[:, None]
    if mode == "additive":
        bias = (restricted[:, :, None] & ~eye).float()  # (N, L, L): +1 on non-self keys of irrelevant rows
        bias = bias.masked_fill(~key_valid[:, None, :], float("-inf"))
        return bias[:, None]
    raise ValueError(f"model.mask_mode={mode!r} is not one of hard, additive, none")


def retrieval_attention(
    frames: Tensor,
    pos: Tensor,
    token: Tensor,
    token_pos: Tensor,
    layers: Iterable[nn.Module],
    gate: Tensor,
    frame_valid: Tensor,
    mode: MaskMode,
    rng: RowRandom | None = None,
) -> tuple[Tensor, Tensor]:
    """Eq. 4: frames, pos (N, Lv, D); the retrieval token and its position (D,); gate (N, Lv); frame_valid (N, Lv)
    -> context r (N, D), content c (N, Lv, D).  The mask of Eq. 3 is built from the gate (``mode``)."""
    n, _, d = frames.shape
    self_only: Tensor | None = None
    if mode == "hard":
        mask, self_only = hard_mask_parts(gate, frame_valid)
    else:
        mask = retrieval_attention_mask(gate, frame_valid, mode)
    x = torch.cat([token.to(frames.dtype).expand(n, 1, d), frames], dim=1)  # (N, 1+Lv, D)
    x_pos = torch.cat([token_pos.to(pos.dtype).expand(n, 1, d), pos], dim=1)  # (N, 1+Lv, D)
    for layer in layers:
        x = layer(x, x_pos, mask, self_only, rng)
    return x[:, 0], x[:, 1:]  # r (N, D), c (N, Lv, D)


def encoded_proposal(content: Tensor, context: Tensor, gate: Tensor) -> Tensor:
    """Eq. 5: P = c + g * r; content (N, Lv, D), context (N, D), gate (N, Lv) -> (N, Lv, D)."""
    return content + gate[..., None].to(content.dtype) * context[:, None, :]


class ContextScore(nn.Linear):
    """Sec. 3.3: s_ctx = w . r + b0, one logit per pair: (N, D) -> (N,).

    No trainable bias: InfoNCE (Eq. 8) is invariant to a shift of all logits of a row (and of a column), so a bias
    would get a zero gradient (rounding noise only).  The fixed ``offset`` b0 (0; an imported released checkpoint's
    trained value) still enters sigmoid(s_ctx), the factor of the moment score at inference.
    """

    def __init__(self, dim: int) -> None:
        super().__init__(dim, 1, bias=False)
        self.offset: Tensor
        self.register_buffer("offset", torch.zeros(1))

    def forward(self, context: Tensor) -> Tensor:
        return F.linear(context, self.weight).squeeze(-1) + self.offset


def frozen_context_logit(
    video: Tensor, video_mask: Tensor, sentence: Tensor, window_index: Tensor, text_index: Tensor
) -> Tensor:
    """The disjoint baseline's retriever: max over valid frames of cosine(raw frame, sentence feature).

    video (P, Lv, Dv), video_mask (P, Lv), sentence (B, Dv) -> (N,).  No parameters (CONE-style frozen ranking).
    """
    if sentence.shape[-1] != video.shape[-1]:
        raise ValueError(
            f"frozen ranking (model.retrieval=none) compares sentence features of width {sentence.shape[-1]} with "
            f"video features of width {video.shape[-1]}; the sentence features must live in the video tower's "
            "space (data.sentence_features), or use model.retrieval=context"
        )
    sim = torch.einsum("wld,bd->wbl", F.normalize(video.float(), dim=-1), F.normalize(sentence.float(), dim=-1))
    sim = sim.masked_fill(~video_mask[:, None, :], float("-inf"))  # (P, B, Lv)
    best = sim.amax(dim=-1)  # (P, B)
    return best[window_index, text_index]
