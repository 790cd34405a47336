"""Streaming's parts alone: the reader's rules (attempts, offsets), the incremental decoder
on both tiny tokenizers, and the batch streamer writing one round trip per step to Redis."""

from __future__ import annotations

import random
from typing import Any

import pytest
import redis
import torch
from tiny_models import _gpt2_tokenizer, _llama_tokenizer

from pipeq.core.config import Settings
from pipeq.core.contract import JobState
from pipeq.core.streams import StreamEntry, StreamPiece, TextAssembler, parse_entry
from pipeq.errors import JobFailed, StreamError
from pipeq.worker.batching.textsinks import TextStreams
from pipeq.worker.model.streamer import BatchTextStreamer, TextDecoder, TextTarget


def text(attempt: int, at: int, piece: str, index: int = 0, seq: int = 0) -> StreamEntry:
    return StreamEntry(attempt, index, seq, at, piece)


def feed(assembler: TextAssembler, *entries: StreamEntry) -> list[StreamPiece]:
    return [p for e in entries for p in assembler.add(e)]


def test_pieces_in_order_then_the_end() -> None:
    reader = TextAssembler("j")
    got = feed(reader, text(1, 0, "Hello "), text(1, 0, "world", seq=1), text(1, 6, "you"),
               text(1, 0, "x", index=1))
    assert got == [StreamPiece(0, 0, "Hello "), StreamPiece(0, 1, "world"),
                   StreamPiece(0, 0, "you"), StreamPiece(1, 0, "x")]
    assert feed(reader, StreamEntry(1, end=JobState.SUCCESS)) == [] and reader.end == "SUCCESS"


def test_a_retry_yields_only_what_extends_the_text_already_yielded() -> None:
    reader = TextAssembler("j")
    first = feed(reader, text(1, 0, "Once "), text(1, 5, "upon "))
    again = feed(reader, text(2, 0, "Once "), text(2, 5, "upon "), text(2, 10, "a "),
                 text(2, 12, "time"))
    assert "".join(p.text for p in first + again) == "Once upon a time"
    assert [p.text for p in again] == ["a ", "time"]
    # text of the dead attempt arriving late is never mixed in
    assert feed(reader, text(1, 10, "zzz ")) == []


def test_a_batch_rerun_inside_one_attempt_repeats_nothing() -> None:
    reader = TextAssembler("j")
    got = feed(reader, text(1, 0, "a "), text(1, 2, "b "), text(1, 0, "a "), text(1, 2, "b "),
               text(1, 4, "c"))
    assert "".join(p.text for p in got) == "a b c"


def test_a_retry_with_other_text_is_refused_not_mixed() -> None:
    reader = TextAssembler("j")
    feed(reader, text(1, 0, "Once "), text(1, 5, "upon "))
    with pytest.raises(StreamError, match=r"generated different text.*do_sample=False"):
        feed(reader, text(2, 0, "Twice "))


def test_a_trimmed_start_is_refused() -> None:
    with pytest.raises(StreamError, match=r"PIPEQ_STREAM_MAXLEN.*job\.result"):
        feed(TextAssembler("j"), text(1, 40, "late"))


def test_entries_parse_from_redis_replies() -> None:
    raw = {b"attempt": b"2", b"index": b"1", b"seq": b"0", b"at": b"3", b"text": b"hi"}
    assert parse_entry(raw) == StreamEntry(2, 1, 0, 3, "hi")
    assert parse_entry({b"attempt": b"1", b"end": b"FAILURE"}) == StreamEntry(
        1, end=JobState.FAILURE)
    assert parse_entry({b"what": b"ever"}) is None


def test_the_decoder_holds_back_half_characters() -> None:
    """Byte-level BPE decodes half a character as U+FFFD: no piece carries one, and the
    pieces still join to the whole text."""
    tokenizer = _gpt2_tokenizer()
    ids = tokenizer("café au lait, crème brûlée", add_special_tokens=False)["input_ids"]
    decoder = TextDecoder(tokenizer, {"skip_special_tokens": True})
    pieces = [decoder.push([t])[1] for t in ids] + [decoder.finish()[1]]
    assert not any("\ufffd" in piece for piece in pieces)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("make", [_gpt2_tokenizer, _llama_tokenizer], ids=["gpt2", "llama"])
