"""Input projections and sine embeddings (DESIGN section 3.1, reference notes section 1.1-1.2).

Glossary (``rgnet`` package docstring): P distinct windows, B queries, N query-window pairs, Lv frames per window, Lq
words, D hidden.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from rgnet.model.layers import Dropout
from rgnet.model.randomness import RowRandom


class InputProjection(nn.Sequential):
    """Features -> D: [LayerNorm -> Dropout -> Linear -> ReLU] then [LayerNorm -> Dropout -> Linear].

    Two such stacks exist, one per modality (Moment-DETR's input projection, as RGNet uses it).  The high input
    dropout (0.5 in the released recipe) regularises the frozen CLIP / EgoVLP features.
    """

    def __init__(self, in_dim: int, hidden_dim: int, dropout: float) -> None:
        super().__init__(
            nn.LayerNorm(in_dim),
            Dropout(dropout),
            nn.Linear(in_dim, hidden_dim),
            nn.ReLU(),
            nn.LayerNorm(hidden_dim),
            Dropout(dropout),
            nn.Linear(hidden_dim, hidden_dim),
        )

    def forward(self, x: Tensor, rng: RowRandom | None = None) -> Tensor:
        """(R, L, in_dim) -> (R, L, D); ``rng`` the R rows' keyed streams for the dropouts (None: global)."""
        for module in self:
            x = module(x, rng) if isinstance(module, Dropout) else module(x)
        return x


RELEASED_TOKEN_EPS = 1e-5


def released_token_norm(text: Tensor) -> Tensor:
    """The released code's token normalisation, x / (||x|| + 1e-5) per token (model.compat=released).

    (B, Lq, Dt) raw token features -> same shape; zero (padding) tokens stay zero.  It differs from
    x / max(||x||, eps) (the data pipeline's data.normalize_text) by a factor ||x|| / (||x|| + 1e-5), so it needs the
    raw norm: released models read raw tokens (data.normalize_text=false) and normalise them here.
    """
    return text / (torch.linalg.vector_norm(text, dim=-1, keepdim=True) + RELEASED_TOKEN_EPS)


def sine_embedding(x: Tensor, dim: int, temperature: float) -> Tensor:
    """Transformer sine embedding of scalars: (...) -> (..., dim).

    Channel i uses the frequency temperature^(2*floor(i/2)/dim); even channels take the sine and odd channels the
    cosine, interleaved (DETR's layout).  An odd ``dim`` simply ends on a sine channel, so no size is assumed.
    """
    i = torch.arange(dim, device=x.device, dtype=torch.float32)
    freq = temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / dim)  # (dim,)
    angle = x.float()[..., None] / freq  # (..., dim)
    even = (torch.arange(dim, device=x.device) % 2) == 0
    return torch.where(even, angle.sin(), angle.cos())  # float32 whatever the input dtype


def video_positions(video_mask: Tensor, dim: int, temperature: float) -> Tensor:
    """1-D sine positions over each window's *valid* length: (P, Lv) bool -> (P, Lv, dim).

    Position j is 2π * (number of valid frames up to j) / (valid length), so a short (padded) last window spans the
    same 0..2π range as a full one; padded frames all sit at 2π (as the released code does).
    """
    count = video_mask.float().cumsum(dim=1)  # (P, Lv)
    pos = count / (count[:, -1:] + 1e-6) * (2 * math.pi)  # (P, Lv)
    return sine_embedding(pos, dim, temperature)


def anchor_embedding(ref_cw: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """DAB-DETR anchor embedding: (..., 2) (center, width) in [0, 1] -> (..., dim) = [sine(c); sine(w)].

    Each coordinate gets dim // 2 channels (the center takes the extra one if dim is odd), scaled by 2π as in
    DAB-DETR (Liu et al., ICLR 2022); derived from D, not a fixed 128.
    """
    dim_c = dim - dim // 2
    center = sine_embedding(ref_cw[..., 0] * (2 * math.pi), dim_c, temperature)
    width = sine_embedding(ref_cw[..., 1] * (2 * math.pi), dim // 2, temperature)
    return torch.cat([center, width], dim=-1)
