"""Media envelopes into what ``pipeline()`` accepts: PIL images and ``{"raw", "sampling_rate"}``.

``pipeq.core.envelopes`` documents the envelope. Here a job's envelopes are
resolved on the worker's media threads (off the consumer's loop), before it reaches the
batcher:
claim-checked payloads are fetched in one round trip (and deleted when the job ends), image
bytes are decoded with Pillow, audio files with soundfile (wav, flac, ogg, mp3, aiff; mixed
down to mono as ffmpeg does for a local pipeline), numpy waveforms rebuilt exactly. URLs are
fetched only when the route allows it (``--allow-urls``; see ``pipeq.worker.model.fetch``).

What decoding costs is bounded before it is paid: an image's pixels are read from its header
(``max_image_pixels`` per input; 492 KB of PNG can hold 13000x13000 pixels), audio files are
bounded in duration (``max_audio_seconds``, which also bounds what resampling makes of a 1 Hz
"recording"), and the decoded images and audio of the jobs a worker holds share one budget
(``max_decoded_pixels``: image pixels plus audio samples, waited for; a job needing more than
all of it is refused).
"""

from __future__ import annotations

import base64
import binascii
import io
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis
from PIL import Image

from pipeq.core.contract import JobRequest
from pipeq.core.envelopes import MEDIA_KEY, claim_keys, is_envelope
from pipeq.core.keys import Keys
from pipeq.errors import ValidationError
from pipeq.worker.model.fetch import FetchPolicy, IpNetwork, fetch_url

#: Defaults of the settings of the same names (pipeq.core.config.Settings).
MAX_IMAGE_PIXELS = 50_000_000
MAX_DECODED_PIXELS = 200_000_000
MAX_AUDIO_SECONDS = 600.0
#: The highest rate a pipeline resamples audio to: bounds what a duration decodes to.
RESAMPLE_RATE_BOUND = 48_000


@dataclass(frozen=True, slots=True)
class MediaPolicy:
    """What a route accepts as media: URLs or not, and what one input may cost."""

    allow_urls: bool = False
    max_payload_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = MAX_IMAGE_PIXELS
    max_decoded_pixels: int = MAX_DECODED_PIXELS
    max_audio_seconds: float = MAX_AUDIO_SECONDS
    url_deadline_s: float = 15.0
    url_allow_networks: tuple[IpNetwork, ...] = field(default_factory=tuple)


class BudgetClosed(Exception):
    """The worker stops: a job waiting for room to decode its images is handed back."""