def test_decoded_pieces_join_to_the_whole_decode(make: Any) -> None:
    tokenizer = make()
    rng = random.Random(7)
    sentences = ["The quick brown fox jumps over the lazy dog.\nOnce upon a time",
                 "Paris is the capital of France, Berlin of Germany. 42 and 2024"]
    for sentence in sentences:
        ids = tokenizer(sentence, add_special_tokens=False)["input_ids"]
        ids += [rng.randrange(len(tokenizer)) for _ in range(30)]  # and random tokens
        decoder = TextDecoder(tokenizer, {"skip_special_tokens": True})
        pieces: list[tuple[int, str]] = [decoder.push([t]) for t in ids]
        pieces.append(decoder.finish())
        whole = tokenizer.decode(ids, skip_special_tokens=True)
        assert "".join(p for _, p in pieces) == whole
        offsets = [at for at, p in pieces if p]
        assert offsets == sorted(offsets) and offsets[0] == 0
    clean = TextDecoder(tokenizer, {"skip_special_tokens": True})
    words = [clean.push([t])[1] for t in tokenizer("one two three four five")["input_ids"]]
    # word by word: no piece ends inside a word while more text may follow
    assert [w for w in words if w] and all(w.endswith(" ") for w in words if w)


def test_the_batch_streamer_writes_one_round_trip_per_step(settings: Settings) -> None:
    """Three inputs (two jobs stream, one does not), two sequences each: per step at most
    one pipelined call carries every piece of the batch; the end comes after the text."""
    client = redis.Redis.from_url(settings.redis_url_value())
    executes = 0
    original = client.pipeline

    def counting_pipeline(*args: Any, **kwargs: Any) -> Any:
        pipe = original(*args, **kwargs)
        real = pipe.execute

        def execute(*a: Any, **k: Any) -> Any:
            nonlocal executes
            executes += 1
            return real(*a, **k)

        pipe.execute = execute
        return pipe

    client.pipeline = counting_pipeline  # type: ignore[method-assign]
    streams = TextStreams(client, settings.keys, ttl_s=60, maxlen=1000)
    tokenizer = _llama_tokenizer()
    job_a, job_b = streams.sink("a", 1), streams.sink("b", 1)
    targets = [TextTarget(job_a, 0), None, TextTarget(job_b, 0)]
    streamer = BatchTextStreamer(tokenizer, targets, {"skip_special_tokens": True})
    words = tokenizer("one two three four five six", add_special_tokens=False)["input_ids"]
    streamer.put(torch.zeros((6, 3), dtype=torch.long))  # the prompts, 2 rows per input
    for token in words:
        streamer.put(torch.tensor([token] * 6))
    streamer.end()
    streams.end([("a", 1, JobState.SUCCESS), ("b", 1, JobState.SUCCESS)])
    assert executes <= len(words) + 2  # (steps that queued up behind a write go together)
    for job in ("a", "b"):
        entries = [parse_entry(f) for _, f in client.xrange(settings.keys.stream(job))]
        for seq in (0, 1):
            assert "".join(e.text for e in entries if e and e.end is None and e.seq == seq) \
                == "one two three four five six"
        assert entries[-1] == StreamEntry(1, end=JobState.SUCCESS)
        assert 0 < client.ttl(settings.keys.stream(job)) <= 60


def test_a_worker_refuses_a_forged_stream_request_for_another_task(settings: Settings) -> None:
    """A message that asks a non-generation route to stream (not sent by pipeq's client,
    which refuses it) fails with a message saying why, and no stream key is made."""
    from pipeq import pipeline
    from pipeq.client import Client
    from pipeq.core.config import RouteSpec
    from pipeq.worker.testing import EchoRunner, InProcessWorker

    remote = pipeline("text-classification", model="m", settings=settings)
    request = remote.build_request("hi", {}, 30).model_copy(update={"stream": True})
    spec = RouteSpec(task="text-classification", model="m", max_wait_ms=0)
    with InProcessWorker(settings, spec, EchoRunner()) as worker:
        Client.for_settings(settings).send(request)
        worker.drain()
    job = remote.job(request.job_id)
    with pytest.raises(JobFailed, match="stream=True is for text-generation routes"):
        job.result(5)
    client = redis.Redis.from_url(settings.redis_url_value())
    assert not client.exists(settings.keys.stream(request.job_id))
