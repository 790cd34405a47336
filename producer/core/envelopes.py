"""Images and audio on the wire: the media envelope both sides of the queue agree on.

Every media input of a job is one JSON object in ``JobRequest.inputs``, an *envelope*:

    {"$media": "image", "format": "png", "data": "<base64>"}          file bytes, inline
    {"$media": "image", "format": "png", "claim": "<key>", "size": N} file bytes, out of band
    {"$media": "image", "url": "https://..."}                         fetched by the worker
    {"$media": "audio", "format": "wav" | "flac" | "ogg" | "mp3" | "aiff", "data" | "claim": ...}
    {"$media": "audio", "format": "pcm", "dtype": "float32", "shape": [n],
     "sampling_rate": 16000, "data" | "claim": ...}                   a numpy waveform

Bytes travel base64-encoded inside the JSON message while the job's inline total stays at or
under ``claim_check_bytes``; beyond it each payload is stored raw in Redis under
``Keys.payload(job_id, part)`` (expiring with the job's deadline) and the envelope carries
the key (claim check). The worker deletes those keys when the job ends. Inputs for
document-style tasks may be dicts whose ``image``/``images`` values are media.
The producer builds envelopes (``pipeq.media``); the worker decodes them
(``pipeq.worker.model.media``); both check them with :func:`check_envelope`.
"""

from __future__ import annotations

import io
import math
from typing import Any

from pipeq.errors import ValidationError

MEDIA_KEY = "$media"

#: Tasks whose inputs are images (or dicts holding images, for the document-style ones).
IMAGE_TASKS = frozenset({
    "image-classification", "image-segmentation", "object-detection",
    "zero-shot-image-classification", "zero-shot-object-detection", "depth-estimation",
    "image-feature-extraction", "mask-generation", "document-question-answering",
    "image-text-to-text",
})
#: Tasks whose inputs are audio.
AUDIO_TASKS = frozenset({
    "audio-classification", "automatic-speech-recognition", "zero-shot-audio-classification",
})
#: Audio tasks whose pipelines take several channels (as ``(channels, samples)``).
MULTICHANNEL_AUDIO_TASKS = frozenset({"automatic-speech-recognition"})
#: Keys of a dict input that hold images (document-question-answering, image-text-to-text).
IMAGE_FIELDS = ("image", "images")

AUDIO_FILE_FORMATS = ("wav", "flac", "ogg", "mp3", "aiff")
PCM_DTYPES = frozenset({"float16", "float32", "float64", "int8", "int16", "int32", "uint8"})
MAX_SAMPLING_RATE = 1_000_000
#: Claim-checked payloads outlive the job's deadline by this much (redelivery, clock skew).
CLAIM_GRACE_S = 60

_ENVELOPE_FIELDS = {
    "image": {"format", "data", "claim", "size", "url"},
    "audio": {"format", "data", "claim", "size", "url", "dtype", "shape", "sampling_rate"},
}


def media_kind(task: str) -> str | None:
    """"image", "audio" or None: what kind of media a task's inputs carry."""
    if task in IMAGE_TASKS:
        return "image"
    if task in AUDIO_TASKS:
        return "audio"
    return None


def is_envelope(value: Any) -> bool:
    """True for a media envelope (a dict with a ``$media`` key)."""
    return isinstance(value, dict) and MEDIA_KEY in value



def claim_ttl_s(timeout_s: float) -> int:
    """How long claim-checked payloads live: the job's timeout plus a grace period."""
    return math.ceil(timeout_s) + CLAIM_GRACE_S


def claim_keys(items: list[Any]) -> list[str]:
    """Every claim-check key referenced by a job's (packed) inputs."""
    found: list[str] = []

    def walk(value: Any) -> None:
        if is_envelope(value):
            if isinstance(value.get("claim"), str):
                found.append(value["claim"])
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    for item in items:
        walk(item)
    return found


