"""Eq. 1: text-to-video cross-attention, the first stage of both encoders.

Glossary (``rgnet`` package docstring): N query-window pairs, B queries, Lv frames per window, Lq words, D hidden,
H heads.

Every frame (a query of the attention, with its sine position) reads the words of its query (keys and values,
without positions): the frames become conditioned on the sentence.  Two layers, QD-DETR's residual order as released.
``model.compat=released`` also reproduces the released padding-pair mask and its head-ordering bug
(:func:`released_cross_attention_mask`).
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from rgnet.config import ModelConfig
from rgnet.model.layers import AttentionBlock, attend, merge_heads, split_heads
from rgnet.model.randomness import RowRandom


class CrossAttentionLayer(AttentionBlock):
    """Frames (queries, positions added to q only) attend to words (keys and values, no positions).

    Residual/normalisation order is QD-DETR's hybrid, as released: u = x + Drop(attn);
    x' = LN2(u + Drop(FFN(LN1(u)))) (the FFN reads LN1(u) but the residual adds the un-normalised u).
    """

    def project_text(self, text: Tensor) -> tuple[Tensor, Tensor]:
        """(B, Lq, D) -> keys, values (B, H, Lq, D/H); done once per distinct query, gathered per pair."""
        return split_heads(self.k_proj(text), self.heads), split_heads(self.v_proj(text), self.heads)

    def forward(
        self, frames: Tensor, pos: Tensor, keys: Tensor, values: Tensor, key_mask: Tensor, rng: RowRandom | None = None
    ) -> Tensor:
        """frames, pos (N, Lv, D); keys, values (N, H, Lq, D/H); key_mask (N, 1, 1, Lq) bool
        (model.compat=released: (N, H, Lv, Lq)) -> (N, Lv, D).

        ``rng``: the N pairs' keyed streams (dropout); None draws from the global generator."""
        q = split_heads(self.q_proj(frames + pos), self.heads)  # (N, H, Lv, D/H)
        attn = merge_heads(attend(q, keys, values, key_mask, self.attention_dropout if self.training else 0.0, rng))
        u = frames + self.drop_attn(self.out_proj(attn), rng)
        return self.norm2(u + self.drop_ffn(self.ffn(self.norm1(u), rng), rng))


def released_cross_attention_mask(frame_valid: Tensor, word_valid: Tensor, heads: int) -> Tensor | None:
    """The released code's text-to-video attention mask (model.compat=released), or None where it equals the clean one.

    frame_valid (N, Lv), word_valid (N, Lq) bool per pair -> allowed (N, H, Lv, Lq) bool, True = attend.  The released
    code (QD-DETR's T2V layer, reference notes section 9 item 7) marks the pairs (frame i, word j) where both are
    padding, per sample, tiles that (N, Lv, Lq) mask with ``repeat(H, 1, 1)`` (head-major: entry k is sample k mod N)
    and hands it to attention, which reads a 3-D mask batch-major (entry b * H + h is head h of sample b).  So head h
    of sample b is also blocked where sample (b * H + h) mod N has a padded frame i and a padded word j, on top of its
    own word padding.  Word 0 is never padding, so no row is fully masked.  When no pair has both a padded frame and a
    padded word, the extra mask is empty and the clean key-padding mask is exactly the released one: None.
    """
    pad_pair = ~frame_valid[:, :, None] & ~word_valid[:, None, :]  # (N, Lv, Lq)
    if not bool(pad_pair.any()):
        return None
    n = pad_pair.shape[0]
    index = torch.arange(n, device=pad_pair.device)[:, None] * heads + torch.arange(heads, device=pad_pair.device)
    source = index % n  # (N, H): the sample whose padding-pair mask head h of sample b receives
    return word_valid[:, None, None, :] & ~pad_pair[source]  # (N, H, Lv, Lq)


class TextConditioning(nn.Module):
    """The stack of cross-attention layers (Eq. 1), shared by both encoders.

    Word keys/values never change across layers (only frames are updated), so each layer projects each distinct
    query once and gathers the projections per pair: B texts serve the B^2 in-batch pairs.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            CrossAttentionLayer(cfg.hidden_dim, cfg.num_heads, cfg.ffn_dim, cfg.dropout, cfg.attention_dropout)
            for _ in range(cfg.cross_layers)
        )
        self.heads = cfg.num_heads
        self.released = cfg.compat == "released"  # the released head-major padding-pair mask

    def forward(
        self,
        frames: Tensor,
        pos: Tensor,
        text: Tensor,
        text_mask: Tensor,
        text_index: Tensor,
        frame_valid: Tensor | None = None,
        rng: RowRandom | None = None,
    ) -> Tensor:
        """frames, pos (N, Lv, D); text (B, Lq, D); text_mask (B, Lq) bool; text_index (N,) -> (N, Lv, D).

        ``frame_valid`` (N, Lv) bool is read only by the released mask (model.compat=released); ``rng``: the N pairs'
        keyed streams (dropout).
        """
        # a query without any valid word (never produced by the data pipeline) attends to all its padding, not NaN
        text_mask = text_mask | ~text_mask.any(dim=-1, keepdim=True)
        key_mask = text_mask.index_select(0, text_index)[:, None, None, :]  # (N, 1, 1, Lq)
        if self.released:
            if frame_valid is None:
                raise ValueError("model.compat=released builds its cross-attention mask from frame_valid; pass it")
            released = released_cross_attention_mask(frame_valid, key_mask[:, 0, 0], self.heads)
            key_mask = key_mask if released is None else released
        for layer in cast(list[CrossAttentionLayer], self.layers):
            keys, values = layer.project_text(text)  # (B, H, Lq, D/H)
            keys, values = keys.index_select(0, text_index), values.index_select(0, text_index)
            frames = layer(frames, pos, keys, values, key_mask, rng)
        return frames
