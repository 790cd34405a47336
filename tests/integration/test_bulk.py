"""Bulk jobs: ordered, back-pressured, resumable after a killed producer or worker, per-input
failures, cancel, and a bounded producer memory.

Real Redis, real worker processes serving tiny models, and ``pipeq bulk`` run as a
subprocess (killed with SIGKILL where the test says so).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import transformers
from compare import assert_same
from conftest import ROOT, Deployment, WorkerProcess
from tiny_models import build_text_model

from pipeq.bulk import ItemError
from pipeq.errors import JobFailed

FE = "feature-extraction"


@pytest.fixture(scope="module")
def paths(models_dir: Path) -> dict[str, str]:
    """Tiny model directories by task."""
    return {t: str(build_text_model(t, models_dir))
            for t in (FE, "fill-mask", "text-classification")}


@pytest.fixture(scope="module")
def served(module_deployment: Deployment, paths: dict[str, str]) -> dict[str, str]:
    """Ready workers for feature-extraction and fill-mask (text-classification's test owns its)."""
    workers = [module_deployment.start_worker(t, paths[t], ready=False) for t in (FE, "fill-mask")]
    for worker in workers:
        worker.wait_ready()
    return paths


def _bulk(dep: Deployment, *args: str) -> subprocess.Popen[str]:
    argv = [sys.executable, "-P", "-m", "pipeq", "bulk", *args]
    return subprocess.Popen(argv, env=dep.env(), cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(proc: subprocess.Popen[str], timeout: float = 240) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _summary(stdout: str) -> dict[str, Any]:
    return dict(json.loads(stdout.strip().splitlines()[-1]))


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _count_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _wait_for_lines(path: Path, count: int, proc: subprocess.Popen[str], timeout: float = 120
                    ) -> None:
    deadline = time.monotonic() + timeout
    while _count_lines(path) < count:
        assert proc.poll() is None, f"bulk ended early: {proc.communicate()}"
        assert time.monotonic() < deadline, f"no {count} output lines after {timeout}s"
        time.sleep(0.05)


def _assert_each_index_once(lines: list[dict[str, Any]], total: int) -> None:
    assert [line["index"] for line in lines] == list(range(total))


def _write_text(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


# --- RemotePipeline.map ------------------------------------------------------------------------


def test_map_is_lazy_ordered_and_equal_to_the_local_pipeline(module_deployment: Deployment,
                                                             served: dict[str, str]) -> None:
    remote = module_deployment.remote(FE, served[FE])
    texts = [f"the quick {i} " + "fox " * (i % 9) for i in range(300)]
    read = 0

    def source() -> Any:
        nonlocal read
        for text in texts:
            read += 1
            yield text

    results = remote.map(source(), chunk_size=16, max_in_flight=3)
    first = next(results)
    # Back-pressure: only the chunks in flight were read before the first result came back.
    assert read <= 3 * 16
    rest = list(results)
    local = transformers.pipeline(FE, model=served[FE])
    assert_same([first, *rest], local(texts))


def test_map_failures_raise_in_order_or_are_recorded(module_deployment: Deployment,
                                                     served: dict[str, str]) -> None:
    remote = module_deployment.remote("fill-mask", served["fill-mask"])
    texts = [f"hello [MASK] number {i}" if i % 7 else f"no mask {i}" for i in range(40)]
    recorded = list(remote.map(texts, chunk_size=8, on_error="record"))
    local = transformers.pipeline("fill-mask", model=served["fill-mask"])
    for i, (text, got) in enumerate(zip(texts, recorded, strict=True)):
        if i % 7 == 0:
            assert isinstance(got, ItemError) and "No mask_token" in got.message, got
        else:
            assert_same(got, local(text))
    seen = []
    with pytest.raises(JobFailed, match=r"input #0: .*No mask_token"):
        seen.extend(remote.map(texts, chunk_size=8))
    assert seen == []


# --- pipeq bulk --------------------------------------------------------------------------------


def test_bulk_answers_every_line_once_in_order_and_reports_bad_lines(
        module_deployment: Deployment, served: dict[str, str], tmp_path: Path) -> None:
    rows = [json.dumps({"text": f"sentence {i}", "other": i}) for i in range(150)]
    rows[3] = "{not json"
    rows[70] = json.dumps({"body": "no text field"})
    source = _write_text(tmp_path / "docs.jsonl", rows)
    out = tmp_path / "out.jsonl"
    records_before = len(module_deployment.keys(":job:*"))
    code, stdout, stderr = _finish(_bulk(
        module_deployment, "--task", FE, "--model", served[FE], "--input", str(source),
        "--output", str(out), "--chunk-size", "16", "--id", "docs", "--json"))
    assert code == 0, stderr
    # Written chunks' job records are deleted: Redis does not keep the results for the TTL.
    assert len(module_deployment.keys(":job:*")) == records_before
    assert "line 4: invalid JSON" in stderr and "line 71: no field 'text'" in stderr
    lines = _lines(out)
    _assert_each_index_once(lines, 150)
    assert lines[3]["error"]["type"] == "BadInput" and "line 4" in lines[3]["error"]["message"]
    assert lines[70]["error"]["type"] == "BadInput"
    local = transformers.pipeline(FE, model=served[FE])
    assert_same(lines[5]["result"], local("sentence 5"))
    assert_same(lines[149]["result"], local("sentence 149"))
    summary = _summary(stdout)
    assert (summary["total"], summary["answered"], summary["failed"], summary["bad_lines"]) == (
        150, 150, 2, 2)
    status = module_deployment.cli("bulk", "status", "docs", "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert (report["state"], report["done"], report["total"], report["failed"]) == (
        "finished", 150, 150, 2)
    assert report["chunks_in_flight"] == 0
    # Running the same command again answers nothing twice.
    code, stdout, stderr = _finish(_bulk(
        module_deployment, "--task", FE, "--model", served[FE], "--input", str(source),
        "--output", str(out), "--chunk-size", "16", "--id", "docs", "--json"))
    assert code == 0, stderr
    assert _summary(stdout)["answered_this_run"] == 0
    _assert_each_index_once(_lines(out), 150)


def test_resume_after_a_killed_producer_answers_each_input_once(
        module_deployment: Deployment, served: dict[str, str], tmp_path: Path) -> None:
    total = 4000
    source = _write_text(tmp_path / "lines.txt", [f"line {i} " + "w " * (i % 13)
                                                   for i in range(total)])
    common = ["--task", FE, "--model", served[FE], "--input", str(source), "--chunk-size", "32",
              "--json"]
    reference = tmp_path / "reference.jsonl"
    code, _, stderr = _finish(_bulk(module_deployment, *common, "--output", str(reference),
                                    "--id", "reference"))
    assert code == 0, stderr
    out = tmp_path / "out.jsonl"
    victim = _bulk(module_deployment, *common, "--output", str(out), "--id", "resumed")
    _wait_for_lines(out, 300, victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    written = _count_lines(out)
    assert written < total, "the producer finished before it could be killed"
    status = json.loads(module_deployment.cli("bulk", "status", "resumed", "--json").stdout)
    assert status["state"] == "running" and 0 < status["done"] <= written
    assert status["producer_alive"] is False
    # The same command again (no --resume needed: Redis knows the job) continues it.
    code, stdout, stderr = _finish(_bulk(module_deployment, *common, "--output", str(out),
                                         "--id", "resumed"))
    assert code == 0, stderr
    summary = _summary(stdout)
    assert summary["answered"] == total and summary["answered_this_run"] < total
    lines = _lines(out)
    _assert_each_index_once(lines, total)
    assert_same(lines, _lines(reference), tol=1e-4)
    fields = module_deployment.redis.hkeys(f"{module_deployment.prefix}:bulk:resumed")
    assert not [f for f in fields if f.startswith(b"chunk:")], "chunks left marked in flight"


def test_resume_after_a_killed_worker(module_deployment: Deployment, paths: dict[str, str],
                                      tmp_path: Path) -> None:
    task, model = "text-classification", paths["text-classification"]
    first: WorkerProcess = module_deployment.start_worker(task, model, "--max-batch-size", "8")
    total = 3000
    texts = [f"review {i}: " + ("great " if i % 3 else "awful ") * (1 + i % 5)
             for i in range(total)]
    source = _write_text(tmp_path / "reviews.txt", texts)
    out = tmp_path / "out.jsonl"
    proc = _bulk(module_deployment, "--task", task, "--model", model, "--input", str(source),
                 "--output", str(out), "--chunk-size", "16", "--json")
    _wait_for_lines(out, 200, proc)
    first.stop(signal.SIGKILL)
    assert _count_lines(out) < total, "the job finished before the worker could be killed"
    module_deployment.start_worker(task, model, "--max-batch-size", "8")
    code, stdout, stderr = _finish(proc)
    assert code == 0, stderr
    summary = _summary(stdout)
    assert summary["chunks_resent"] >= 1, summary  # the dead worker's chunks were sent again
    lines = _lines(out)
    _assert_each_index_once(lines, total)
    expected = transformers.pipeline(task, model=model)(texts, batch_size=64)
    assert_same([line["result"] for line in lines], expected)


def test_per_input_failures_are_recorded_or_stop_the_job(
        module_deployment: Deployment, served: dict[str, str], tmp_path: Path) -> None:
    texts = [f"paris is the [MASK] of france {i}" if i % 5 else f"plain text {i}"
             for i in range(60)]
    source = _write_text(tmp_path / "masks.txt", texts)
    common = ["--task", "fill-mask", "--model", served["fill-mask"], "--input", str(source),
              "--chunk-size", "16", "--param", "top_k=2", "--json"]
    out = tmp_path / "out.jsonl"
    code, stdout, stderr = _finish(_bulk(module_deployment, *common, "--output", str(out)))
    assert code == 0, stderr
    lines = _lines(out)
    _assert_each_index_once(lines, 60)
    local = transformers.pipeline("fill-mask", model=served["fill-mask"])
    for i, line in enumerate(lines):
        if i % 5 == 0:
            assert line["error"]["type"] == "PipelineException", line
            assert "No mask_token" in line["error"]["message"]
        else:
            assert_same(line["result"], local(texts[i], top_k=2))
    assert _summary(stdout)["failed"] == 12
    stopped = tmp_path / "stopped.jsonl"
    code, _, stderr = _finish(_bulk(module_deployment, *common, "--output", str(stopped),
                                    "--on-error", "fail"))
    assert code == 1
    assert "input #0 failed: PipelineException" in stderr and "--on-error fail" in stderr
    assert _count_lines(stopped) == 0


def test_result_cache_answers_repeated_inputs_without_running_them(
        module_deployment: Deployment, served: dict[str, str], tmp_path: Path) -> None:
    dep = module_deployment
    model = served["fill-mask"]
    texts = [f"paris is the [MASK] of spain {i}" if i % 5 else f"no mask here {i}"
             for i in range(40)]
    source = _write_text(tmp_path / "cached.txt", texts)

    def run(name: str, *extra: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        out = tmp_path / f"{name}.jsonl"
        code, stdout, stderr = _finish(_bulk(
            dep, "--task", "fill-mask", "--model", model, "--input", str(source), "--output",
            str(out), "--id", f"cache-{name}", "--chunk-size", "8", "--cache", "--json", *extra))
        assert code == 0, stderr
        return _summary(stdout), _lines(out)

    first, computed = run("first", "--param", "top_k=2")
    assert first["cache_hits"] == 0 and first["failed"] == 8
    local = transformers.pipeline("fill-mask", model=model)
    for i, line in enumerate(computed):
        if i % 5:
            assert_same(line["result"], local(texts[i], top_k=2))
    second, repeated = run("second", "--param", "top_k=2")
    assert second["cache_hits"] == 32  # every answer; failed inputs are run (and fail) again
    assert repeated == computed
    other, _ = run("other-params", "--param", "top_k=3")
    assert other["cache_hits"] == 0  # other parameters: other answers
    assert len(dep.keys("*:cache:*")) == 64

    remote = dep.remote("fill-mask", model)
    mapped = list(remote.map(texts, chunk_size=8, cache=True, top_k=2, on_error="record"))
    assert [m for i, m in enumerate(mapped) if i % 5] == [
        line["result"] for i, line in enumerate(computed) if i % 5]


def test_cancel_stops_the_job_and_resume_finishes_it(
        module_deployment: Deployment, served: dict[str, str], tmp_path: Path) -> None:
    total = 3000
    source = _write_text(tmp_path / "many.txt", [f"item {i}" for i in range(total)])
    out = tmp_path / "out.jsonl"
    common = ["--task", FE, "--model", served[FE], "--input", str(source), "--output", str(out),
              "--chunk-size", "8", "--id", "cancelme", "--json"]
    proc = _bulk(module_deployment, *common)
    _wait_for_lines(out, 100, proc)
    # Paused while the cancel goes in: on a fast machine the whole job could otherwise end
    # before `pipeq bulk cancel` (a process of its own) is up, or before the command's next
    # look at the flag (every second: ChunkScheduler's check_s). Paused past that second,
    # its first step after it runs again reads the flag; its chunks in flight meanwhile
    # finish on the worker.
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        cancel = module_deployment.cli("bulk", "cancel", "cancelme")
        time.sleep(1.2)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    assert cancel.returncode == 0 and "cancel requested" in cancel.stdout, cancel.stderr
    code, _, stderr = _finish(proc, timeout=60)
    assert code == 1 and "cancelled" in stderr, stderr
    written = _count_lines(out)
    assert written < total
    _assert_each_index_once(_lines(out), written)
    status = json.loads(module_deployment.cli("bulk", "status", "cancelme", "--json").stdout)
    assert status["state"] == "cancelled"
    again = _finish(_bulk(module_deployment, *common))
    assert again[0] == 2 and "--resume" in again[2]
    code, _, stderr = _finish(_bulk(module_deployment, *common, "--resume"))
    assert code == 0, stderr
    _assert_each_index_once(_lines(out), total)


def test_producer_memory_stays_bounded(module_deployment: Deployment, served: dict[str, str],
                                       tmp_path: Path) -> None:
    # 20,000 results of ~6 tokens x 32 floats: ~120 MB as Python lists if they were all held.
    total = 20_000
    source = _write_text(tmp_path / "short.txt", [f"w{i}" for i in range(total)])
    out = tmp_path / "out.jsonl"
    records_before = len(module_deployment.keys(":job:*"))
    proc = _bulk(module_deployment, "--task", FE, "--model", served[FE], "--input", str(source),
                 "--output", str(out), "--chunk-size", "64", "--max-in-flight", "4", "--json")
    records_seen = []
    while proc.poll() is None:  # Redis holds the chunks in flight only, never the whole job
        records_seen.append(len(module_deployment.keys(":job:*")) - records_before)
        time.sleep(0.2)
    code, stdout, stderr = _finish(proc)
    assert code == 0, stderr
    summary = _summary(stdout)
    assert summary["answered"] == total
    assert summary["peak_rss_mb"] < 110, summary
    assert _count_lines(out) == total
    assert records_seen and max(records_seen) <= 4 + 1, max(records_seen)