class PixelBudget:
    """Decoded image pixels (and audio samples) of the jobs a worker holds, shared: a job
    reserves them before decoding its images (waiting while others hold the budget) and
    frees them when it leaves the worker."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.used = 0
        self._held: dict[str, int] = {}
        self._cond = threading.Condition()
        self._closed = False

    def reserve(self, job_id: str, pixels: int, deadline: float | None) -> None:
        """Take ``pixels`` for ``job_id``; TimeoutError at ``deadline`` (time.time()),
        BudgetClosed once the worker stops."""
        with self._cond:
            while self.used + pixels > self.capacity or self._closed:
                if self._closed:
                    raise BudgetClosed()
                left = None if deadline is None else deadline - time.time()
                if left is not None and left <= 0:
                    raise TimeoutError(
                        "the worker's budget of decoded image pixels (PIPEQ_MAX_DECODED_PIXELS) "
                        "stayed taken by other jobs until this job's deadline")
                self._cond.wait(0.5 if left is None else min(left, 0.5))
            self.used += pixels
            self._held[job_id] = self._held.get(job_id, 0) + pixels

    def free(self, job_id: str) -> None:
        """Give back what ``job_id`` holds (nothing if it holds nothing)."""
        with self._cond:
            self.used -= self._held.pop(job_id, 0)
            self._cond.notify_all()

    def close(self) -> None:
        """The worker stops: every waiter (and every later reservation) gets BudgetClosed."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class MediaResolver:
    """Resolves and releases the media inputs of jobs for one route."""

    def __init__(self, client: redis.Redis, keys: Keys, policy: MediaPolicy):
        self.client = client
        self.keys = keys
        self.policy = policy
        self.budget = PixelBudget(policy.max_decoded_pixels)
        self.fetch_policy = FetchPolicy(policy.url_deadline_s, policy.max_payload_bytes,
                                        policy.url_allow_networks)

    def resolve(self, request: JobRequest) -> list[Any]:
        """The job's inputs as the pipeline takes them; ValidationError for bad media."""
        keys = claim_keys(request.inputs)
        for key in keys:
            _, _, part = key.rpartition(":")
            if not part.isdigit() or key != self.keys.payload(request.job_id, int(part)):
                raise ValidationError(f"claim key {key!r} does not belong to this job")
        fetched: list[Any] = self.client.mget(keys) if keys else []
        payloads = dict(zip(keys, fetched, strict=True))
        missing = [k for k, v in payloads.items() if v is None]
        if missing:
            raise ValidationError(
                f"{len(missing)} media payload(s) of this job are no longer in Redis (they "
                "expire with the job's deadline, and are deleted once the job ended)"
            )
        items = [self._decode(item, payloads, f"input #{i}")
                 for i, item in enumerate(request.inputs)]
        images = [image for item in items for image in _images(item)]
        pixels = sum(image.width * image.height for image in images)
        samples = sum(_samples(item) for item in items)  # decoded already (from the header)
        if pixels + samples > self.budget.capacity:
            held = (f"images hold {pixels:,} pixels" if pixels else
                    f"audio holds {samples:,} samples")
            raise ValidationError(
                f"the job's {held} decoded, over this worker's limit of "
                f"{self.budget.capacity:,} (PIPEQ_MAX_DECODED_PIXELS): send fewer or smaller "
                "inputs per job")
        if pixels + samples:
            self.budget.reserve(request.job_id, pixels + samples, request.deadline)
        for index, image in enumerate(images):
            load_image(image, f"image {index} of the job")
        return items

    def release(self, request: JobRequest) -> None:
        """Delete the job's claim-checked payloads (the job has ended)."""
        keys = claim_keys(request.inputs)
        if keys:
            self.client.delete(*keys)

    def _decode(self, value: Any, payloads: dict[str, Any], where: str) -> Any:
        if is_envelope(value):
            return self._decode_envelope(value, payloads, where)
        if isinstance(value, dict):
            return {k: self._decode(v, payloads, f"{where} {k!r}") for k, v in value.items()}
        if isinstance(value, list):
            return [self._decode(v, payloads, where) for v in value]
        return value

    def _decode_envelope(self, envelope: dict[str, Any], payloads: dict[str, Any],
                         where: str) -> Any:
        if "url" in envelope:
            data = self._fetch(str(envelope["url"]), where)
        elif "claim" in envelope:
            data = payloads[envelope["claim"]] or b""
        else:
            try:
                data = base64.b64decode(envelope["data"], validate=True)
            except (binascii.Error, ValueError):
                raise ValidationError(f"{where}: media data is not valid base64") from None
        if len(data) > self.policy.max_payload_bytes:
            raise ValidationError(f"{where} is {len(data):,} bytes, over this route's payload "
                                  f"limit of {self.policy.max_payload_bytes:,} bytes")
        if envelope[MEDIA_KEY] == "image":
            return open_image(data, where, self.policy.max_image_pixels)
        if envelope.get("format") == "pcm":
            return decode_pcm(data, envelope, where, self.policy.max_audio_seconds)
        return decode_audio_file(data, where, self.policy.max_audio_seconds)

    def _fetch(self, url: str, where: str) -> bytes:
        if not self.policy.allow_urls:
            raise ValidationError(
                f"{where} is a URL, and this route does not fetch URLs: send the bytes instead, "
                "or start its worker with --allow-urls (allow_urls = true in routes.toml)"
            )
        return fetch_url(url, where, self.fetch_policy)