def check_envelope(envelope: dict[str, Any], where: str, max_payload_bytes: int | None) -> None:
    """Check an envelope's shape (both sides of the queue); raise ValidationError if wrong."""
    kind = envelope.get(MEDIA_KEY)
    if kind not in _ENVELOPE_FIELDS:
        raise ValidationError(f"{where}: unknown media kind {kind!r} (expected image or audio)")
    unknown = set(envelope) - _ENVELOPE_FIELDS[kind] - {MEDIA_KEY}
    if unknown:
        raise ValidationError(f"{where}: unknown media envelope field(s) {sorted(unknown)}")
    sources = [k for k in ("data", "claim", "url") if k in envelope]
    if len(sources) != 1:
        raise ValidationError(f"{where}: a media envelope needs exactly one of data, claim, url")
    source = sources[0]
    if not isinstance(envelope[source], str):
        raise ValidationError(f"{where}: media {source} must be a string")
    if source == "url":
        check_url(envelope["url"], where)
        return
    size = envelope_size(envelope, source)
    if max_payload_bytes is not None and size > max_payload_bytes:
        raise ValidationError(too_large(where, size, max_payload_bytes))
    if kind == "audio" and envelope.get("format") == "pcm":
        check_pcm_fields(envelope, where, size)


# --- encoding one input ---------------------------------------------------------------------


def encode_pil_image(image: Any) -> tuple[bytes, str]:
    """A PIL image as lossless file bytes: PNG, or TIFF for modes PNG cannot hold.

    The EXIF block travels too, so the worker applies the same orientation as a local
    pipeline would. Compression level 1: much faster than the default for similar size.
    """
    buffer = io.BytesIO()
    exif = image.getexif()
    if image.mode in ("1", "L", "LA", "P", "RGB", "RGBA", "I;16"):
        kwargs: dict[str, Any] = {"compress_level": 1}
        if exif:
            kwargs["exif"] = exif
        image.save(buffer, format="PNG", **kwargs)
        return buffer.getvalue(), "png"
    image.save(buffer, format="TIFF", **({"exif": exif} if exif else {}))
    return buffer.getvalue(), "tiff"




def envelope_size(envelope: dict[str, Any], source: str) -> int:
    if source == "claim":
        size = envelope.get("size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValidationError("a claim-checked media envelope needs its size in bytes")
        return size
    text = envelope["data"]
    return len(text) * 3 // 4 - text[-2:].count("=")


def check_pcm_fields(envelope: dict[str, Any], where: str, size: int) -> None:
    dtype, shape = envelope.get("dtype"), envelope.get("shape")
    if dtype not in PCM_DTYPES:
        raise ValidationError(f"{where}: unsupported pcm dtype {dtype!r}")
    if (not isinstance(shape, list) or not 1 <= len(shape) <= 2
            or not all(isinstance(n, int) and n > 0 for n in shape)):
        raise ValidationError(f"{where}: pcm shape must be 1 or 2 positive ints, got {shape!r}")
    if math.prod(shape) * itemsize(dtype) != size:
        raise ValidationError(f"{where}: pcm data of {size} bytes does not hold {dtype} "
                              f"samples of shape {shape}")
    rate = envelope.get("sampling_rate")
    if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int)
                             or not 0 < rate <= MAX_SAMPLING_RATE):
        raise ValidationError(f"{where}: sampling_rate must be an int in 1..{MAX_SAMPLING_RATE}")


def itemsize(dtype: str) -> int:
    return {"float16": 2, "float32": 4, "float64": 8, "int8": 1, "int16": 2, "int32": 4,
            "uint8": 1}[dtype]


def check_url(url: str, where: str) -> None:
    if not url.startswith(("http://", "https://")) or len(url) > 4096 or any(
            c.isspace() for c in url):
        raise ValidationError(f"{where}: media URLs must be http(s) URLs without spaces "
                              f"(at most 4096 characters), got {url!r:.80}")


def check_size(size: int, where: str, limit: int) -> None:
    if size > limit:
        raise ValidationError(too_large(where, size, limit))


def too_large(where: str, size: int, limit: int) -> str:
    return (f"{where} is {size:,} bytes, over the payload limit of {limit:,} bytes "
            "(max_payload_bytes of the route, or PIPEQ_MAX_PAYLOAD_BYTES): send a smaller "
            "file, or raise the limit")
