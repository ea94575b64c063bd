"""Keyed random streams: the model's random draws (dropout masks, Gumbel noise) as a function of *which* row is drawn.

Glossary (``rgnet`` package docstring): R rows of one kind (P windows, B queries or N query-window pairs of a batch).

Why: one global step must compute the same thing in one process and on N workers (DESIGN section 6).  With one
global generator a row's dropout mask and Gumbel noise depend on how the batch was split over workers and on the
order in which rows are processed.  Here every row carries a 64-bit key that the data pipeline derives from
(seed, epoch, step, the row's global slot in the step's batch); the row gets its own generator seeded by that key,
and every module draws that row's bits from it in a fixed order (the order of the forward pass), so a row gets the
same mask and noise wherever, and next to whatever, it is computed.  Windows and queries carry their own keys
(input projections); a query-window pair's key mixes the two (:func:`pair_keys`), so it needs no knowledge of how
pairs were laid out.  Without keys (inference, or a caller that does not care) modules draw from torch's global
generator as usual.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The SplitMix64 finaliser (Steele, Lea and Flood, "Fast splittable pseudorandom number generators", 2014) on
    uint64 arrays: a bijection that spreads every input bit over the output (numpy uint64 arithmetic wraps)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(_GOLDEN)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def mix_keys(*parts: int | np.ndarray) -> np.ndarray:
    """One 64-bit key (int64) from integer parts, broadcast over arrays: each part is folded into the running hash."""
    arrays = [np.asarray(p, dtype=np.int64).view(np.uint64) for p in parts]
    h = np.zeros(np.broadcast(*arrays).shape, dtype=np.uint64)
    for a in arrays:
        h = _splitmix64(h ^ a)
    return h.view(np.int64)


def pair_keys(window_key: Tensor, text_key: Tensor, pair_window: Tensor, pair_text: Tensor) -> Tensor:
    """Key of each pair (N,) from its window's and query's keys: pair n = (window pair_window[n], query
    pair_text[n])."""
    w = window_key.detach().cpu().numpy()[pair_window.cpu().numpy()]
    t = text_key.detach().cpu().numpy()[pair_text.cpu().numpy()]
    return torch.from_numpy(mix_keys(w, t, 3))


class RowRandom:
    """One generator per row; draws are laid out row-major, each row from its own stream.

    ``select`` returns a view onto some rows that *shares* their generators, so a later draw continues the rows'
    streams (the decoder continues the positive pairs' streams after the encoder).
    """

    def __init__(self, generators: Sequence[torch.Generator]) -> None:
        self.generators = list(generators)

    @classmethod
    def from_keys(cls, keys: Tensor, device: torch.device) -> RowRandom:
        gens = []
        for key in keys.tolist():
            g = torch.Generator(device=device)
            g.manual_seed(int(key) & _M64)
            gens.append(g)
        return cls(gens)

    def __len__(self) -> int:
        return len(self.generators)

    def select(self, index: Tensor) -> RowRandom:
        return RowRandom([self.generators[i] for i in index.tolist()])

    def _per_row(self, shape: torch.Size) -> int:
        rows = len(self.generators)
        if rows == 0 or shape[0] % rows:
            raise ValueError(f"a draw of shape {tuple(shape)} does not split into {rows} keyed rows")
        return shape.numel() // rows

    def bits16(self, shape: torch.Size, device: torch.device) -> Tensor:
        """Raw 16-bit integers of ``shape``; ``shape[0]`` is the row count or a multiple (rows of a row stay
        contiguous, as after reshaping (R, L, F) to (R * L, F))."""
        per_row = self._per_row(shape)
        words = torch.empty(len(self.generators), (per_row + 3) // 4, dtype=torch.int64, device=device)
        for row, g in zip(words, self.generators):
            row.random_(-(2**63), None, generator=g)  # full 64-bit range: four 16-bit draws per word
        return words.view(torch.int16)[:, :per_row].reshape(shape)

    def uniform(self, shape: torch.Size, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
        """U[0, 1) samples of ``shape`` (rows as in :meth:`bits16`)."""
        per_row = self._per_row(shape)
        out = torch.empty(len(self.generators), per_row, device=device, dtype=dtype)
        for row, g in zip(out, self.generators):
            row.uniform_(0.0, 1.0, generator=g)
        return out.reshape(shape)


class BatchRandom:
    """The keyed streams of one training batch: windows (P), queries (B) and query-window pairs (N)."""

    def __init__(self, windows: RowRandom, texts: RowRandom, pairs: RowRandom) -> None:
        self.windows, self.texts, self.pairs = windows, texts, pairs

    @classmethod
    def from_batch(cls, batch: dict[str, Tensor], device: torch.device) -> BatchRandom | None:
        """Streams from the batch's ``window_key`` (P,) and ``text_key`` (B,); None when the batch has no keys."""
        if "window_key" not in batch or "text_key" not in batch:
            return None
        keys = pair_keys(batch["window_key"], batch["text_key"], batch["pair_window"], batch["pair_text"])
        return cls(
            RowRandom.from_keys(batch["window_key"], device),
            RowRandom.from_keys(batch["text_key"], device),
            RowRandom.from_keys(keys, device),
        )
