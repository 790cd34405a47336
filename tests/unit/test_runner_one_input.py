"""A batch of one skips torch's DataLoader and still answers exactly like the DataLoader path.

Real tiny pipelines (``tiny_models``) and the bundled MiniLM, each task's pipeline class
(plain and chunked: token-classification and zero-shot-classification are ChunkPipelines).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
from tiny_models import build_text_model

from pipeq.core.config import RouteSpec
from pipeq.worker.model.loader import load_pipeline
from pipeq.worker.model.runner import PipelineRunner, skips_data_loader

TEXTS = ["Hello, my name is Alice and I live in Paris.", "hi there"]
CALLS: list[tuple[str, list[Any], dict[str, Any]]] = [
    ("feature-extraction", TEXTS, {}),
    ("text-classification", TEXTS, {"top_k": 2}),
    ("token-classification", TEXTS, {"aggregation_strategy": "simple"}),
    ("zero-shot-classification", TEXTS, {"candidate_labels": ["animal", "river", "greeting"]}),
    ("fill-mask", ["Paris is the [MASK] of France."], {"top_k": 3}),
    ("text-generation", ["Once upon a time"], {"max_new_tokens": 4, "do_sample": False}),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("one-input")


class NoDataLoader:
    def __init__(self, *args: Any, **kwargs: Any):
        raise AssertionError("a batch of one built a DataLoader")


@pytest.mark.parametrize(("task", "inputs", "params"), CALLS, ids=[c[0] for c in CALLS])
def test_a_batch_of_one_answers_like_the_data_loader_path(
        task: str, inputs: list[Any], params: dict[str, Any], tiny: Path, minilm_path: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers.pipelines.base as base

    model = minilm_path if task == "feature-extraction" else str(build_text_model(task, tiny))
    spec = RouteSpec(task=task, model=model)
    runner = PipelineRunner(load_pipeline(spec, "cpu"))
    assert skips_data_loader(runner.pipe)
    reference = PipelineRunner(load_pipeline(spec, "cpu"))
    del reference.pipe.get_iterator  # back to transformers' own: through the DataLoader
    loaders: list[Any] = []
    real_loader = base.DataLoader

    def counted(*args: Any, **kwargs: Any) -> Any:
        loaders.append(args)
        return real_loader(*args, **kwargs)

    monkeypatch.setattr(base, "DataLoader", counted)
    expected = [reference.run([x], params) for x in inputs]
    assert len(loaders) == len(inputs)  # the reference did go through the DataLoader
    monkeypatch.setattr(base, "DataLoader", NoDataLoader)
    assert [runner.run([x], params) for x in inputs] == expected
    with pytest.raises(AssertionError, match="DataLoader"):  # batches of two still use it
        runner.run(inputs * 2, params)


def test_the_iterator_is_the_instances_own(tiny: Path) -> None:
    """An instance copied from a runner's pipe calls its own preprocess, not the original's
    (``copy.copy`` keeps instance attributes bound to the original)."""
    from pipeq.worker.model.instances import replicate

    spec = RouteSpec(task="text-classification", model=str(build_text_model(
        "text-classification", tiny)))
    original = PipelineRunner(load_pipeline(spec, "cpu"))
    copy = replicate(original, 2)[1]
    seen: list[str] = []
    preprocess = copy.pipe.preprocess

    def spy(inputs: Any, **kwargs: Any) -> Any:
        seen.append(inputs)
        return preprocess(inputs, **kwargs)

    copy.pipe.preprocess = spy
    assert copy.run(["hi there"], {}) == original.run(["hi there"], {})
    assert seen == ["hi there"]


def test_a_custom_get_iterator_is_left_alone() -> None:
    from transformers.pipelines.base import Pipeline

    class Custom(Pipeline):
        _sanitize_parameters = preprocess = _forward = postprocess = None

        def get_iterator(self, *args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError

    assert not skips_data_loader(Custom.__new__(Custom))
