"""What decoding media may cost: pixels per image from the header, the worker's decoded-pixel
budget, audio duration before decoding (tests/faults/test_hostile_media.py runs the same
probes against real workers)."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
from PIL import Image
from tiny_media_models import image_bytes, sample_image, wav_bytes

from pipeq.errors import ValidationError
from pipeq.worker.model.media import (
    BudgetClosed,
    PixelBudget,
    decode_audio_file,
    decode_pcm,
    open_image,
)


def test_an_image_over_the_pixel_limit_is_refused_from_its_header() -> None:
    data = image_bytes(sample_image(400, 300))
    image = open_image(data, "input #0", max_pixels=120_000)
    assert image.size == (400, 300)
    with pytest.raises(ValidationError, match=r"input #0 is 400x300 = 120,000 pixels, over the "
                                              r"limit of 119,999 per image"):
        open_image(data, "input #0", max_pixels=119_999)


def test_an_opened_image_is_not_decoded_yet() -> None:
    image = open_image(image_bytes(sample_image(64, 48)), "x", max_pixels=10**6)
    assert image._im is None  # Pillow: no pixel data yet
    image.load()
    assert image._im is not None


def test_the_budget_makes_jobs_take_turns_and_frees_what_a_job_held() -> None:
    budget = PixelBudget(100)
    budget.reserve("a", 60, None)
    got: list[str] = []

    def second() -> None:
        budget.reserve("b", 60, time.time() + 10)
        got.append("b")

    waiter = threading.Thread(target=second)
    waiter.start()
    time.sleep(0.2)
    assert got == [] and budget.used == 60  # b waits for room
    budget.free("a")
    waiter.join(5)
    assert got == ["b"] and budget.used == 60
    budget.free("b")
    budget.free("never-reserved")
    assert budget.used == 0


def test_a_budget_wait_ends_at_the_deadline_and_when_the_worker_stops() -> None:
    budget = PixelBudget(100)
    budget.reserve("a", 100, None)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="PIPEQ_MAX_DECODED_PIXELS"):
        budget.reserve("b", 1, time.time() + 0.3)
    assert time.monotonic() - started < 2
    stopped: list[BaseException] = []

    def wait() -> None:
        try:
            budget.reserve("c", 1, None)
        except BudgetClosed as exc:
            stopped.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.1)
    budget.close()
    waiter.join(5)
    assert len(stopped) == 1
    with pytest.raises(BudgetClosed):
        budget.reserve("d", 1, None)  # nothing starts decoding once the worker stops


def test_audio_longer_than_the_limit_is_refused_before_decoding() -> None:
    data = wav_bytes(np.zeros(11 * 1000, dtype=np.float32), rate=1000, subtype="PCM_16")
    assert decode_audio_file(data, "x", max_seconds=11)["raw"].shape == (11_000,)
    with pytest.raises(ValidationError, match=r"11,000 samples at 1000 Hz \(11s\), over the "
                                              r"limit of 10s of audio per input"):
        decode_audio_file(data, "x", max_seconds=10)


def test_a_waveform_at_one_hertz_is_refused() -> None:
    samples = np.zeros(1000, dtype=np.float32)
    envelope = {"$media": "audio", "format": "pcm", "dtype": "float32", "shape": [1000],
                "sampling_rate": 1}
    with pytest.raises(ValidationError, match="1,000 samples at 1 Hz"):
        decode_pcm(samples.tobytes(), envelope, "x", max_seconds=600)
    envelope["sampling_rate"] = 16_000
    assert decode_pcm(samples.tobytes(), envelope, "x", max_seconds=600)["raw"].shape == (1000,)


def test_pillows_own_bomb_limit_reads_as_ours() -> None:
    buffer = io.BytesIO()
    Image.new("1", (20_000, 10_000)).save(buffer, format="PNG")  # 200 M one-bit pixels
    with pytest.raises(ValidationError, match="far more pixels than the limit"):
        open_image(buffer.getvalue(), "x", max_pixels=10**12)


def test_the_producer_refuses_too_many_pixels_before_enqueueing() -> None:
    from pipeq.media import sniff_image

    data = image_bytes(sample_image(400, 300))
    assert sniff_image(data, "x", max_pixels=120_000) == "png"
    with pytest.raises(ValidationError, match=r"the input is 400x300 = 120,000 pixels, over the "
                                              r"limit of 100,000 per image"):
        sniff_image(data, "the input", max_pixels=100_000)


def test_decoded_audio_counts_in_the_same_budget() -> None:
    import base64

    from pipeq.core.contract import JobRequest, Route, new_job_id
    from pipeq.core.keys import Keys
    from pipeq.worker.model.media import MediaPolicy, MediaResolver

    samples = np.zeros(2000, dtype=np.float32)
    envelope = {"$media": "audio", "format": "pcm", "dtype": "float32", "shape": [2000],
                "sampling_rate": 16_000, "data": base64.b64encode(samples.tobytes()).decode()}
    route = Route(task="audio-classification", model="m")

    def request() -> JobRequest:
        return JobRequest(job_id=new_job_id(), route=route, inputs=[envelope], single=True,
                          submitted_at=time.time(), deadline=time.time() + 5)

    roomy = MediaResolver(None, Keys("t"), MediaPolicy(max_decoded_pixels=2000))  # type: ignore[arg-type]
    first = request()
    assert roomy.resolve(first)[0]["raw"].shape == (2000,)
    assert roomy.budget.used == 2000
    roomy.budget.free(first.job_id)
    tight = MediaResolver(None, Keys("t"), MediaPolicy(max_decoded_pixels=1999))  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="the job's audio holds 2,000 samples decoded, "
                                              "over this worker's limit of 1,999"):
        tight.resolve(request())
