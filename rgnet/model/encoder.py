"""The RG-Encoder (paper Sec. 3.2-3.3, Eq. 1-5) and the plain encoder of the "no unified encoder" ablation.

Glossary: W distinct windows, B queries, N query-window pairs, Lv frames per window, Lq words, D hidden, H heads.

Both encoders first condition every frame on its query with cross-attention (Eq. 1).  The RG-Encoder then gates
the frames with the sampler (Eq. 2) and runs retrieval attention over [retrieval token; frames] under a mask built
from the gate (Eq. 3-4); it returns the encoded proposal P = c + g * r (Eq. 5) and the context vector r.  The plain
encoder runs ordinary self-attention over the frames only and uses a masked mean of the frame states as its
context vector; it has no retrieval token, no sampler and no gate.

Attention everywhere is ``F.scaled_dot_product_attention`` (fused kernels) with boolean masks, True = attend; only
the released-code ("additive") retrieval mask is a float mask.  Every query row keeps at least one key, so no row is
fully masked (a fully masked row would make the softmax NaN).  Attention-probability dropout is
``ModelConfig.attention_dropout`` (0 keeps the fused CPU kernel); other dropouts use :class:`Dropout`, whose mask is
cheaper to draw on CPU, and the FFN fuses ReLU and dropout to store one activation instead of three.
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rgnet.config import ModelConfig
from rgnet.model.randomness import RowRandom
from rgnet.model.sampler import GumbelSampler


# ---------------------------------------------------------------------------------------------------------------
# Building blocks shared by the encoder and the decoder
# ---------------------------------------------------------------------------------------------------------------
def split_heads(x: Tensor, heads: int) -> Tensor:
    """(N, L, H*d) -> (N, H, L, d)."""
    n, length, dim = x.shape
    return x.view(n, length, heads, dim // heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """(N, H, L, d) -> (N, L, H*d)."""
    n, heads, length, dim = x.shape
    return x.transpose(1, 2).reshape(n, length, heads * dim)


def attend(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout: float, rng: RowRandom | None = None
) -> Tensor:
    """Fused attention on split heads; ``mask`` is bool (True = attend) or float (added to the logits).

    The scale is 1/sqrt(head dim of q), which also holds for the decoder's concatenated [content; position] heads.
    Attention-probability dropout with keyed rows (``rng``, one stream per row of q's first dim) cannot use the fused
    kernel's internal generator, so it takes the explicit path: softmax, keyed dropout mask, then the value product.
    """
    if mask is not None and mask.is_floating_point():
        mask = mask.to(q.dtype)  # SDPA wants a float mask in the query's dtype (matters under autocast)
    if dropout == 0.0 or rng is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (N, H, Lq, Lk)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
    weights = Dropout.apply_keyed(torch.softmax(logits, dim=-1), dropout, rng)
    return weights @ v


def _drop_mask(shape: torch.Size, p: float, device: torch.device, rng: RowRandom | None = None) -> tuple[Tensor, float]:
    """A Bernoulli(p) *drop* mask drawn from raw random bits (16 per element), and the rescaling of kept units.

    The bits come from torch's global generator, or, with ``rng``, from each row's keyed stream (rows along the
    first dimension; see rgnet.model.randomness).

    Why: on CPU, ``bernoulli_`` (what ``F.dropout`` uses) is several times slower than drawing raw 64-bit words,
    and dropout masks over the (N, Lv, ffn_dim) FFN activations were the largest cost of a training step.  p is
    rounded to a multiple of 1/65536 and the scale uses that rounded p, so the expectation is kept exactly.  Masks
    are applied with masked_fill / where (a bool operand of mul would first be converted to float: one more pass).
    """
    drop = round(p * 65536)
    if rng is not None:
        return rng.bits16(shape, device) < drop - 32768, 65536 / (65536 - drop)
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)  # full 64-bit range
    mask = words.view(torch.int16)[:n].view(shape) < drop - 32768
    return mask, 65536 / (65536 - drop)


class _Dropout(torch.autograd.Function):
    """Dropout that saves only the bool mask (the memory of ``F.dropout``, a faster mask)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, p: float, rng: RowRandom | None) -> Tensor:
        drop, scale = _drop_mask(x.shape, p, x.device, rng)
        ctx.save_for_backward(drop)
        ctx.scale = scale
        return x.masked_fill(drop, 0.0).mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (drop,) = ctx.saved_tensors
        return grad.masked_fill(drop, 0.0).mul_(ctx.scale), None, None


