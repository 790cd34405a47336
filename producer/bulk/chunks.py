"""The pieces of a bulk job: chunks of inputs, the jobs (pieces) answering them, and the
per-input error that answers an input which failed on its own."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from pipeq.core.store import JobRecord


@dataclass(frozen=True, slots=True)
class ItemError:
    """The error that answers one input of a bulk job (bad input, or the job failed on it)."""

    type: str
    message: str
    retryable: bool = False

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form, as ``pipeq bulk`` writes it."""
        return {"type": self.type, "message": self.message, "retryable": self.retryable}


class _Missing:
    """Marks an input not answered yet."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING = _Missing()


@dataclass(eq=False)
class Piece:
    """One job of a chunk: some of its inputs (by offset), and the future of the job's record."""

    offsets: list[int]
    job_id: str
    future: Future[JobRecord]
    attempts: int = 1
    deadline: float | None = None
    #: True once its record has been taken into the chunk's answers (or acted upon).
    settled: bool = False


@dataclass(eq=False)
class Chunk:
    """``items`` of a bulk job from input ``start`` on; ``answers`` fill in as jobs end."""

    number: int
    start: int
    items: list[Any]
    answers: list[Any] = field(default_factory=list)
    pieces: list[Piece] = field(default_factory=list)
    #: Set when the chunk will not be completed (the bulk job was cancelled).
    aborted: bool = False
    #: Offsets answered from the result cache (not to be stored in it again).
    cached: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        if not self.answers:
            self.answers = [MISSING] * len(self.items)

    @property
    def complete(self) -> bool:
        """True when every input has its answer."""
        return not any(a is MISSING for a in self.answers)

    @property
    def failures(self) -> int:
        """How many inputs are answered with an error."""
        return sum(isinstance(a, ItemError) for a in self.answers)

    def outstanding(self) -> list[Piece]:
        """Pieces whose jobs have not ended yet."""
        return [p for p in self.pieces if not p.future.done()]

    def ended(self) -> list[Piece]:
        """Pieces whose jobs have ended but whose records are not taken in yet."""
        return [p for p in self.pieces if not p.settled and p.future.done()]


@dataclass
class BulkStats:
    """Counters of one scheduler run (for summaries and benchmarks)."""

    resent: int = 0
    split: int = 0
    reattached: int = 0
    cache_hits: int = 0

