"""The ``pipeq`` command against a real Redis and a real worker: what a shell user sees."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import transformers
from compare import assert_same
from conftest import ROOT, Deployment
from tiny_models import build_text_model

from pipeq import pipeline
from pipeq.core.contract import Route
from pipeq.errors import JobTimeout
from pipeq.ops.exits import Exit

TASK = "text-classification"
DOWN_MODEL = "pipeq-tests/configured-but-down"


@pytest.fixture(scope="module")
def model(module_deployment: Deployment, models_dir: Path) -> str:
    """A served tiny text-classification model (one worker for the module)."""
    path = str(build_text_model(TASK, models_dir))
    module_deployment.start_worker(TASK, path)
    return path


@pytest.fixture(scope="module")
def local(model: str) -> Any:
    """The local truth: transformers.pipeline() on the same model."""
    return transformers.pipeline(TASK, model=model)


@pytest.fixture
def routes_file(module_deployment: Deployment) -> Iterator[Path]:
    """The deployment's routing table; removed after the test."""
    path = module_deployment.workdir / "routes.toml"
    yield path
    path.unlink(missing_ok=True)


def run(dep: Deployment, *args: str) -> subprocess.CompletedProcess[str]:
    """``pipeq ARGS`` on this deployment."""
    return dep.cli(*args, timeout=90)


def test_submit_wait_prints_the_result(module_deployment: Deployment, model: str,
                                       local: Any) -> None:
    done = run(module_deployment, "submit", "--task", TASK, "--model", model, "--wait",
               "--param", "top_k=2", "I love it")
    assert done.returncode == 0, done.stderr
    assert_same(json.loads(done.stdout), local("I love it", top_k=2))


def test_submit_several_inputs_is_a_list_call(module_deployment: Deployment, model: str,
                                              local: Any) -> None:
    done = run(module_deployment, "submit", "--task", "sentiment-analysis", "--model", model,
               "--wait", "good", "bad")
    assert done.returncode == 0, done.stderr
    assert_same(json.loads(done.stdout), local(["good", "bad"]))


def test_submit_then_result_wait(module_deployment: Deployment, model: str, local: Any) -> None:
    submitted = run(module_deployment, "submit", "--task", TASK, "--model", model, "hello")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    assert len(job_id) == 32 and job_id.isalnum(), submitted.stdout
    done = run(module_deployment, "result", job_id, "--wait", "--timeout", "60")
    assert done.returncode == 0, done.stderr
    assert_same(json.loads(done.stdout), local("hello"))
    again = run(module_deployment, "result", job_id)  # ended: no --wait needed
    assert again.returncode == 0 and json.loads(again.stdout) == json.loads(done.stdout)


def test_submit_without_worker_exits_3_and_says_how_to_start_one(
        module_deployment: Deployment) -> None:
    done = run(module_deployment, "submit", "--task", TASK, "--model", DOWN_MODEL, "hi")
    assert done.returncode == 3
    assert f"pipeq worker --task {TASK} --model {DOWN_MODEL}" in done.stderr
    assert done.stdout == ""


def test_submit_with_a_bad_parameter_exits_2(module_deployment: Deployment, model: str) -> None:
    done = run(module_deployment, "submit", "--task", TASK, "--model", model,
               "--param", "top_k=many", "hi")
    assert done.returncode == 2
    assert "parameter 'top_k'" in done.stderr


def test_cancel_a_pending_job(module_deployment: Deployment) -> None:
    submitted = run(module_deployment, "submit", "--task", TASK, "--model", DOWN_MODEL,
                    "--no-require-worker", "never runs")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    pending = run(module_deployment, "result", job_id)
    assert pending.returncode == 4 and f"job {job_id} is PENDING" in pending.stderr
    cancelled = run(module_deployment, "cancel", job_id)
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout.strip() == f"job {job_id} cancelled"
    result = run(module_deployment, "result", job_id)
    assert result.returncode == 1
    assert "JobCancelled" in result.stderr and "cancelled" in result.stderr
    twice = run(module_deployment, "cancel", job_id)
    assert twice.returncode == 1, twice.stdout + twice.stderr
    assert twice.stderr.strip() == (f"job {job_id} had already ended (CANCELLED): nothing was "
                                    "cancelled") and twice.stdout == ""


