"""Intervals over seeds (rgnet.eval.stats) and the quality benchmark's table (pipelines.quality_bench)."""

from __future__ import annotations

import math

import pytest

from pipelines.quality_bench import METRICS, summarise
from rgnet.eval.stats import paired_difference, t_interval


def test_t_interval_by_hand() -> None:
    # values 60, 63, 66: mean 63, s = 3, t(0.975, 2) = 4.302653, half = 4.302653 * 3 / sqrt(3) = 7.452413
    t = t_interval([60.0, 63.0, 66.0])
    assert t.mean == 63.0 and t.n == 3
    assert t.high - t.mean == pytest.approx(4.302653 * 3 / math.sqrt(3), rel=1e-6)
    assert t.low == pytest.approx(63.0 - 7.452413, rel=1e-6) and t.decided  # the interval excludes 0
    one = t_interval([5.0])
    assert (one.mean, one.low, one.high, one.n) == (5.0, 5.0, 5.0, 1) and not one.decided
    with pytest.raises(ValueError):
        t_interval([])


def test_paired_difference_pairs_by_seed() -> None:
    # a constant +2 per seed is decided even though each variant's own spread is large
    variant, reference = [52.0, 72.0, 62.0], [50.0, 70.0, 60.0]
    d = paired_difference(variant, reference)
    assert (d.mean, d.low, d.high) == (2.0, 2.0, 2.0) and d.decided
    unpaired = t_interval(variant).low - t_interval(reference).high
    assert unpaired < 0  # the unpaired intervals overlap: pairing is what decides it
    # order matters: pairs are by position (seed), not sorted
    assert not paired_difference([52.0, 62.0, 72.0], reference).decided
    with pytest.raises(ValueError, match="differ in number"):
        paired_difference([1.0], [1.0, 2.0])


def test_quality_table_pairs_runs_of_the_same_seed() -> None:
    def report(value: float) -> dict:
        return {"report": {"metrics": {m: value for m in METRICS}}, "wall_s": 1.0}

    results = {"local": {0: report(60), 1: report(70)}, "distributed": {1: report(71), 0: report(61)}}
    table = summarise(results, [0, 1])
    row = table["R1@0.3"]
    assert row["local"]["values"] == [60, 70] and row["distributed"]["values"] == [61, 71]
    assert row["paired_difference"]["values"] == [1, 1] and row["paired_difference"]["ci95"] == [1.0, 1.0]
    assert row["local"]["std"] == pytest.approx(math.sqrt(50))
