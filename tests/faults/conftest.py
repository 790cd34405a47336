"""Fixtures shared by the fault tests: the tiny model and the local pipeline as truth."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import transformers
from fault_support import TASK
from tiny_models import build_text_model


@pytest.fixture(scope="module")
def model(models_dir: Path) -> str:
    """The tiny text-classification model."""
    return str(build_text_model(TASK, models_dir))


@pytest.fixture(scope="module")
def local(model: str) -> Any:
    """The local truth: transformers.pipeline() on the same model."""
    return transformers.pipeline(TASK, model=model)