class _ReluDropout(torch.autograd.Function):
    """In-place ReLU then dropout; saves only its output (which the next Linear saves anyway).

    The gradient mask is recovered as (output > 0): positive exactly where the unit was active and kept.  This
    stores 4 bytes per FFN activation instead of 9 (ReLU output, bool mask, dropout output).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, p: float, rng: RowRandom | None) -> Tensor:
        drop, scale = _drop_mask(x.shape, p, x.device, rng)
        ctx.mark_dirty(x)
        out = x.relu_().masked_fill_(drop, 0.0).mul_(scale)
        ctx.save_for_backward(out)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (out,) = ctx.saved_tensors
        return torch.where(out > 0, grad, 0.0).mul_(ctx.scale), None, None


class Dropout(nn.Module):
    """Drop-in for ``nn.Dropout`` with the faster mask of :func:`_drop_mask`; ``rng`` draws each row's mask from
    its keyed stream."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor, rng: RowRandom | None = None) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        return self.apply_keyed(x, self.p, rng)

    @staticmethod
    def apply_keyed(x: Tensor, p: float, rng: RowRandom | None) -> Tensor:
        return cast(Tensor, _Dropout.apply(x, p, rng))

    def extra_repr(self) -> str:
        return f"p={self.p}"


class FeedForward(nn.Module):
    """Linear(D, F) -> ReLU -> Dropout -> Linear(F, D) (ReLU and dropout fused, see :class:`_ReluDropout`)."""

    def __init__(self, dim: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.p = dropout

    def forward(self, x: Tensor, rng: RowRandom | None = None) -> Tensor:
        # 2-D matmuls: the hidden activation is then a plain tensor, not a view, so the in-place fused
        # ReLU-dropout costs autograd no CopySlices copy; rows of one keyed row of x stay contiguous
        hidden = self.linear1(x.reshape(-1, x.shape[-1]))  # (rows, F)
        if self.training and self.p > 0.0:
            hidden = _ReluDropout.apply(hidden, self.p, rng)
        else:
            hidden = hidden.relu_()  # in place: addmm does not save its output, so autograd allows it
        return self.linear2(hidden).view(*x.shape[:-1], -1)


def xavier_init_(module: nn.Module) -> None:
    """Xavier-uniform on every >1-D parameter (the released transformer's ``_reset_parameters``)."""
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


# ---------------------------------------------------------------------------------------------------------------
# Eq. 1: text-to-video cross-attention
# ---------------------------------------------------------------------------------------------------------------
class AttentionBlock(nn.Module):
    """The parameters every encoder layer has: q/k/v/out projections, two LayerNorms, an FFN, dropouts.

    The key projection has no bias: a key bias adds q . b_k to every logit of a query row, which the softmax cancels,
    so it never changes the output and its gradient is zero up to rounding noise (nn.MultiheadAttention's stacked
    in-projection carries one; an imported checkpoint's is dropped, see rgnet.released).
    """

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float, attention_dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.attention_dropout = attention_dropout
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.drop_attn = Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, ffn_dim, dropout)
        self.drop_ffn = Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)


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


# ---------------------------------------------------------------------------------------------------------------
# Eq. 3-4: retrieval attention (and the plain encoder's self-attention)
# ---------------------------------------------------------------------------------------------------------------
class SelfAttentionLayer(AttentionBlock):
    """Post-norm self-attention layer: positions on queries and keys (not values), then FFN."""

    def forward(
        self,
        x: Tensor,
        pos: Tensor,
        mask: Tensor | None,
        self_only: Tensor | None = None,
        rng: RowRandom | None = None,
    ) -> Tensor:
        """x, pos (N, L, D); mask broadcastable to (N, H, L, L), bool or additive float, or None -> (N, L, D).

        ``self_only`` (N, L) bool marks rows that attend to their own key only: their attention output is their
        own value, exactly what a mask allowing only the diagonal gives, without an (N, L, L) mask (which would
        push SDPA off its fused kernel).  The other rows use ``mask``.  (With attention dropout a self-only row keeps
        its value undropped, where the full mask would drop its single weight with probability p.)
        """
        qk_in = x + pos
        q = split_heads(self.q_proj(qk_in), self.heads)  # (N, H, L, D/H)
        k = split_heads(self.k_proj(qk_in), self.heads)
        value = self.v_proj(x)  # (N, L, D)
        v = split_heads(value, self.heads)
        attn = merge_heads(attend(q, k, v, mask, self.attention_dropout if self.training else 0.0, rng))
        if self_only is not None:
            attn = torch.where(self_only[..., None], value, attn)  # softmax over one key = that key's value
        x = self.norm1(x + self.drop_attn(self.out_proj(attn), rng))
        return self.norm2(x + self.drop_ffn(self.ffn(x, rng), rng))


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


