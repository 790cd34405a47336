"""The light-load row of `make bench`: the remote p50 over the back-to-back local call and
over the local call after an idle pause, each taken from the same alternating blocks."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from benchmarks import closed_loop


def test_light_load_row_reports_both_local_references(monkeypatch: pytest.MonkeyPatch
                                                      ) -> None:
    pytest.importorskip("torch")
    monkeypatch.setattr(closed_loop, "IDLE_PAUSE_S", 0.02)
    calls: list[str] = []
    # The local call is slower after a pause, as on a VM: the row must see it only in the
    # idle reference.
    last_end = [time.perf_counter()]

    def local(text: str) -> None:
        rested = time.perf_counter() - last_end[0] > 0.01
        calls.append(("idle " if rested else "local ") + text)
        time.sleep(0.004 if rested else 0.002)
        last_end[0] = time.perf_counter()

    def remote(text: str) -> None:
        calls.append("remote " + text)
        time.sleep(0.006)
        last_end[0] = time.perf_counter()

    texts = [f"t{i}" for i in range(8)]
    got = closed_loop.light_load_row(remote, local, texts, "x", block=4)
    # Blocks of 4: back-to-back local, local after a pause, then remote, in turn.
    assert [c.split()[0] for c in calls[:12]] == ["local"] * 4 + ["idle"] * 4 + ["remote"] * 4
    assert [c.split()[1] for c in calls[:12]] == ["t0", "t1", "t2", "t3"] * 3
    assert got["requests"] == 8
    assert 1.5 < got["local_p50_ms"] < got["local_after_idle_p50_ms"] < got["p50_ms"]
    assert got["added_p50_ms"] == pytest.approx(got["p50_ms"] - got["local_p50_ms"], abs=0.02)
    assert got["added_over_idle_p50_ms"] == pytest.approx(
        got["p50_ms"] - got["local_after_idle_p50_ms"], abs=0.02)
    assert got["added_over_idle_p50_ms"] < got["added_p50_ms"]


def test_limit_rows_batch_sorted_texts_and_groups_of_the_producer_count() -> None:
    """The limit: the texts sorted by length in calls of ``batch``. The ceiling: groups of
    the producer count in arrival order, each sorted and called 8 at a time. The benchmark
    takes both again after pipeq's rows, so they must be callable on their own."""
    pytest.importorskip("torch")
    calls: list[tuple[list[str], int]] = []

    def pipe(texts: list[str], batch_size: int) -> None:
        calls.append((list(texts), batch_size))

    texts = ["a" * n for n in (5, 1, 4, 2, 9, 3, 8, 7, 6, 10)]
    limit, ceiling = closed_loop.limit_rows(pipe, texts, 4, 5, "x")
    by_length = sorted(texts, key=len)
    assert calls[:3] == [(by_length[0:4], 4), (by_length[4:8], 4), (by_length[8:], 4)]
    # Groups of 5 in arrival order (the first five texts, then the next five), each sorted.
    assert calls[3:] == [(sorted(texts[:5], key=len), 8), (sorted(texts[5:], key=len), 8)]
    assert limit["limit"] is True and limit["requests"] == 10
    assert ceiling["ceiling"] == 5 and ceiling["requests"] == 10
    assert "ceiling for 5 producers" in ceiling["row"]
