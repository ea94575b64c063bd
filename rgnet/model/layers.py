"""The transformer pieces every stage of RGNet is built from (no equation of the paper of its own).

Glossary (``rgnet`` package docstring); here N rows (pairs or windows), L a sequence length, D hidden, H heads, F the
FFN width.

Attention everywhere is ``F.scaled_dot_product_attention`` (fused kernels) with boolean masks, True = attend; only
the released-code ("additive") retrieval mask is a float mask.  Every query row keeps at least one key, so no row is
fully masked (a fully masked row would make the softmax NaN).  Attention-probability dropout is
``ModelConfig.attention_dropout`` (0 keeps the fused CPU kernel); other dropouts use :class:`Dropout`, whose mask is
cheaper to draw on CPU, and the FFN fuses ReLU and dropout to store one activation instead of three.  Every
dropout can draw its mask from keyed per-row streams (``rgnet.model.randomness``) instead of the global generator.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rgnet.model.randomness import RowRandom


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


class MLP(nn.Sequential):
    """``num_layers`` Linear layers with ReLU in between (none after the last)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < num_layers - 1:
                layers.append(nn.ReLU())
        super().__init__(*layers)


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
