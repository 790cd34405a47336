"""Comparing remote results with local pipeline() results: exact, but floats within a tolerance.

Batching pads inputs, which moves float results in the last bits; labels, tokens, words,
offsets and structure must match exactly.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def assert_same(remote: Any, local: Any, *, tol: float = 1e-4, path: str = "result") -> None:
    """Assert ``remote`` equals ``local`` in structure and values (floats within ``tol``)."""
    if hasattr(local, "tolist") and not isinstance(local, (float, int)):
        local = local.tolist()  # numpy scalars and arrays
    if isinstance(local, dict):
        assert isinstance(remote, dict), f"{path}: expected dict, got {type(remote).__name__}"
        assert sorted(remote) == sorted(local), f"{path}: keys {sorted(remote)} != {sorted(local)}"
        for key in local:
            assert_same(remote[key], local[key], tol=tol, path=f"{path}[{key!r}]")
    elif isinstance(local, (list, tuple)):
        assert isinstance(remote, list), f"{path}: expected list, got {type(remote).__name__}"
        assert len(remote) == len(local), f"{path}: length {len(remote)} != {len(local)}"
        for i, (r, loc) in enumerate(zip(remote, local, strict=True)):
            assert_same(r, loc, tol=tol, path=f"{path}[{i}]")
    elif isinstance(local, float):
        assert isinstance(remote, (float, int)), f"{path}: {remote!r} is not a number"
        assert math.isclose(remote, local, rel_tol=tol, abs_tol=tol), f"{path}: {remote} != {local}"
    else:
        assert type(remote) is type(local) or isinstance(local, np.generic), (
            f"{path}: type {type(remote).__name__} != {type(local).__name__}")
        assert remote == local, f"{path}: {remote!r} != {local!r}"
