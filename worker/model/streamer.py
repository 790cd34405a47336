"""Streaming generated text out of a batched ``generate()`` call, row by row.

transformers' ``TextStreamer`` handles one sequence. :class:`BatchTextStreamer` handles a
batch: ``generate`` calls ``put`` with the prompt ids first (left-padded,
``num_return_sequences`` rows per input: row ``r`` is input ``r // n``, sequence ``r % n``),
then with one new token per row at each step. Each row of a job that streams has a
:class:`TextDecoder`; rows of other jobs cost nothing. Pieces go to the row's
:class:`JobTextSink`, and every sink is flushed once per step: the Redis sinks of a batch
share one writer, so one step is one pipelined round trip for the whole batch.

Any engine can drive the same parts: a continuous-batching loop keeps a
:class:`SequenceStream` per request that streams (its job's sink: ``JobInFlight.text``),
pushes each step's new tokens into it, flushes the sinks once per step, and calls
``finish`` (then flush) when the request ends; the route service closes the stream.
"""

from __future__ import annotations

import logging
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from transformers.generation.streamers import BaseStreamer

log = logging.getLogger("pipeq.worker")


class JobTextSink(Protocol):
    """Where the generated text of one streaming job goes (one sink per job and attempt).

    ``put`` may buffer; ``flush`` delivers what was put (call it once per decoding step,
    after the ``put`` of every row: sinks sharing a writer deliver together). An engine
    only puts and flushes: the route service closes the job's stream with its final state
    when the job ends (``RouteService.finish_jobs``), whatever engine ran it.
    """

    def put(self, index: int, seq: int, at: int, text: str) -> None:
        """``text`` continues sequence ``seq`` of input ``index`` at character ``at``.

        ``at`` is the length of that sequence's text before the piece: a run that starts
        again (a retried batch) puts from 0 again, and readers place the text by it.
        """

    def flush(self) -> None:
        """Deliver the pieces put since the last flush."""


@dataclass(frozen=True, slots=True)
class TextTarget:
    """Where a batch row's text goes: the job's sink and the input's index in the job."""

    sink: JobTextSink
    index: int


class TextDecoder:
    """Incremental detokenization of one sequence, in pieces that end at word boundaries.

    Joined, the pieces equal ``tokenizer.decode(all_tokens, **decode_kwargs)``: the text the
    text-generation pipeline returns. Each step decodes a short window (the tokens since
    the last stable point, with the chunk before it as context, so a tokenizer that drops
    or adds a leading space decodes as it would in the whole text); text ending in an
    unfinished UTF-8 character waits for the next token; a piece is given out only up to
    its last space (a later token may still change a word, as in TextStreamer) or whole at
    a newline or a CJK character. ``finish`` decodes everything once and gives the rest.
    """

    def __init__(self, tokenizer: Any, decode_kwargs: dict[str, Any]):
        self.tokenizer = tokenizer
        self.decode_kwargs = decode_kwargs
        self.tokens: list[int] = []
        #: The stable decoded text so far, and how much of it was given out.
        self.text = ""
        self.emitted = 0
        self._prefix = 0
        self._read = 0
        # Skipped special tokens (padding after EOS) decode to nothing: keep them out of
        # the windows, which would otherwise grow by one each step until the batch ends.
        self._skip = (frozenset(getattr(tokenizer, "all_special_ids", ()))
                      if decode_kwargs.get("skip_special_tokens", True) else frozenset())

    def push(self, token_ids: Sequence[int]) -> tuple[int, str]:
        """Add new tokens; return ``(at, piece)``, the text now ready (``""``: none yet)."""
        self.tokens.extend(t for t in token_ids if t not in self._skip)
        if len(self.tokens) > self._read:
            prefix = self._decode(self.tokens[self._prefix:self._read])
            full = self._decode(self.tokens[self._prefix:])
            if len(full) > len(prefix) and not full.endswith("\ufffd"):
                self.text = self.text + full[len(prefix):]
                self._prefix, self._read = self._read, len(self.tokens)
        return self._take(final=False)

    def finish(self) -> tuple[int, str]:
        """The rest of the text, from one decode of every token (the exact final text)."""
        exact = self._decode(self.tokens)
        if exact.startswith(self.text[:self.emitted]):
            self.text = exact
        else:  # cannot happen with the tokenizers we know; what was given out stands
            log.warning("streamed text diverged from the final decode: %.60r vs %.60r",
                        self.text[:self.emitted], exact)
        return self._take(final=True)

    def _decode(self, tokens: list[int]) -> str:
        text: str = self.tokenizer.decode(tokens, **self.decode_kwargs)
        return text

    def _take(self, final: bool) -> tuple[int, str]:
        at = self.emitted
        pending = self.text[at:]
        if pending and not final and not (pending.endswith("\n") or _is_cjk(pending[-1])):
            pending = pending[:pending.rfind(" ") + 1]
        self.emitted += len(pending)
        return at, pending


