"""The grounding decoder (paper Sec. 3.4): DAB-DETR-style anchor decoder over the encoded proposal.

Glossary (``rgnet`` package docstring): M decoded pairs, Q moment queries (anchors), Lv frames per window, D hidden, H
heads, L decoder layers.

Follows DAB-DETR (Liu et al., "DAB-DETR: Dynamic Anchor Boxes are Better Queries for DETR", ICLR 2022) in 1-D, as
RGNet configures it (reference notes section 3): Q learnable anchors (center, width); per layer the anchor's sine
embedding e conditions the queries (position query = MLP(e); conditional element-wise scaling of e by MLP(h) from
the second layer on; width modulation of e by sigmoid(MLP(h)) / w); self-attention with content + position queries
and keys; cross-attention whose per-head query and key are the concatenation [content; position], so head dim is
2D/H for q/k and D/H for v; FFN.  After each layer but the last, a per-layer MLP predicts an offset in
inverse-sigmoid space that refines the anchor; the next layer sees the refined anchor *detached*, while the output
heads see it with its gradient (which is how the refinement MLPs learn).  The last layer has no refinement MLP:
its refined anchor would feed nothing (the released code builds one and leaves it without a gradient).

Deviation (numerical safety): the width used by the width modulation is clamped at 1e-3 (the inverse-sigmoid eps),
so a collapsed anchor cannot divide by ~0.  model.compat=released divides by the unclamped width, as released.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rgnet.config import ModelConfig
from rgnet.model.embeddings import anchor_embedding
from rgnet.model.layers import MLP, Dropout, FeedForward, attend, merge_heads, split_heads, xavier_init_
from rgnet.model.randomness import RowRandom

INVERSE_SIGMOID_EPS = 1e-3


def inverse_sigmoid(x: Tensor, eps: float = INVERSE_SIGMOID_EPS) -> Tensor:
    """log(x / (1 - x)) with both terms clamped at eps (DETR-family convention)."""
    x = x.clamp(0.0, 1.0)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class AnchorDecoderLayer(nn.Module):
    """One DAB decoder layer: conditional self-attention, [content; position] cross-attention, FFN (post-norm).

    First layer (``first=True``): its content queries are exactly zero, so every value of its self-attention is the
    same vector (the value bias) and attention returns that vector whatever the weights; the layer keeps only that
    learnable value and the output projection.  Same function as DAB-DETR without attention-probability dropout
    (with it, DAB would merely rescale that vector by noise), and no parameter is left without a gradient.
    Key projections have no bias (it cancels in the softmax; see ``rgnet.model.encoder.AttentionBlock``).
    """

    def __init__(
        self, dim: int, heads: int, ffn_dim: int, dropout: float, attention_dropout: float, first: bool = False
    ) -> None:
        super().__init__()
        self.heads = heads
        self.attention_dropout = attention_dropout
        self.first = first
        # self-attention: separate content and position projections for q and k
        if first:
            bound = dim**-0.5  # nn.Linear's default bias init
            self.sa_value = nn.Parameter(torch.empty(dim).uniform_(-bound, bound))  # the zero content's value
        else:
            self.sa_q_content = nn.Linear(dim, dim)
            self.sa_q_pos = nn.Linear(dim, dim)
            self.sa_k_content = nn.Linear(dim, dim, bias=False)
            self.sa_k_pos = nn.Linear(dim, dim, bias=False)
            self.sa_v = nn.Linear(dim, dim)
        self.sa_out = nn.Linear(dim, dim)
        self.drop1 = Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim)
        # cross-attention to the encoded proposal
        self.ca_q_content = nn.Linear(dim, dim)
        self.ca_q_pos = nn.Linear(dim, dim)
        self.ca_q_sine = nn.Linear(dim, dim)
        self.ca_k_content = nn.Linear(dim, dim, bias=False)
        self.ca_k_pos = nn.Linear(dim, dim, bias=False)
        self.ca_v = nn.Linear(dim, dim)
        self.ca_out = nn.Linear(dim, dim)
        self.drop2 = Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, ffn_dim, dropout)
        self.drop3 = Dropout(dropout)
        self.norm3 = nn.LayerNorm(dim)

    def forward(
        self,
        tgt: Tensor,
        query_pos: Tensor,
        query_sine: Tensor,
        memory: Tensor,
        memory_pos: Tensor,
        key_mask: Tensor,
        rng: RowRandom | None = None,
    ) -> Tensor:
        """tgt, query_pos, query_sine (M, Q, D); memory, memory_pos (M, Lv, D); key_mask (M, 1, 1, Lv) bool;
        ``rng`` the M pairs' keyed streams (dropout), or None for the global generator."""
        h = self.heads
        p = self.attention_dropout if self.training else 0.0
        if self.first:
            attn = self.sa_value.to(tgt.dtype).expand_as(tgt)  # (M, Q, D)
        else:
            q = split_heads(self.sa_q_content(tgt) + self.sa_q_pos(query_pos), h)  # (M, H, Q, D/H)
            k = split_heads(self.sa_k_content(tgt) + self.sa_k_pos(query_pos), h)
            v = split_heads(self.sa_v(tgt), h)
            attn = merge_heads(attend(q, k, v, None, p, rng))
        tgt = self.norm1(tgt + self.drop1(self.sa_out(attn), rng))

        key_pos = self.ca_k_pos(memory_pos)  # (M, Lv, D)
        q_content = split_heads(self.ca_q_content(tgt) + self.ca_q_pos(query_pos), h)  # (M, H, Q, D/H)
        q = torch.cat([q_content, split_heads(self.ca_q_sine(query_sine), h)], dim=-1)  # (M, H, Q, 2D/H)
        k = torch.cat([split_heads(self.ca_k_content(memory) + key_pos, h), split_heads(key_pos, h)], dim=-1)
        v = split_heads(self.ca_v(memory), h)  # (M, H, Lv, D/H)
        tgt = self.norm2(tgt + self.drop2(self.ca_out(merge_heads(attend(q, k, v, key_mask, p, rng))), rng))
        return self.norm3(tgt + self.drop3(self.ffn(tgt, rng), rng))


