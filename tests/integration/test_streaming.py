"""Streaming generation: text as it is generated, from real workers, equal to the local text.

Two tiny random generation models (GPT-2's byte-level BPE, and a Llama-style model whose
SentencePiece-style tokenizer drops a sequence's leading space when decoded alone), each
served by a real worker process. The streamed pieces, joined, must be exactly the
``generated_text`` the local ``transformers.pipeline()`` returns with
``return_full_text=False``, for one prompt, lists, ``num_return_sequences`` and jobs that
share a batch with others; the job stays a normal job whose result equals the local one.
A worker SIGKILLed mid-stream: the retry's reader gets one complete text, nothing twice.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import transformers
from compare import assert_same
from conftest import Deployment, wait_until
from tiny_models import build_llama_model, build_text_model

from pipeq import RemotePipeline
from pipeq.core.streams import StreamPiece, parse_entry
from pipeq.errors import JobCancelled, JobFailed, StreamError, StreamNotSupported

TASK = "text-generation"
PROMPTS = ["Once upon a time there was", "hello world", "The cat sat on the mat. The dog"]
GREEDY = {"max_new_tokens": 24, "do_sample": False}
#: Sampling restricted to the top token: deterministic, so several sequences per prompt
#: can be compared with the local pipeline (beam search cannot stream).
TOP1 = {"max_new_tokens": 16, "do_sample": True, "top_k": 1, "num_return_sequences": 2}


@pytest.fixture(scope="module")
def models(models_dir: Path) -> dict[str, str]:
    """The two tiny generation models: name -> directory."""
    return {"gpt2": str(build_text_model(TASK, models_dir)),
            "llama": str(build_llama_model(models_dir))}


@pytest.fixture(scope="module")
def served(module_deployment: Deployment, models: dict[str, str]) -> dict[str, str]:
    """A ready worker per model (one model instance each: calls are batches of all that
    waits; the Llama worker's calls take 300 ms longer, so concurrent jobs share them, and
    an input with OOM fails as out of memory)."""
    workers = [module_deployment.start_worker(TASK, models["gpt2"], "--cpu-instances", "1",
                                              ready=False),
               module_deployment.start_worker(TASK, models["llama"], "--cpu-instances", "1",
                                              ready=False,
                                              env={"PIPEQ_FAULTS": "slow_ms=300,oom_marker=OOM"})]
    for worker in workers:
        worker.wait_ready()
    return models


@pytest.fixture(scope="module")
def local(served: dict[str, str]) -> dict[str, Any]:
    """The local truth: transformers.pipeline() per model."""
    return {name: transformers.pipeline(TASK, model=path) for name, path in served.items()}


def remote_of(dep: Deployment, served: dict[str, str], name: str) -> RemotePipeline:
    return dep.remote(TASK, served[name])


def joined(pieces: Iterable[StreamPiece]) -> dict[tuple[int, int], str]:
    """Each sequence's text: its pieces joined, in order."""
    texts: dict[tuple[int, int], str] = defaultdict(str)
    for piece in pieces:
        assert isinstance(piece, StreamPiece), piece
        texts[(piece.index, piece.seq)] += piece.text
    return dict(texts)


def local_texts(pipe: Any, prompts: list[str], params: dict[str, Any]
                ) -> dict[tuple[int, int], str]:
    """The local pipeline's new text per (prompt, sequence), one prompt at a time."""
    out = {}
    for index, prompt in enumerate(prompts):
        for seq, result in enumerate(pipe(prompt, return_full_text=False, **params)):
            out[(index, seq)] = result["generated_text"]
    return out


def stream_entries(dep: Deployment, job_id: str) -> list[Any]:
    """The entries of a job's stream as Redis holds them, parsed."""
    key = dep.settings.keys.stream(job_id)
    return [parse_entry(fields) for _, fields in dep.redis.xrange(key)]


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_one_prompt_streams_the_local_text(module_deployment: Deployment,
                                           served: dict[str, str], local: dict[str, Any],
                                           name: str) -> None:
    remote = remote_of(module_deployment, served, name)
    prompt = PROMPTS[0]
    pieces = list(remote.stream(prompt, timeout=60, **GREEDY))
    expected = local[name](prompt, return_full_text=False, **GREEDY)[0]["generated_text"]
    assert all(isinstance(p, str) and p for p in pieces)
    assert "".join(pieces) == expected
    if name == "llama":  # clean text: word by word, not one lump at the end
        assert len(pieces) > 3, pieces