class SequenceStream:
    """One generated sequence's text, decoded as it grows, into its job's sink: the unit an
    engine drives (one per row here; one per request in a continuous-batching loop)."""

    def __init__(self, tokenizer: Any, decode_kwargs: dict[str, Any], sink: JobTextSink,
                 index: int, seq: int = 0):
        self.decoder = TextDecoder(tokenizer, decode_kwargs)
        self.sink = sink
        self.index = index
        self.seq = seq

    def push(self, token_ids: Sequence[int]) -> None:
        """New tokens of the sequence: put the text they complete (flush the sink later)."""
        self._put(*self.decoder.push(token_ids))

    def finish(self) -> None:
        """The sequence ended: put the rest of its text (flush the sink after)."""
        self._put(*self.decoder.finish())

    def _put(self, at: int, piece: str) -> None:
        if piece:
            self.sink.put(self.index, self.seq, at, piece)


def _is_cjk(char: str) -> bool:
    """True for CJK ideographs, which are words of their own (no space follows them)."""
    return unicodedata.name(char, "").startswith(("CJK UNIFIED", "CJK COMPATIBILITY"))


def decode_options(tokenizer: Any, params: dict[str, Any]) -> dict[str, Any]:
    """The ``decode`` options the text-generation pipeline's postprocess uses for ``params``."""
    skip = params.get("skip_special_tokens", True)
    if getattr(tokenizer, "response_template", None):
        skip = False  # (as the pipeline: such templates parse the special tokens)
    options: dict[str, Any] = {"skip_special_tokens": skip}
    if params.get("clean_up_tokenization_spaces") is not None:
        options["clean_up_tokenization_spaces"] = params["clean_up_tokenization_spaces"]
    return options


class BatchTextStreamer(BaseStreamer):
    """A ``generate(streamer=...)`` streamer for a batch whose rows belong to many jobs.

    ``generate`` puts the prompts first (already expanded: ``num_return_sequences`` rows
    per input), then one token per row and step, then calls ``end``.

    ``targets``: one per input of the batch, in order (None for inputs of jobs that do not
    stream). ``on_step`` runs after each decoding step (fault injection slows steps down).
    """

    def __init__(self, tokenizer: Any, targets: Sequence[TextTarget | None],
                 decode_kwargs: dict[str, Any], on_step: Callable[[], None] | None = None):
        self.tokenizer = tokenizer
        self.targets = list(targets)
        self.decode_kwargs = decode_kwargs
        self.on_step = on_step
        self._prompt_rows: int | None = None
        #: Per streaming row: (row, its sequence's stream); built at the first step.
        self._rows: list[tuple[int, SequenceStream]] | None = None
        self._sinks = _unique_sinks(t.sink for t in self.targets if t is not None)

    def put(self, value: Any) -> None:
        """The prompt ids (first call, ``[rows, length]``), then each step's new tokens."""
        if self._prompt_rows is None:
            self._prompt_rows = int(value.shape[0])
            return
        rows = int(value.shape[0])
        if self._rows is None:
            self._rows = self._layout(rows)
        tokens = value.reshape(rows, -1).tolist()
        for row, sequence in self._rows:
            sequence.push(tokens[row])
        self._flush()
        if self.on_step is not None:
            self.on_step()

    def end(self) -> None:
        """Generation ended: every streaming row gives the rest of its text."""
        for _, sequence in self._rows or ():
            sequence.finish()
        self._flush()

    def _layout(self, rows: int) -> list[tuple[int, SequenceStream]]:
        # (The prompts come expanded already: num_return_sequences rows per input.)
        if rows % len(self.targets) or rows != self._prompt_rows:
            raise RuntimeError(f"streamer for {len(self.targets)} inputs got {self._prompt_rows} "
                               f"prompt rows and {rows} rows")
        per_input = rows // len(self.targets)
        layout = []
        for row in range(rows):
            target = self.targets[row // per_input]
            if target is not None:
                layout.append((row, SequenceStream(self.tokenizer, self.decode_kwargs,
                                                   target.sink, target.index,
                                                   row % per_input)))
        return layout

    def _flush(self) -> None:
        for sink in self._sinks:
            sink.flush()


def _unique_sinks(sinks: Any) -> list[JobTextSink]:
    seen: dict[int, JobTextSink] = {}
    for sink in sinks:
        seen.setdefault(id(sink), sink)
    return list(seen.values())
