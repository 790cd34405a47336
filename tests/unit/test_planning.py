"""Splitting a gathered batch into pipeline calls (worker/planning.py)."""

from __future__ import annotations

import time

from pipeq.worker.batching.planning import calibrate_overhead, plan_calls


def covers(ranges: list[tuple[int, int]], n: int) -> bool:
    """The ranges are contiguous and cover 0..n exactly once."""
    return [r[0] for r in ranges] == [0] + [r[1] for r in ranges[:-1]] and ranges[-1][1] == n


def test_uneven_lengths_split_when_calls_are_cheap() -> None:
    lengths = [10, 12, 15, 40, 41, 45, 200, 210]
    ranges = plan_calls(lengths, max_size=32, overhead=60)
    assert ranges == [(0, 3), (3, 6), (6, 8)]
    assert covers(ranges, len(lengths))


def test_expensive_calls_keep_the_batch_whole() -> None:
    assert plan_calls([10, 12, 15, 40, 200], max_size=32, overhead=10_000) == [(0, 5)]


def test_limits_are_respected() -> None:
    lengths = list(range(1, 101))
    for overhead in (None, 0.0, 50.0, 1e9):
        ranges = plan_calls(lengths, max_size=16, overhead=overhead, token_budget=800)
        assert covers(ranges, len(lengths))
        for start, end in ranges:
            assert end - start <= 16
            assert end - start == 1 or (end - start) * lengths[end - 1] <= 800


def test_equal_lengths_only() -> None:
    ranges = plan_calls([5, 5, 7, 7, 7, 9], max_size=32, overhead=1e6, equal_only=True)
    assert ranges == [(0, 2), (2, 5), (5, 6)]


def test_plan_is_fast_for_large_batches() -> None:
    started = time.perf_counter()
    plan_calls(sorted(range(0, 2560, 10)), max_size=256, overhead=100)
    assert time.perf_counter() - started < 0.5


def test_calibration_recovers_a_linear_cost_model() -> None:
    def fake_call(items: list[str]) -> None:  # 2 ms per call + 10 us per padded char
        time.sleep(0.002 + 1e-5 * len(items) * max(len(i) for i in items))

    overhead = calibrate_overhead(fake_call, "x" * 10, "y" * 500)
    assert overhead is not None
    assert 100 < overhead < 400  # 2 ms / 10 us = 200 chars