def _images(item: Any) -> list[Image.Image]:
    """The (opened, not yet decoded) images in a resolved input."""
    if isinstance(item, Image.Image):
        return [item]
    if isinstance(item, dict):
        return [image for value in item.values() for image in _images(value)]
    if isinstance(item, list):
        return [image for value in item for image in _images(value)]
    return []


def _samples(item: Any) -> int:
    """Decoded audio samples in a resolved input (counted in the same budget as pixels)."""
    if isinstance(item, np.ndarray):
        return int(item.size)
    if isinstance(item, dict):
        return sum(_samples(value) for value in item.values())
    if isinstance(item, list):
        return sum(_samples(value) for value in item)
    return 0


def open_image(data: bytes, where: str, max_pixels: int) -> Image.Image:
    """Image file bytes as a PIL image whose header was read and checked, not yet decoded:
    its decoded size is known (width x height) before its memory is spent."""
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
    except Image.DecompressionBombError:
        raise ValidationError(f"{where} has far more pixels than the limit of {max_pixels:,} per "
                              "image (PIPEQ_MAX_IMAGE_PIXELS): scale it down before "
                              "sending") from None
    except Exception as exc:  # Pillow raises many types for damaged files
        raise ValidationError(f"{where}: cannot decode the image: {exc}") from None
    if width * height > max_pixels:
        raise ValidationError(
            f"{where} is {width}x{height} = {width * height:,} pixels, over the limit of "
            f"{max_pixels:,} per image (PIPEQ_MAX_IMAGE_PIXELS): scale it down before sending")
    image.info["pipeq_where"] = where
    return image


def load_image(image: Image.Image, where: str) -> None:
    """Decode an opened image here, on the job's media thread, not on the batching thread."""
    try:
        image.load()
    except Exception as exc:  # Pillow raises many types for damaged files
        raise ValidationError(
            f"{image.info.get('pipeq_where', where)}: cannot decode the image: {exc}") from None


