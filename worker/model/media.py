"""Media envelopes into what ``pipeline()`` accepts: PIL images and ``{"raw", "sampling_rate"}``.

``pipeq.core.envelopes`` documents the envelope. Here a job's envelopes are
resolved on the worker's media threads (off the consumer's loop), before it reaches the
batcher:
claim-checked payloads are fetched in one round trip (and deleted when the job ends), image
bytes are decoded with Pillow, audio files with soundfile (wav, flac, ogg, mp3, aiff; mixed
down to mono as ffmpeg does for a local pipeline), numpy waveforms rebuilt exactly. URLs are
fetched only when the route allows it (``--allow-urls``), within the payload limit.
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis
from PIL import Image

from pipeq.core.contract import JobRequest
from pipeq.core.envelopes import MEDIA_KEY, claim_keys, is_envelope
from pipeq.core.keys import Keys
from pipeq.errors import ValidationError

URL_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class MediaPolicy:
    """What a route accepts as media: URLs or not, and the payload size limit."""

    allow_urls: bool = False
    max_payload_bytes: int = 32 * 1024 * 1024


class MediaResolver:
    """Resolves and releases the media inputs of jobs for one route."""

    def __init__(self, client: redis.Redis, keys: Keys, policy: MediaPolicy):
        self.client = client
        self.keys = keys
        self.policy = policy

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
        return [self._decode(item, payloads, f"input #{i}")
                for i, item in enumerate(request.inputs)]

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
            data = self._fetch(envelope["url"], where)
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
            return decode_image(data, where)
        if envelope.get("format") == "pcm":
            return decode_pcm(data, envelope, where)
        return decode_audio_file(data, where)

    def _fetch(self, url: str, where: str) -> bytes:
        if not self.policy.allow_urls:
            raise ValidationError(
                f"{where} is a URL, and this route does not fetch URLs: send the bytes instead, "
                "or start its worker with --allow-urls (allow_urls = true in routes.toml)"
            )
        limit = self.policy.max_payload_bytes
        try:
            with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as response:
                data: bytes = response.read(limit + 1)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise ValidationError(f"{where}: cannot fetch {url}: {exc}") from None
        if len(data) > limit:
            raise ValidationError(f"{where}: {url} is larger than this route's payload limit "
                                  f"of {limit:,} bytes")
        return data


def decode_image(data: bytes, where: str) -> Image.Image:
    """Image file bytes as a loaded PIL image (the pipeline applies EXIF and RGB itself)."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # decode here, on the job's thread, not on the batching thread
    except Exception as exc:  # Pillow raises many types for damaged files
        raise ValidationError(f"{where}: cannot decode the image: {exc}") from None
    return image


def decode_audio_file(data: bytes, where: str) -> dict[str, Any]:
    """Audio file bytes as ``{"raw": mono float32, "sampling_rate": rate}``."""
    import soundfile

    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises LibsndfileError, RuntimeError, TypeError ...
        raise ValidationError(f"{where}: cannot decode the audio file: {exc}") from None
    mono = samples[:, 0] if samples.shape[1] == 1 else samples.mean(axis=1, dtype=np.float32)
    return {"raw": np.ascontiguousarray(mono), "sampling_rate": int(rate)}


def decode_pcm(data: bytes, envelope: dict[str, Any], where: str) -> Any:
    """A numpy waveform exactly as sent: bare, or with its sampling rate."""
    dtype = np.dtype(envelope["dtype"]).newbyteorder("<")
    try:
        samples = np.frombuffer(data, dtype=dtype).reshape(envelope["shape"])
    except ValueError as exc:
        raise ValidationError(f"{where}: pcm payload does not match its shape: {exc}") from None
    samples = samples.astype(samples.dtype.newbyteorder("="))  # native order, writable copy
    rate = envelope.get("sampling_rate")
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
