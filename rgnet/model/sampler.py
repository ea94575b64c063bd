"""The frame sampler (paper Eq. 2 and appendix Eq. 11-13): a hard 0/1 relevance gate per frame.

Glossary (``rgnet`` package docstring): N query-window pairs, Lv frames per window, D hidden.

With two classes {relevant, irrelevant} and logits {log σ(z), log(1 - σ(z))}, the Gumbel-softmax of Eq. 13 equals
σ((z + G1 - G2) / τ), and G1 - G2 of two i.i.d. Gumbels is logistic noise log(u) - log(1 - u).  The hard value
thresholds that soft sample at 0.5 (the argmax of Eq. 12); the backward pass uses the soft sample's gradient
(straight-through).  At inference the gate is deterministic: g = 1[z >= 0].
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rgnet.model.randomness import RowRandom

_UNIFORM_EPS = 1e-6  # keeps log(u) and log(1 - u) finite


def logistic_noise(
    shape: torch.Size, device: torch.device, dtype: torch.dtype = torch.float32, rng: RowRandom | None = None
) -> Tensor:
    """Samples of log(u) - log(1 - u), u ~ U(0, 1) (the difference of two Gumbels); ``rng`` draws each row (first
    dimension) from its keyed stream, else torch's global generator is used."""
    u = torch.rand(shape, device=device) if rng is None else rng.uniform(shape, device)
    u = u.clamp(_UNIFORM_EPS, 1 - _UNIFORM_EPS)  # drawn in fp32 whatever the compute dtype
    return (u.log() - (1 - u).log()).to(dtype)


def straight_through_gate(logit: Tensor, temperature: float, noise: Tensor) -> Tensor:
    """Hard 0/1 forward value with the gradient of soft = σ((logit + noise) / τ)."""
    soft = torch.sigmoid((logit + noise) / temperature)
    hard = (soft >= 0.5).to(soft.dtype)
    return hard + (soft - soft.detach())  # parenthesised: the forward value is exactly hard (x - x == 0)


class GumbelSampler(nn.Module):
    """z = Linear(D, 1)(frame); training: straight-through Gumbel gate; eval: 1[z >= 0]."""

    def __init__(self, hidden_dim: int, temperature: float) -> None:
        super().__init__()
        self.relevance = nn.Linear(hidden_dim, 1)
        self.temperature = temperature

    def forward(
        self, frames: Tensor, noise: Tensor | None = None, rng: RowRandom | None = None
    ) -> tuple[Tensor, Tensor]:
        """(N, Lv, D) -> relevancy logit z (N, Lv), gate g (N, Lv).

        ``noise`` (N, Lv) replaces the drawn logistic noise (tests use it to compare gradients); ``rng`` draws it
        from the N pairs' keyed streams.
        """
        logit = self.relevance(frames).squeeze(-1)  # (N, Lv)
        if not self.training:
            return logit, (logit >= 0).to(logit.dtype)
        if noise is None:
            noise = logistic_noise(logit.shape, logit.device, logit.dtype, rng)
        return logit, straight_through_gate(logit, self.temperature, noise)
