"""The pipeline task names pipeq serves, known without importing transformers.

The producer must validate task names but may not import transformers (it stays light),
so the list lives here. ``tests/unit/test_supported_tasks.py`` checks it against
``transformers.pipelines.get_supported_tasks()`` of the version the worker extra pins.
"""

from __future__ import annotations

from pipeq.errors import UnsupportedTaskError

#: transformers 5.24 ``get_supported_tasks()`` (aliases included).
SUPPORTED_TASKS: frozenset[str] = frozenset(
    {
        "any-to-any",
        "audio-classification",
        "automatic-speech-recognition",
        "decision",
        "depth-estimation",
        "document-question-answering",
        "feature-extraction",
        "fill-mask",
        "image-classification",
        "image-feature-extraction",
        "image-segmentation",
        "image-text-to-text",
        "keypoint-matching",
        "mask-generation",
        "ner",
        "object-detection",
        "sentiment-analysis",
        "table-question-answering",
        "text-classification",
        "text-generation",
        "text-to-audio",
        "text-to-speech",
        "token-classification",
        "video-classification",
        "zero-shot-audio-classification",
        "zero-shot-classification",
        "zero-shot-image-classification",
        "zero-shot-object-detection",
    }
)

#: transformers ``TASK_ALIASES``: alias -> canonical task name.
TASK_ALIASES: dict[str, str] = {
    "sentiment-analysis": "text-classification",
    "ner": "token-classification",
    "text-to-speech": "text-to-audio",
}

#: Tasks transformers 5 removed; asking for them gets an error that says so.
REMOVED_TASKS: frozenset[str] = frozenset(
    {"question-answering", "summarization", "translation", "text2text-generation"}
)


def canonical_task(task: str) -> str:
    """Return the canonical name of ``task`` (aliases resolved), or raise UnsupportedTaskError."""
    if not isinstance(task, str) or not task:
        raise UnsupportedTaskError(f"task must be a non-empty string, got {task!r}")
    name = task.strip().lower()
    if name.startswith("translation_"):
        name = "translation"
    if name in REMOVED_TASKS:
        raise UnsupportedTaskError(
            f"task {task!r} was removed in transformers 5 and is not served; "
            "use 'text-generation' with an instruction-tuned model instead"
        )
    if name not in SUPPORTED_TASKS:
        raise UnsupportedTaskError(
            f"unknown task {task!r}; supported tasks: {', '.join(sorted(SUPPORTED_TASKS))}"
        )
    return TASK_ALIASES.get(name, name)