class AnchorDecoder(nn.Module):
    """L layers of anchor refinement; returns normalised states and the anchor that entered each layer."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, layers = cfg.hidden_dim, cfg.decoder_layers
        self.hidden_dim = d
        self.clamp_width = cfg.compat != "released"  # the released decoder divides by the raw anchor width
        self.layers = nn.ModuleList(
            AnchorDecoderLayer(d, cfg.num_heads, cfg.ffn_dim, cfg.dropout, cfg.attention_dropout, first=i == 0)
            for i in range(layers)
        )
        self.ref_point_head = MLP(d, d, d, 2)  # anchor sine embedding -> position query
        self.query_scale = MLP(d, d, d, 2) if layers > 1 else None  # conditional scaling, layers 2..L
        self.ref_width_head = MLP(d, d, 1, 2)  # width modulation
        self.refine = nn.ModuleList(MLP(d, d, 2, 3) for _ in range(layers - 1))  # anchor offsets after layers 1..L-1
        self.norm = nn.LayerNorm(d)  # shared output norm before the prediction heads
        xavier_init_(self)
        self.anchors = nn.Embedding(cfg.num_queries, 2)  # (c, w) before the sigmoid; default N(0, 1) init

    def forward(
        self, memory: Tensor, memory_pos: Tensor, memory_valid: Tensor, rng: RowRandom | None = None
    ) -> tuple[Tensor, Tensor]:
        """memory, memory_pos (M, Lv, D); memory_valid (M, Lv) bool (padding only; the gate is not used); ``rng``
        the M pairs' keyed streams (dropout) or None.

        Returns states (L, M, Q, D) after the shared norm, and the anchors (L, M, Q, 2) in [0, 1] that entered each
        layer (layer 1: sigmoid of the learned anchors; later: the refined anchor, not detached).
        """
        m = memory.shape[0]
        memory_valid = memory_valid | ~memory_valid.any(dim=-1, keepdim=True)  # no fully masked row
        key_mask = memory_valid[:, None, None, :]  # (M, 1, 1, Lv)
        ref = torch.sigmoid(self.anchors.weight)[None].expand(m, -1, -1)  # (M, Q, 2)
        tgt = memory.new_zeros(m, ref.shape[1], self.hidden_dim)  # content queries start at 0
        states, refs = [], []
        ref_out = ref  # the anchor that entered the current layer, with its gradient
        for i, layer in enumerate(self.layers):
            sine = anchor_embedding(ref, self.hidden_dim).to(memory.dtype)  # (M, Q, D)
            query_pos = self.ref_point_head(sine)
            if self.query_scale is not None and i > 0:
                sine = sine * self.query_scale(tgt)
            width = ref[..., 1:].clamp(min=INVERSE_SIGMOID_EPS) if self.clamp_width else ref[..., 1:]  # (M, Q, 1)
            sine = sine * (torch.sigmoid(self.ref_width_head(tgt)) / width)
            tgt = layer(tgt, query_pos, sine, memory, memory_pos, key_mask, rng)
            states.append(self.norm(tgt))
            refs.append(ref_out)
            if i < len(self.refine):
                ref_out = torch.sigmoid(self.refine[i](tgt) + inverse_sigmoid(ref))
                ref = ref_out.detach()
        return torch.stack(states), torch.stack(refs)