def decode_image(data: bytes, where: str, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Image file bytes as a loaded PIL image (the pipeline applies EXIF and RGB itself)."""
    image = open_image(data, where, max_pixels)
    load_image(image, where)
    return image


def check_duration(samples: int, rate: int, where: str, max_seconds: float) -> None:
    """Refuse audio longer than ``max_seconds`` (what resampling would make of it too)."""
    if rate <= 0 or samples / rate > max_seconds:
        raise ValidationError(
            f"{where} is {samples:,} samples at {rate} Hz ({samples / max(rate, 1):,.0f}s), over "
            f"the limit of {max_seconds:g}s of audio per input (PIPEQ_MAX_AUDIO_SECONDS): "
            "cut it into shorter pieces")


def decode_audio_file(data: bytes, where: str,
                      max_seconds: float = MAX_AUDIO_SECONDS) -> dict[str, Any]:
    """Audio file bytes as ``{"raw": mono float32, "sampling_rate": rate}``; the duration is
    read from the header and checked before the samples are decoded, and the decode itself
    stops at the limit (a header may lie)."""
    import soundfile

    try:
        info = soundfile.info(io.BytesIO(data))
        rate = int(info.samplerate)
        frames = int(info.frames) if 0 <= info.frames < 2**62 else 0
        channels = max(1, int(info.channels))
    except Exception as exc:  # soundfile raises LibsndfileError, RuntimeError, TypeError ...
        raise ValidationError(f"{where}: cannot decode the audio file: {exc}") from None
    check_duration(frames, rate, where, max_seconds)
    # Decoded floats: at most two channels at twice the highest pipeline rate for that long.
    most = min(int(rate * max_seconds), int(2 * RESAMPLE_RATE_BOUND * max_seconds) // channels)
    if frames > most:
        raise ValidationError(
            f"{where} decodes to {frames * channels:,} samples ({channels} channel(s) at "
            f"{rate} Hz), over what {max_seconds:g}s of audio may take "
            "(PIPEQ_MAX_AUDIO_SECONDS): resample or cut it before sending")
    most += 1
    try:
        samples, rate = soundfile.read(io.BytesIO(data), frames=most, dtype="float32",
                                       always_2d=True)
    except Exception as exc:  # soundfile raises LibsndfileError, RuntimeError, TypeError ...
        raise ValidationError(f"{where}: cannot decode the audio file: {exc}") from None
    if samples.shape[0] >= most:
        raise ValidationError(f"{where} holds more audio than its header says, over the limit "
                              f"of {max_seconds:g}s (PIPEQ_MAX_AUDIO_SECONDS)")
    mono = samples[:, 0] if samples.shape[1] == 1 else samples.mean(axis=1, dtype=np.float32)
    return {"raw": np.ascontiguousarray(mono), "sampling_rate": int(rate)}


def decode_pcm(data: bytes, envelope: dict[str, Any], where: str,
               max_seconds: float = MAX_AUDIO_SECONDS) -> Any:
    """A numpy waveform exactly as sent: bare, or with its sampling rate."""
    dtype = np.dtype(envelope["dtype"]).newbyteorder("<")
    try:
        samples = np.frombuffer(data, dtype=dtype).reshape(envelope["shape"])
    except ValueError as exc:
        raise ValidationError(f"{where}: pcm payload does not match its shape: {exc}") from None
    rate = envelope.get("sampling_rate")
    # Without a rate the pipeline takes the model's own; bound it by the highest one.
    check_duration(int(samples.shape[-1]) if samples.ndim else 0,
                   int(rate) if rate is not None else RESAMPLE_RATE_BOUND, where, max_seconds)
    samples = samples.astype(samples.dtype.newbyteorder("="))  # native order, writable copy
    return samples if rate is None else {"raw": samples, "sampling_rate": rate}


def media_length(item: Any) -> int | None:
    """The batching length of a decoded media input (None if ``item`` is not media).

    Audio: its sample count (so similar durations share a batch and padding stays small);
    images: width x height.
    """
    if isinstance(item, Image.Image):
        width, height = item.size
        return width * height
    if isinstance(item, dict) and isinstance(item.get("raw"), np.ndarray):
        return int(item["raw"].shape[-1])
    if isinstance(item, np.ndarray):
        return int(item.shape[-1]) if item.ndim else 0
    return None


#: Image tasks whose pipeline runs on an image alone (plus, for zero-shot, labels).
_IMAGE_WARMUP = {"image-classification": {}, "image-segmentation": {}, "object-detection": {},
                 "depth-estimation": {}, "image-feature-extraction": {},
                 "zero-shot-image-classification": {"candidate_labels": ["a", "b"]},
                 "zero-shot-object-detection": {"candidate_labels": ["a", "b"]}}
_AUDIO_WARMUP = {"audio-classification": {}, "automatic-speech-recognition": {},
                 "zero-shot-audio-classification": {"candidate_labels": ["a", "b"]}}


def media_warmup_call(pipe: Any) -> tuple[list[Any], dict[str, Any]] | None:
    """A warm-up batch for image and audio routes: a small picture, half a second of tone."""
    task = pipe.task
    if task in _IMAGE_WARMUP:
        gradient = np.tile(np.arange(64, dtype=np.uint8) * 4, (48, 1))
        image = Image.fromarray(np.stack([gradient] * 3, axis=-1), "RGB")
        return [image, image.resize((48, 64))], dict(_IMAGE_WARMUP[task])
    if task in _AUDIO_WARMUP:
        extractor = getattr(pipe, "feature_extractor", None)
        rate = int(getattr(extractor, "sampling_rate", 16_000))
        tone = (0.1 * np.sin(np.arange(rate // 2) * (2 * np.pi * 440 / rate))).astype(np.float32)
        return [{"raw": tone, "sampling_rate": rate}], dict(_AUDIO_WARMUP[task])
    return None
