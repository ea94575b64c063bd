"""Intervals for numbers measured over a few seeds (a mean, or a paired difference between two variants).

With n seeds the mean's 95% interval is mean ± t(0.975, n - 1) * s / sqrt(n) (Student's t, s the sample standard
deviation).  A paired difference (variant minus reference, same seed) removes the seed-to-seed spread they share;
an interval that contains 0 does not decide which is better.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int

    @property
    def decided(self) -> bool:
        """The interval excludes 0 (meaningful for differences)."""
        return self.n > 1 and (self.low > 0 or self.high < 0)


def t_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """The mean of ``values`` and its Student t interval at ``level``; one value gives a zero-width interval.

    >>> t = t_interval([1.0, 2.0, 3.0])
    >>> round(t.mean, 3), round(t.low, 3), round(t.high, 3)   # 2 ± 4.303 * 1 / sqrt(3)
    (2.0, -0.484, 4.484)
    """
    a = np.asarray(values, dtype=float)
    if a.size == 0:
        raise ValueError("no values")
    mean = float(a.mean())
    if a.size < 2:
        return Interval(mean, mean, mean, 1)
    half = float(stats.t.ppf(0.5 + level / 2, a.size - 1) * a.std(ddof=1) / np.sqrt(a.size))
    return Interval(mean, mean - half, mean + half, int(a.size))


def paired_difference(variant: Sequence[float], reference: Sequence[float], level: float = 0.95) -> Interval:
    """``t_interval`` of variant[i] - reference[i] (the i-th values come from the same seed)."""
    if len(variant) != len(reference):
        raise ValueError(f"paired values differ in number: {len(variant)} vs {len(reference)}")
    return t_interval([v - r for v, r in zip(variant, reference)], level)