class EncoderState(NamedTuple):
    """What an encoder hands to the model heads, for N pairs."""

    content: Tensor  # (N, Lv, D) encoded proposal P (rg) or frame states (plain)
    context: Tensor  # (N, D) retrieval-token state r (rg) or masked mean of the frame states (plain)
    frame_logit: Tensor  # (N, Lv) sampler relevancy logit z; zeros without a sampler
    gate: Tensor  # (N, Lv) gate g; ones without a sampler


class RGEncoder(nn.Module):
    """Cross-attention -> sampler -> retrieval attention over [token; frames] -> P = c + g * r (Eq. 1-5)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.hidden_dim
        self.mask_mode: MaskMode = cfg.mask_mode
        self.cross = TextConditioning(cfg)
        # the sampler kind "none" builds no sampler at all, so no parameter is left without a gradient
        self.sampler = GumbelSampler(d, cfg.sampler.temperature) if cfg.sampler.kind == "gumbel" else None
        self.layers = nn.ModuleList(
            SelfAttentionLayer(d, cfg.num_heads, cfg.ffn_dim, cfg.dropout, cfg.attention_dropout)
            for _ in range(cfg.retrieval_layers)
        )
        xavier_init_(self)
        # learnable retrieval token and its own learnable position (randn, as released); 1-D, so xavier skips them
        self.token = nn.Parameter(torch.randn(d))
        self.token_pos = nn.Parameter(torch.randn(d))

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
        n, _, d = frames.shape
        frames = self.cross(frames, pos, text, text_mask, text_index, frame_valid, rng)  # (N, Lv, D)
        if self.sampler is not None:
            frame_logit, gate = self.sampler(frames, rng=rng)  # (N, Lv) each
        else:
            frame_logit, gate = frames.new_zeros(frames.shape[:2]), frames.new_ones(frames.shape[:2])
        self_only: Tensor | None = None
        if self.mask_mode == "hard":
            mask, self_only = hard_mask_parts(gate, frame_valid)
        else:
            mask = retrieval_attention_mask(gate, frame_valid, self.mask_mode)
        x = torch.cat([self.token.to(frames.dtype).expand(n, 1, d), frames], dim=1)  # (N, 1+Lv, D)
        x_pos = torch.cat([self.token_pos.to(pos.dtype).expand(n, 1, d), pos], dim=1)  # (N, 1+Lv, D)
        for layer in self.layers:
            x = layer(x, x_pos, mask, self_only, rng)
        context, content = x[:, 0], x[:, 1:]  # r (N, D), c (N, Lv, D)
        proposal = content + gate[..., None].to(content.dtype) * context[:, None, :]  # Eq. 5: P = c + g * r
        return EncoderState(proposal, context, frame_logit, gate)


class PlainEncoder(nn.Module):
    """Ablation "no unified encoder": cross-attention + self-attention over frames; no token, sampler or gate."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cross = TextConditioning(cfg)
        self.layers = nn.ModuleList(
            SelfAttentionLayer(cfg.hidden_dim, cfg.num_heads, cfg.ffn_dim, cfg.dropout, cfg.attention_dropout)
            for _ in range(cfg.retrieval_layers)
        )
        xavier_init_(self)

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
        frames = self.cross(frames, pos, text, text_mask, text_index, frame_valid, rng)  # (N, Lv, D)
        # padding mask only; a window without any valid frame (never produced by the data) attends to all, not NaN
        key_valid = frame_valid | ~frame_valid.any(dim=-1, keepdim=True)
        mask = None if bool(key_valid.all()) else key_valid[:, None, None, :]  # (N, 1, 1, Lv); None: fastest kernel
        for layer in self.layers:
            frames = layer(frames, pos, mask, None, rng)
        weight = frame_valid.to(frames.dtype)[..., None]  # (N, Lv, 1)
        pooled = (frames * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1.0)  # (N, D)
        ones = frames.new_ones(frames.shape[:2])
        return EncoderState(frames, pooled, torch.zeros_like(ones), ones)
