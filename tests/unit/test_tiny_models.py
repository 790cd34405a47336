"""The tiny random test models build fast, deterministically, and load via ``pipeline()``."""

from __future__ import annotations

import hashlib
import pathlib
from typing import Any

import pytest

pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from tiny_models import TEXT_TASKS, build_text_model  # noqa: E402 - after the skips

CALLS: dict[str, tuple[Any, dict[str, Any]]] = {
    "text-generation": ("hi", {"max_new_tokens": 5, "do_sample": False}),
    "feature-extraction": ("hello world", {}),
    "text-classification": ("I love this movie", {}),
    "token-classification": ("Alice lives in Paris", {"aggregation_strategy": "simple"}),
    "fill-mask": ("Alice lives in [MASK].", {"top_k": 2}),
    "zero-shot-classification": ("the match", {"candidate_labels": ["sports", "politics"]}),
}


@pytest.fixture(scope="module")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("tiny-models")


def _digest(path: pathlib.Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


def test_tasks_cover_calls() -> None:
    assert set(CALLS) == set(TEXT_TASKS)
    with pytest.raises(ValueError):
        build_text_model("no-such-task", pathlib.Path("/nonexistent"))


@pytest.mark.parametrize("task", TEXT_TASKS)
def test_loads_via_pipeline(task: str, models_root: pathlib.Path) -> None:
    path = build_text_model(task, models_root)
    assert path == models_root / task
    assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()
    pipe = transformers.pipeline(task, model=str(path), device="cpu")
    text, kwargs = CALLS[task]
    out = pipe(text, **kwargs)
    if task == "zero-shot-classification":
        assert out["labels"] and sorted(out["labels"]) == ["politics", "sports"]
    else:
        assert isinstance(out, list) and out
    if task == "text-generation":
        assert pipe.tokenizer.pad_token is None  # like distilgpt2
        assert out[0]["generated_text"].startswith("hi")
    if task == "text-classification":
        assert out[0]["label"] in {"negative", "neutral", "positive"}
    if task == "fill-mask":
        assert len(out) == 2


def test_build_deterministic_and_reused(models_root: pathlib.Path, tmp_path: pathlib.Path) -> None:
    for task in ("text-generation", "fill-mask"):
        first = build_text_model(task, models_root)
        before = _digest(first)
        mtime = (first / "model.safetensors").stat().st_mtime_ns
        assert build_text_model(task, models_root) == first
        assert (first / "model.safetensors").stat().st_mtime_ns == mtime  # reused, not rebuilt
        assert _digest(build_text_model(task, tmp_path)) == before  # a fresh build is identical