def test_the_job_stays_a_normal_job(module_deployment: Deployment, served: dict[str, str],
                                    local: dict[str, Any]) -> None:
    remote = remote_of(module_deployment, served, "llama")
    job = remote.submit(PROMPTS[1], timeout=60, stream=True, **GREEDY)
    text = "".join(p.text for p in job.stream(timeout=60))
    assert job.status() == "SUCCESS"
    # The result is the local pipeline's (full text by default); the stream is the new text.
    assert_same(job.result(10), local["llama"](PROMPTS[1], **GREEDY))
    assert job.result(10)[0]["generated_text"] == PROMPTS[1] + text
    # A second reader (another process, a late one) reads the same text from the start.
    assert "".join(p.text for p in remote.job(job.id).stream(timeout=10)) == text
    entries = stream_entries(module_deployment, job.id)
    assert entries[-1].end.value == "SUCCESS" and {e.attempt for e in entries} == {1}
    ttl = module_deployment.redis.ttl(module_deployment.settings.keys.stream(job.id))
    assert 0 < ttl <= module_deployment.settings.result_ttl_s


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_a_list_streams_each_prompt(module_deployment: Deployment, served: dict[str, str],
                                    local: dict[str, Any], name: str) -> None:
    remote = remote_of(module_deployment, served, name)
    pieces = list(remote.stream(PROMPTS, timeout=60, **GREEDY))
    assert joined(pieces) == local_texts(local[name], PROMPTS, GREEDY)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_num_return_sequences_stream_each_sequence(module_deployment: Deployment,
                                                   served: dict[str, str],
                                                   local: dict[str, Any], name: str) -> None:
    remote = remote_of(module_deployment, served, name)
    texts = joined(remote.stream(PROMPTS[:2], timeout=60, **TOP1))
    assert texts == local_texts(local[name], PROMPTS[:2], TOP1)
    assert len(texts) == 4
    one = joined(remote.stream(PROMPTS[2], timeout=60, **TOP1))  # one prompt: pieces too
    assert one == local_texts(local[name], PROMPTS[2:], TOP1)


def test_sampled_stream_equals_the_jobs_result(module_deployment: Deployment,
                                               served: dict[str, str]) -> None:
    """True sampling differs from run to run: the stream is compared with its own result."""
    remote = remote_of(module_deployment, served, "llama")
    params = {"max_new_tokens": 20, "do_sample": True, "top_k": 50,
              "num_return_sequences": 3, "return_full_text": False}
    job = remote.submit(PROMPTS, timeout=60, stream=True, **params)
    texts = joined(job.stream(timeout=60))
    result = job.result(10)
    assert texts == {(i, s): seq["generated_text"]
                     for i, seqs in enumerate(result) for s, seq in enumerate(seqs)}


def test_streaming_jobs_share_batches_with_others(module_deployment: Deployment,
                                                  served: dict[str, str],
                                                  local: dict[str, Any]) -> None:
    """Jobs that stream and jobs that do not, submitted together, run in shared batches;
    each gets its own text; only the streaming ones have a stream."""
    dep = module_deployment
    remote = remote_of(dep, served, "llama")
    prompts = [f"{PROMPTS[i % 3]} {i}" for i in range(8)]
    jobs = [remote.submit(p, timeout=60, stream=i % 2 == 0, **GREEDY)
            for i, p in enumerate(prompts)]
    for i, (prompt, job) in enumerate(zip(prompts, jobs, strict=True)):
        expected = local["llama"](prompt, **GREEDY)
        if i % 2 == 0:
            text = "".join(p.text for p in job.stream(timeout=60))
            assert prompt + text == expected[0]["generated_text"]
        assert_same(job.result(60), expected)
    streams = {k.rsplit(":", 1)[-1] for k in dep.keys(":stream:*")}
    assert {j.id for j in jobs[0::2]} <= streams
    assert not {j.id for j in jobs[1::2]} & streams
    shared = [line for line in dep.workers[1].log().splitlines()
              if (m := re.search(r"batch route=\S+ size=(\d+)", line)) and int(m.group(1)) > 1
              and any(j.id in line for j in jobs[0::2])]
    assert shared, "no streaming job ran in a batch of more than one input"


def test_async_stream(module_deployment: Deployment, served: dict[str, str],
                      local: dict[str, Any]) -> None:
    remote = remote_of(module_deployment, served, "llama")

    async def main() -> tuple[list[Any], list[Any]]:
        one = [t async for t in remote.astream(PROMPTS[0], timeout=60, **GREEDY)]
        many = [p async for p in remote.astream(PROMPTS, timeout=60, **GREEDY)]
        return one, many

    one, many = asyncio.run(main())
    assert "".join(one) == local_texts(local["llama"], PROMPTS[:1], GREEDY)[(0, 0)]
    assert joined(many) == local_texts(local["llama"], PROMPTS, GREEDY)


