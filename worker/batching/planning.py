"""Splitting a gathered batch into pipeline calls that waste little on padding.

A call on inputs sorted by length pads every input to the longest one, so its cost is
about ``overhead + count x longest`` (in length units). One big call pays for padding; many
small calls pay the per-call overhead again and again. :func:`plan_calls` finds the
cheapest split of a sorted batch into contiguous calls by dynamic programming (O(n^2) for
n <= a few hundred inputs: well under a millisecond at the usual batch sizes).

The per-call overhead is measured on the route's own model at warm-up
(:func:`calibrate_overhead`): on a GPU it is large next to padding and batches stay whole;
on a CPU padding costs real time and uneven batches are split.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any


def plan_calls(lengths: Sequence[int], *, max_size: int, overhead: float | None,
               token_budget: int = 0, equal_only: bool = False) -> list[tuple[int, int]]:
    """Ranges ``[start, end)`` of ``lengths`` (sorted ascending) to run as one call each.

    ``overhead``: cost of one call in length units (None: unknown, fill calls up to
    ``max_size``). ``token_budget``: cap on ``count x longest`` per call (0: none).
    ``equal_only``: every call holds inputs of one length (models that cannot pad).
    """
    n = len(lengths)
    if n == 0:
        return []

    def allowed(start: int, end: int) -> bool:
        size = end - start
        if size > max_size:
            return False
        if equal_only and lengths[start] != lengths[end - 1]:
            return False
        return not (token_budget and size > 1 and size * lengths[end - 1] > token_budget)

    if overhead is None:
        return _greedy(n, allowed)
    return _cheapest(lengths, max_size, overhead, allowed, equal_only)


def _cheapest(lengths: Sequence[int], max_size: int, overhead: float,
              allowed: Callable[[int, int], bool], equal_only: bool) -> list[tuple[int, int]]:
    """The split of minimal total cost, by dynamic programming over the call ends."""
    n = len(lengths)
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        longest = max(lengths[end - 1], 1)
        for start in range(end - 1, max(-1, end - max_size - 1), -1):
            if not allowed(start, end):
                if end - start > 1 and equal_only:
                    break  # shorter starts only make the lengths more unequal
                continue
            cost = best[start] + overhead + (end - start) * longest
            if cost < best[end]:
                best[end] = cost
                cut[end] = start
    ranges = []
    end = n
    while end > 0:
        ranges.append((cut[end], end))
        end = cut[end]
    return ranges[::-1]


def _greedy(n: int, allowed: Callable[[int, int], bool]) -> list[tuple[int, int]]:
    ranges = []
    start = 0
    for end in range(1, n + 1):
        if not allowed(start, end):
            ranges.append((start, end - 1))
            start = end - 1
    ranges.append((start, n))
    return ranges


def calibrate_overhead(run: Callable[[list[Any]], Any], short: str, long: str,
                       repeats: int = 3) -> float | None:
    """Per-call overhead of ``run`` in length units (characters), measured on the model.

    Times one call on a single short input and one on eight long inputs (best of
    ``repeats``) and solves ``t = overhead_s + per_unit_s x count x longest`` for both.
    Returns None when the measurement makes no sense (noise, a model that ignores length).
    """
    def best(items: list[Any]) -> float:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            run(items)
            times.append(time.perf_counter() - started)
        return min(times)

    small_units, big_units = len(short), 8 * len(long)
    t_small, t_big = best([short]), best([long] * 8)
    per_unit = (t_big - t_small) / (big_units - small_units)
    if per_unit <= 0:
        return None
    overhead_s = t_small - per_unit * small_units
    if overhead_s <= 0:
        return 0.0
    return overhead_s / per_unit
