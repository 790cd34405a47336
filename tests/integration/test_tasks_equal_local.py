"""Every text task through the queue returns what the local pipeline() returns.

One real worker process per task (tiny random models built in fixtures, plus the real
all-MiniLM-L6-v2), compared with ``transformers.pipeline()`` in this process on the same
inputs and parameters, for single inputs and lists alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import transformers
from compare import assert_same
from conftest import Deployment
from tiny_models import TEXT_TASKS, build_text_model

SHORT = "hello world"
LONG = "the quick brown fox jumps over the lazy dog near the river bank " * 3

CASES: list[tuple[str, Any, dict[str, Any]]] = [
    ("text-generation", SHORT, {"max_new_tokens": 6, "do_sample": False}),
    ("text-generation", [SHORT, LONG, "a"], {"max_new_tokens": 5, "do_sample": False}),
    ("text-generation", [SHORT, LONG],
     {"max_new_tokens": 4, "do_sample": False, "num_beams": 2, "num_return_sequences": 2}),
    ("text-generation", SHORT, {"max_new_tokens": 4, "do_sample": False,
                                "return_full_text": False}),
    ("feature-extraction", SHORT, {}),
    ("feature-extraction", [SHORT, LONG, "x"], {}),
    ("text-classification", SHORT, {}),
    ("text-classification", [SHORT, LONG], {}),
    ("text-classification", SHORT, {"top_k": 2}),
    ("text-classification", [SHORT], {"top_k": 1}),
    ("text-classification", {"text": SHORT, "text_pair": LONG}, {}),
    ("sentiment-analysis", [LONG, SHORT], {}),
    ("token-classification", SHORT, {}),
    ("token-classification", [LONG, SHORT], {"aggregation_strategy": "simple"}),
    ("ner", SHORT, {"aggregation_strategy": "first"}),
    ("fill-mask", "hello [MASK] world", {}),
    ("fill-mask", ["hello [MASK] world"], {"top_k": 2}),
    ("fill-mask", ["hello [MASK]", "the [MASK] fox jumps over the [MASK] dog"], {"top_k": 3}),
    ("zero-shot-classification", SHORT, {"candidate_labels": ["animal", "river", "greeting"]}),
    ("zero-shot-classification", [SHORT, LONG],
     {"candidate_labels": ["animal", "river"], "multi_label": True}),
]

CANONICAL = {"sentiment-analysis": "text-classification", "ner": "token-classification"}


@pytest.fixture(scope="module")
def served(module_deployment: Deployment, models_dir: Path) -> dict[str, str]:
    """A ready worker per text task; returns task -> model directory."""
    paths = {task: str(build_text_model(task, models_dir)) for task in TEXT_TASKS}
    workers = [module_deployment.start_worker(task, path, ready=False)
               for task, path in paths.items()]
    for worker in workers:
        worker.wait_ready()
    return paths


@pytest.fixture(scope="module")
def local_pipes(served: dict[str, str]) -> dict[str, Any]:
    """The local truth: plain transformers.pipeline() per task."""
    return {task: transformers.pipeline(task, model=path) for task, path in served.items()}


@pytest.mark.parametrize(("task", "inputs", "params"), CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_remote_equals_local(module_deployment: Deployment, served: dict[str, str],
                             local_pipes: dict[str, Any], task: str, inputs: Any,
                             params: dict[str, Any]) -> None:
    canonical = CANONICAL.get(task, task)
    remote = module_deployment.remote(task, served[canonical])
    expected = local_pipes[canonical](inputs, **params)
    got = remote(inputs, timeout=60, **params)
    assert_same(got, expected)


def test_concurrent_jobs_batch_and_still_match(module_deployment: Deployment,
                                               served: dict[str, str],
                                               local_pipes: dict[str, Any]) -> None:
    """Many jobs at once end up in shared batches and each still gets its own result."""
    remote = module_deployment.remote("text-classification", served["text-classification"])
    texts = [f"{SHORT} {'word ' * (i % 7)}{i}" for i in range(40)]
    jobs = [remote.submit(t) for t in texts]
    for text, job in zip(texts, jobs, strict=True):
        assert_same(job.result(60), local_pipes["text-classification"](text))


def test_minilm_matches_local(module_deployment: Deployment, minilm_path: str) -> None:
    """The real all-MiniLM-L6-v2: token embeddings equal the local pipeline's."""
    module_deployment.start_worker("feature-extraction", minilm_path)
    remote = module_deployment.remote("feature-extraction", minilm_path)
    local = transformers.pipeline("feature-extraction", model=minilm_path)
    texts = ["A man is eating food.", "A man is riding a white horse on an enclosed ground.",
             "Someone"]
    assert_same(remote(texts), local(texts), tol=1e-4)
    assert_same(remote(texts[1]), local(texts[1]), tol=1e-4)