def test_pipeq_submit_stream_prints_the_text_as_it_comes(module_deployment: Deployment,
                                                        served: dict[str, str],
                                                        local: dict[str, Any]) -> None:
    args = ["submit", "--task", TASK, "--model", served["llama"], "--stream",
            "--param", "max_new_tokens=24", "--param", "do_sample=false"]
    one = module_deployment.cli(*args, PROMPTS[0])
    assert one.returncode == 0, one.stderr
    assert one.stdout == local_texts(local["llama"], PROMPTS[:1], GREEDY)[(0, 0)] + "\n"
    many = module_deployment.cli(*args, *PROMPTS[:2])
    assert many.returncode == 0, many.stderr
    pieces = [StreamPiece(**json.loads(line)) for line in many.stdout.splitlines()]
    assert joined(pieces) == local_texts(local["llama"], PROMPTS[:2], GREEDY)


def test_what_cannot_stream_says_so(module_deployment: Deployment, served: dict[str, str]
                                    ) -> None:
    dep = module_deployment
    with pytest.raises(StreamNotSupported, match="text-generation routes"):
        dep.remote("text-classification", served["gpt2"]).stream("hi", require_worker=False)
    remote = remote_of(dep, served, "gpt2")
    with pytest.raises(StreamNotSupported, match="beam search"):
        remote.stream("hi", num_beams=2, max_new_tokens=3)
    job = remote.submit("hi", timeout=60, max_new_tokens=3)
    job.result(60)
    with pytest.raises(StreamError, match="did not stream its text: submit it with stream=True"):
        list(job.stream(timeout=10))
    assert not dep.keys(f":stream:{job.id}")


def test_a_job_that_fails_ends_its_stream_with_its_error(module_deployment: Deployment,
                                                        served: dict[str, str]) -> None:
    remote = remote_of(module_deployment, served, "llama")
    job = remote.submit("OOM for sure", timeout=60, stream=True, **GREEDY)
    with pytest.raises(JobFailed, match="OutOfMemory"):
        list(job.stream(timeout=60))
    assert stream_entries(module_deployment, job.id)[-1].end.value == "FAILURE"


def test_a_job_cancelled_while_it_streams_raises_for_its_reader(
        module_deployment: Deployment, served: dict[str, str]) -> None:
    remote = remote_of(module_deployment, served, "llama")
    job = remote.submit(PROMPTS[0], timeout=60, stream=True, **GREEDY)
    wait_until(lambda: job.status() == "STARTED", 30, "the job to start")
    assert not job.cancel()  # running: it finishes, its result is discarded
    with pytest.raises(JobCancelled):
        list(job.stream(timeout=60))


def test_a_reader_never_hangs_on_a_job_that_will_not_run(module_deployment: Deployment,
                                                        models: dict[str, str],
                                                        tmp_path: Path) -> None:
    """A job of a route no worker serves, cancelled: its reader ends at once."""
    remote = module_deployment.remote(TASK, str(tmp_path / "nobody-serves-this"))
    job = remote.submit("hi", stream=True, require_worker=False, **GREEDY)
    job.cancel()
    started = time.monotonic()
    with pytest.raises(JobCancelled):
        list(job.stream(timeout=30))
    assert time.monotonic() - started < 5


# --- a worker killed mid-stream -----------------------------------------------------------------

VISIBILITY_S = 4


@pytest.fixture
def death_dep(redis_url: str, tmp_path: Path) -> Iterator[Deployment]:
    """A deployment whose dead workers' messages come back after VISIBILITY_S."""
    dep = Deployment(redis_url, tmp_path, visibility_timeout_s=VISIBILITY_S)
    yield dep
    dep.close()


def test_worker_killed_mid_stream(death_dep: Deployment, models: dict[str, str]) -> None:
    """SIGKILL while the text flows; the retry regenerates it (greedy): the reader yields
    one complete text equal to the local one, nothing twice, across two attempts."""
    dep, model = death_dep, models["llama"]
    params = {"max_new_tokens": 40, "do_sample": False}
    expected = transformers.pipeline(TASK, model=model)(
        PROMPTS[0], return_full_text=False, **params)[0]["generated_text"]
    slow = dep.start_worker(TASK, model, env={"PIPEQ_FAULTS": "step_ms=150"})
    remote = dep.remote(TASK, model)
    job = remote.submit(PROMPTS[0], timeout=120, stream=True, **params)
    pieces: list[str] = []
    for piece in job.stream(timeout=120):
        pieces.append(piece.text)
        if len(pieces) == 3:
            slow.stop(signal.SIGKILL)
            dep.start_worker(TASK, model)
    assert "".join(pieces) == expected
    entries = stream_entries(dep, job.id)
    attempts = [e.attempt for e in entries]
    assert attempts[0] == 1 and attempts[-1] == 2, attempts  # the dead attempt, then the retry
    assert entries[-1].end is not None and entries[-1].end.value == "SUCCESS"
    assert wait_until(lambda: job.status() == "SUCCESS", 10, "the job's record")
    assert int(dep.redis.hget(dep.settings.keys.result(job.id), "starts") or 0) == 2