def test_cancel_a_finished_job_exits_1_and_says_nothing_was_cancelled(
        module_deployment: Deployment, model: str) -> None:
    job_id = run(module_deployment, "submit", "--task", TASK, "--model", model, "hi"
                 ).stdout.strip()
    assert run(module_deployment, "result", job_id, "--wait", "--timeout", "60").returncode == 0
    done = run(module_deployment, "cancel", job_id)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip() == (f"job {job_id} had already ended (SUCCESS): nothing was "
                                   "cancelled")
    assert run(module_deployment, "result", job_id).returncode == 0  # its result stands


@pytest.mark.parametrize("command", ["result", "cancel"])
def test_an_unknown_job_id_exits_6_and_says_so(module_deployment: Deployment,
                                               command: str) -> None:
    done = run(module_deployment, command, "nosuchjob")
    assert done.returncode == 6 == Exit.NOT_FOUND, done.stdout + done.stderr
    assert done.stderr.strip() == (
        f"pipeq {command}: no job nosuchjob in this deployment (prefix "
        f"'{module_deployment.prefix}'): never submitted here, or its record expired "
        "(records are kept PIPEQ_RESULT_TTL_S = 86400s)")
    assert "PENDING" not in done.stderr and done.stdout == ""


def test_no_worker_error_of_the_cli_names_the_cli_option(module_deployment: Deployment
                                                         ) -> None:
    done = run(module_deployment, "submit", "--task", TASK, "--model", DOWN_MODEL, "hi")
    assert done.returncode == 3
    route = Route(task=TASK, model=DOWN_MODEL)
    assert done.stderr.strip() == (
        f"pipeq submit: no live worker serves route {route.describe()}. Start one with "
        f"`pipeq worker --task {TASK} --model {DOWN_MODEL}`, or pass --no-require-worker to "
        "queue the job for a worker that starts later")


def test_submit_wait_timing_out_says_how_to_wait_again(module_deployment: Deployment) -> None:
    done = run(module_deployment, "submit", "--task", TASK, "--model", DOWN_MODEL,
               "--no-require-worker", "--wait", "--timeout", "1", "nobody runs me")
    assert done.returncode == 4, done.stdout + done.stderr
    job_id = done.stderr.split()[3]
    assert done.stderr.strip() == (
        f"pipeq submit: job {job_id} did not finish within 1s (status PENDING); it goes on: "
        f"wait again with `pipeq result {job_id} --wait`, or stop it with "
        f"`pipeq cancel {job_id}`")
    assert "job.result" not in done.stderr


def test_remote_call_timing_out_says_how_to_reach_the_job(module_deployment: Deployment
                                                          ) -> None:
    remote = pipeline(TASK, model=DOWN_MODEL, settings=module_deployment.settings.model_copy(
        update={"require_worker": False}))
    with pytest.raises(JobTimeout) as timed_out:
        remote("nobody runs me", timeout=0.5)
    job_id = timed_out.value.job_id
    assert str(timed_out.value) == (
        f"job {job_id} did not finish within 0.5s (status PENDING); it goes on: "
        f"pipeq.get_job('{job_id}').result(timeout=...) waits for it again, .cancel() stops "
        "it; or use remote.submit(...) to hold a Job")


