"""The open-loop summary of `make bench`: the highest rate that meets the p99 target with
every lower rate meeting it too."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from benchmarks import open_loop


def test_a_miss_below_a_rate_that_met_the_target_ends_the_sustained_range(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # p99 per offered rate (req/s, limit 100): 0.3x misses, 0.4x meets by chance.
    p99 = {10: 0.05, 20: 0.08, 30: 0.15, 40: 0.09}

    def run(remote: Any, texts: list[str], rate: float, duration_s: float, rng: Any
            ) -> tuple[list[float], float]:
        return [p99.get(round(rate), 0.5)] * 10, duration_s

    monkeypatch.setattr(open_loop, "_run", run)
    rows = open_loop.open_loop_rows(None, ["t"], 100.0, "x")
    assert [r["offered_fraction"] for r in rows[:-1]] == list(open_loop.FRACTIONS)
    assert [r["p99_under_target"] for r in rows[:4]] == [True, True, False, True]
    assert rows[-1]["x_limit"] == 0.2
    assert rows[-1]["req_per_s"] == 20.0
