"""The producer's task list matches the installed transformers, and the producer stays light."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeq.core.tasks import REMOVED_TASKS, SUPPORTED_TASKS, TASK_ALIASES, canonical_task

ROOT = Path(__file__).resolve().parents[2]


def test_supported_tasks_equal_transformers() -> None:
    pipelines = pytest.importorskip("transformers.pipelines")
    installed = set(pipelines.get_supported_tasks())
    assert set(SUPPORTED_TASKS) - installed == set(), "pipeq.core.tasks lists tasks removed"
    assert installed - set(SUPPORTED_TASKS) == set(), "pipeq.core.tasks misses new tasks"


def test_task_aliases_equal_transformers() -> None:
    pipelines = pytest.importorskip("transformers.pipelines")
    assert dict(pipelines.TASK_ALIASES) == TASK_ALIASES


def test_removed_tasks_are_removed_in_transformers() -> None:
    """transformers itself refuses every task the producer calls removed."""
    pipelines = pytest.importorskip("transformers.pipelines")
    for task in REMOVED_TASKS:
        assert task not in pipelines.get_supported_tasks()
        with pytest.raises(KeyError, match="removed"):
            pipelines.check_task(task)


def test_every_supported_task_resolves_like_transformers() -> None:
    pipelines = pytest.importorskip("transformers.pipelines")
    for task in SUPPORTED_TASKS:
        normalized, _, _ = pipelines.check_task(task)
        assert canonical_task(task) == normalized, task


def test_producer_imports_no_torch_transformers_or_worker() -> None:
    """A web app that only submits jobs must not pay for torch (nor pull in the worker)."""
    code = (
        "import json, sys\n"
        "import pipeq, pipeq.client, pipeq.ops.cli, pipeq.bulk.mapping\n"
        "heavy = ('torch', 'transformers')\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in heavy\n"
        "                        or m.startswith('pipeq.worker'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == [], "producer imported heavy modules"