def test_a_bad_setting_says_what_is_wrong_without_pydantic_s_prefix(
        module_deployment: Deployment) -> None:
    env = module_deployment.env(PIPEQ_REDIS_URL="http://redis.internal:6379")
    done = subprocess.run([sys.executable, "-P", "-m", "pipeq", "config"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "pipeq config: invalid pipeq settings: redis_url: PIPEQ_REDIS_URL must start with "
        "redis://, rediss://, unix:// or sentinel://, not 'http'://")


def test_worker_for_a_missing_model_folder_says_the_folder_is_missing(
        module_deployment: Deployment, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    done = run(module_deployment, "worker", "--task", TASK, "--model", str(missing),
               "--device", "cpu")
    assert done.returncode == 3, done.stdout + done.stderr
    assert f"model folder {missing} does not exist on this machine" in done.stderr
    assert "Repo id" not in done.stderr and "repo_id" not in done.stderr


def test_status_with_a_live_worker_exits_0(module_deployment: Deployment, model: str,
                                           routes_file: Path) -> None:
    routes_file.write_text(f'[[route]]\ntask = "{TASK}"\nmodel = "{model}"\n')
    done = run(module_deployment, "status")
    assert done.returncode == 0, done.stdout + done.stderr
    line = next(ln for ln in done.stdout.splitlines() if f"{TASK}:{model}" in ln)
    assert line.startswith("[ok ") and "workers=1" in line
    as_json = run(module_deployment, "status", "--json")
    assert as_json.returncode == 0
    (route,) = [r for r in json.loads(as_json.stdout) if r["route"] == f"{TASK}:{model}"]
    assert route["healthy"] is True and route["configured"] is True
    assert route["route_id"] == Route(task=TASK, model=model).id
    assert len(route["workers"]) == 1 and route["workers"][0]["ready"] is True


def test_status_exits_3_for_a_configured_route_without_worker(
        module_deployment: Deployment, model: str, routes_file: Path) -> None:
    routes_file.write_text(f'[[route]]\ntask = "{TASK}"\nmodel = "{model}"\n\n'
                           f'[[route]]\ntask = "{TASK}"\nmodel = "{DOWN_MODEL}"\n')
    done = run(module_deployment, "status")
    assert done.returncode == 3, done.stdout + done.stderr
    down = next(ln for ln in done.stdout.splitlines() if DOWN_MODEL in ln)
    assert down.startswith("[DOWN]") and "workers=0" in down
    up = next(ln for ln in done.stdout.splitlines() if f"{TASK}:{model} " in ln)
    assert up.startswith("[ok ")
    # Asking about the live route alone is healthy.
    only = run(module_deployment, "status", "--task", TASK, "--model", model)
    assert only.returncode == 0, only.stdout + only.stderr


def test_config_masks_the_redis_password(module_deployment: Deployment) -> None:
    secret = "cli-s3cret-pw"
    env = module_deployment.env(PIPEQ_REDIS_URL=f"redis://:{secret}@redis.internal:6379/2")
    done = subprocess.run([sys.executable, "-P", "-m", "pipeq", "config"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert secret not in done.stdout + done.stderr
    shown = json.loads(done.stdout)
    assert shown["redis_url"] == "redis://:****@redis.internal:6379/2"
    assert shown["queue_prefix"] == module_deployment.prefix


def test_worker_with_gpus_on_a_machine_without_them_exits_2(
        module_deployment: Deployment) -> None:
    from pipeq.worker.ops.devices import visible_gpu_ids

    missing = max(visible_gpu_ids(), default=-1) + 1  # GPU 0 on a machine without GPUs
    done = run(module_deployment, "worker", "--task", TASK, "--model", DOWN_MODEL,
               "--gpus", str(missing))
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"--gpus {missing}: GPU {missing} not found on this machine" in done.stderr
    assert "use --device cpu" in done.stderr


@pytest.mark.parametrize(("args", "shown"), [
    (["metrics", "--port", "99999"], "Invalid value for '--port': 99999 is not in the range"),
    (["flower", "--port", "-1"], "Invalid value for '--port'"),
    (["bulk", "--task", TASK, "--model", DOWN_MODEL, "--input", "{input}",
      "--output", "/proc/x/o.jsonl"], "pipeq bulk: cannot use '/proc/x/o.jsonl'"),
    (["submit", "--task", TASK, "--model", DOWN_MODEL, "--param", "=5", "hi"],
     "--param: takes KEY=VALUE (e.g. max_new_tokens=20), got '=5'"),
    (["cancel", "0123456789abcdef0123456789abcdef"], "no job 0123456789abcdef"),
])
def test_bad_command_lines_get_a_clean_error(module_deployment: Deployment, tmp_path: Path,
                                             args: list[str], shown: str) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text('{"text": "a"}\n')
    done = module_deployment.cli(*[a.format(input=source) for a in args])
    allowed = {6} if args[0] == "cancel" else {1, 2}  # 6: no such job (Exit.NOT_FOUND)
    assert done.returncode in allowed, done.stdout + done.stderr
    assert shown in done.stderr, done.stderr
    assert "Traceback" not in done.stdout + done.stderr


def test_a_result_can_be_dropped_once_read(module_deployment: Deployment, model: str,
                                          local: Any) -> None:
    from pipeq.errors import JobNotFound

    dep = module_deployment
    remote = dep.remote(TASK, model)
    job = remote.submit("read me once")
    assert_same(job.result(timeout=60, drop=True), local("read me once"))
    assert job.status() == "SUCCESS"  # the state stays (until the record expires) ...
    data = dep.redis.hget(dep.settings.keys.result(job.id), "data")
    assert data is not None and len(data) < 20  # ... the result does not
    with pytest.raises(JobNotFound, match="was dropped from Redis once it was read"):
        job.result(timeout=5)
    kept = remote.submit("keep me")
    assert_same(kept.result(timeout=60), kept.result(timeout=5))  # default: kept
    done = dep.cli("result", job.id)
    assert done.returncode == 6 and "was dropped" in done.stderr  # Exit.NOT_FOUND
