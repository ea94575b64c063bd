"""The RG-Encoder (paper Sec. 3.2-3.3: Eq. 1-5 composed) and the plain encoder of the "no unified encoder" ablation.

Glossary (``rgnet`` package docstring): N query-window pairs, B queries, Lv frames per window, Lq words, D hidden.

Both encoders first condition every frame on its query with cross-attention (Eq. 1, ``cross_attention``).  The
RG-Encoder then gates the frames with the sampler (Eq. 2, ``sampler``) and runs retrieval attention over [retrieval
token; frames] under a mask built from the gate (Eq. 3-4, ``retrieval``); it returns the encoded proposal
P = c + g * r (Eq. 5) and the context vector r.  The plain encoder runs ordinary self-attention over the frames only
and uses a masked mean of the frame states as its context vector; it has no retrieval token, no sampler and no gate.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from rgnet.config import ModelConfig
from rgnet.model.cross_attention import TextConditioning
from rgnet.model.layers import SelfAttentionLayer, xavier_init_
from rgnet.model.randomness import RowRandom
from rgnet.model.retrieval import MaskMode, encoded_proposal, retrieval_attention
from rgnet.model.sampler import GumbelSampler


class EncoderState(NamedTuple):
    """What an encoder hands to the model heads, for N pairs."""

    content: Tensor  # (N, Lv, D) encoded proposal P (rg) or frame states (plain)
    context: Tensor  # (N, D) retrieval-token state r (rg) or masked mean of the frame states (plain)
    frame_logit: Tensor  # (N, Lv) sampler relevancy logit z; zeros without a sampler
    gate: Tensor  # (N, Lv) gate g; ones without a sampler


def _self_attention_stack(cfg: ModelConfig) -> nn.ModuleList:
    """The ``retrieval_layers`` self-attention layers both encoders run after the cross-attention."""
    return nn.ModuleList(
        SelfAttentionLayer(cfg.hidden_dim, cfg.num_heads, cfg.ffn_dim, cfg.dropout, cfg.attention_dropout)
        for _ in range(cfg.retrieval_layers)
    )


class TextConditionedEncoder(nn.Module):
    """What both encoders share: condition every frame on its query (Eq. 1), then encode the conditioned frames
    (:meth:`encode_frames`, the part in which the encoders differ)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cross = TextConditioning(cfg)

    def forward(
        self,
        frames: Tensor,
        pos: Tensor,
        frame_valid: Tensor,
        text: Tensor,
        text_mask: Tensor,
        text_index: Tensor,
        rng: RowRandom | None = None,
    ) -> EncoderState:
        """frames, pos (N, Lv, D); frame_valid (N, Lv); text (B, Lq, D); text_mask (B, Lq); text_index (N,);
        ``rng`` the N pairs' keyed streams (dropout, Gumbel noise), or None for the global generator."""
        frames = self.cross(frames, pos, text, text_mask, text_index, frame_valid, rng)  # Eq. 1: (N, Lv, D)
        return self.encode_frames(frames, pos, frame_valid, rng)

    def encode_frames(self, frames: Tensor, pos: Tensor, frame_valid: Tensor, rng: RowRandom | None) -> EncoderState:
        """The query-conditioned frames (N, Lv, D), their positions (N, Lv, D) and frame_valid (N, Lv) -> state."""
        raise NotImplementedError


class RGEncoder(TextConditionedEncoder):
    """Cross-attention -> sampler -> retrieval attention over [token; frames] -> P = c + g * r (Eq. 1-5)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        d = cfg.hidden_dim
        self.mask_mode: MaskMode = cfg.mask_mode
        # the sampler kind "none" builds no sampler at all, so no parameter is left without a gradient
        self.sampler = GumbelSampler(d, cfg.sampler.temperature) if cfg.sampler.kind == "gumbel" else None
        self.layers = _self_attention_stack(cfg)
        xavier_init_(self)
        # learnable retrieval token and its own learnable position (randn, as released); 1-D, so xavier skips them
        self.token = nn.Parameter(torch.randn(d))
        self.token_pos = nn.Parameter(torch.randn(d))

    def encode_frames(self, frames: Tensor, pos: Tensor, frame_valid: Tensor, rng: RowRandom | None) -> EncoderState:
        if self.sampler is not None:
            frame_logit, gate = self.sampler(frames, rng=rng)  # Eq. 2: (N, Lv) each
        else:
            frame_logit, gate = frames.new_zeros(frames.shape[:2]), frames.new_ones(frames.shape[:2])
        context, content = retrieval_attention(  # Eq. 3-4
            frames, pos, self.token, self.token_pos, self.layers, gate, frame_valid, self.mask_mode, rng
        )
        return EncoderState(encoded_proposal(content, context, gate), context, frame_logit, gate)  # Eq. 5


class PlainEncoder(TextConditionedEncoder):
    """Ablation "no unified encoder": cross-attention + self-attention over frames; no token, sampler or gate."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.layers = _self_attention_stack(cfg)
        xavier_init_(self)

    def encode_frames(self, frames: Tensor, pos: Tensor, frame_valid: Tensor, rng: RowRandom | None) -> EncoderState:
        # padding mask only; a window without any valid frame (never produced by the data) attends to all, not NaN
        key_valid = frame_valid | ~frame_valid.any(dim=-1, keepdim=True)
        mask = None if bool(key_valid.all()) else key_valid[:, None, None, :]  # (N, 1, 1, Lv); None: fastest kernel
        for layer in self.layers:
            frames = layer(frames, pos, mask, None, rng)
        weight = frame_valid.to(frames.dtype)[..., None]  # (N, Lv, 1)
        pooled = (frames * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1.0)  # (N, D)
        ones = frames.new_ones(frames.shape[:2])
        return EncoderState(frames, pooled, torch.zeros_like(ones), ones)
