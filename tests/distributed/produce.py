"""A producer host of the distributed tests, run there with ``ip netns exec``.

Settings come from the environment (``PIPEQ_REDIS_URL`` names Redis by its address on the
test bed's bridge). Two modes, each writing a JSON report to ``--out``:

- ``jobs``: submit every input of ``--inputs`` (a JSON list of texts) as its own job, wait
  for each result, and report per job its id, result or error (type and message), plus the
  times of the first submit and of the last answer;
- ``cut``: make one good call (the connection is open), print READY, wait until the file
  ``--go`` exists (the test has cut this host off meanwhile), then time a submit and a
  status read: each must end with BrokerUnavailable within the connect timeout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from pipeq import pipeline


def run_jobs(task: str, model: str, inputs: list[str], wait_s: float) -> dict[str, Any]:
    remote = pipeline(task, model=model)
    first = time.time()
    jobs = [remote.submit(text, timeout=wait_s) for text in inputs]
    submitted = time.time()
    answers: list[dict[str, Any]] = []
    deadline = time.monotonic() + wait_s
    for text, job in zip(inputs, jobs, strict=True):
        try:
            result = job.result(timeout=max(0.1, deadline - time.monotonic()))
            answers.append({"id": job.id, "input": text, "result": result})
        except Exception as exc:  # reported, counted as lost by the test
            answers.append({"id": job.id, "input": text,
                            "error": f"{type(exc).__name__}: {exc}"})
    return {"first_submit": first, "submitted": submitted, "last_answer": time.time(),
            "answers": answers}


def run_cut(task: str, model: str, go: Path) -> dict[str, Any]:
    remote = pipeline(task, model=model)
    job = remote.submit("a call while the link is up")
    job.result(timeout=60)
    print("READY", flush=True)
    deadline = time.monotonic() + 60
    while not go.exists():
        if time.monotonic() > deadline:
            return {"error": "never told to go on"}
        time.sleep(0.02)
    report: dict[str, Any] = {}
    for name, action in (("submit", lambda: remote.submit("a call after the cut")),
                         ("status", lambda: job.status())):
        began = time.monotonic()
        try:
            action()
            outcome = "no error"
        except Exception as exc:
            outcome = f"{type(exc).__module__}.{type(exc).__name__}: {exc}"
        report[name] = {"seconds": time.monotonic() - began, "outcome": outcome}
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=["jobs", "cut"])
    parser.add_argument("--task", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--inputs", type=Path)
    parser.add_argument("--wait", type=float, default=120.0)
    parser.add_argument("--go", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.mode == "jobs":
        report = run_jobs(args.task, args.model, json.loads(args.inputs.read_text()),
                          args.wait)
    else:
        report = run_cut(args.task, args.model, args.go)
    args.out.write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
