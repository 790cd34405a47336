"""The progress bar of ``pipeq bulk`` (tqdm, on a terminal only) and notes beside it."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

_tqdm_bar: Any = None


def note(message: str) -> None:
    """A line on stderr that does not break the progress bar."""
    if _tqdm_bar is not None:
        _tqdm_bar.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr)


def progress_bar(total: int, initial: int, quiet: bool) -> Callable[..., None]:
    """A progress callback: a tqdm bar on a terminal (done/total, rate, ETA, failures)."""
    global _tqdm_bar
    from tqdm import tqdm

    # disable=None: tqdm stays quiet when stderr is not a terminal (logs, CI, pipes).
    bar = tqdm(total=total, initial=initial, unit="inputs", file=sys.stderr,
               disable=True if quiet else None, dynamic_ncols=True, smoothing=0.1)
    _tqdm_bar = bar if not bar.disable else None

    def update(count: int, failed: int, close: bool = False) -> None:
        global _tqdm_bar
        if count:
            bar.set_postfix(failed=failed, refresh=False)
            bar.update(count)
        if close:
            bar.close()
            _tqdm_bar = None

    return update
