"""Images and audio on the wire: the media envelope, as the producer builds and checks it.

The producer stays light: no torch; Pillow and numpy are imported lazily, only when the caller
passes a PIL image or a numpy array (and Pillow, when installed, checks image bytes early).
Every media input of a job becomes one JSON object in ``JobRequest.inputs``, an *envelope*:

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
"""

from __future__ import annotations

import base64
import io
import math
import numbers
import os
import pathlib
import sys
from dataclasses import dataclass, field
from typing import Any

from .contract import Keys
from .errors import ValidationError

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


@dataclass(slots=True)
class Blob:
    """One media payload before packing: its envelope fields and raw bytes."""

    kind: str
    fields: dict[str, Any]
    data: bytes


@dataclass(slots=True)
class PackedInputs:
    """A job's inputs as they travel, plus the payloads to store out of band first."""

    items: list[Any]
    #: Redis key -> raw bytes, to be stored (with ``claim_ttl_s``) before the message is sent.
    claims: dict[str, bytes] = field(default_factory=dict)
    #: Bytes carried inline (before base64) and out of band, for logs and tests.
    inline_bytes: int = 0
    claimed_bytes: int = 0


def pack_inputs(task: str, items: list[Any], *, job_id: str, keys: Keys,
                max_payload_bytes: int, claim_check_bytes: int) -> PackedInputs:
    """Encode every media input of a job into envelopes; raise ValidationError on bad media.

    Inputs of tasks without media, and envelopes already built, pass through unchanged.
    """
    kind = media_kind(task)
    if kind is None:
        return PackedInputs(list(items))
    packer = _Packer(job_id, keys, claim_check_bytes)
    out = []
    for index, item in enumerate(items):
        where = f"input #{index}" if len(items) > 1 else "the input"
        encoded = _encode_item(task, kind, item, where, max_payload_bytes)
        out.append(packer.pack(encoded))
    return PackedInputs(out, packer.claims, packer.inline, packer.claimed)


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
        _check_url(envelope["url"], where)
        return
    size = _envelope_size(envelope, source)
    if max_payload_bytes is not None and size > max_payload_bytes:
        raise ValidationError(_too_large(where, size, max_payload_bytes))
    if kind == "audio" and envelope.get("format") == "pcm":
        _check_pcm_fields(envelope, where, size)


# --- encoding one input ---------------------------------------------------------------------


def _encode_item(task: str, kind: str, item: Any, where: str, limit: int) -> Any:
    if is_envelope(item):
        return item  # already packed (e.g. a re-submitted message): checked by validation
    if isinstance(item, dict) and kind == "image":
        return {key: (_encode_images(value, f"{where} {key!r}", limit)
                      if key in IMAGE_FIELDS else value)
                for key, value in item.items()}
    if kind == "image":
        return _encode_image(item, where, limit)
    return _encode_audio(task, item, where, limit)


def _encode_images(value: Any, where: str, limit: int) -> Any:
    if isinstance(value, list):
        return [_encode_image(v, f"{where}[{i}]", limit) for i, v in enumerate(value)]
    return _encode_image(value, where, limit)


def _encode_image(item: Any, where: str, limit: int) -> Blob | dict[str, Any]:
    if isinstance(item, str) and item.startswith(("http://", "https://")):
        _check_url(item, where)
        return {MEDIA_KEY: "image", "url": item}
    if isinstance(item, str) and item.startswith("data:image/"):
        data = _b64decode(item.partition(",")[2], where)
        return _image_blob(data, where, limit)
    if isinstance(item, (str, pathlib.Path)):
        return _image_blob(_read_file(item, where, limit), where, limit)
    if isinstance(item, (bytes, bytearray, memoryview)):
        return _image_blob(bytes(item), where, limit)
    if _is_pil_image(item):
        data, fmt = encode_pil_image(item)
        _check_size(len(data), where, limit)
        return Blob("image", {"format": fmt}, data)
    raise ValidationError(
        f"{where} must be an image: bytes of an image file, a path, a PIL image or an "
        f"http(s) URL, got {_kind(item)}"
    )


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


def _image_blob(data: bytes, where: str, limit: int) -> Blob:
    _check_size(len(data), where, limit)
    return Blob("image", {"format": sniff_image(data, where)}, data)


def sniff_image(data: bytes, where: str) -> str:
    """The image format of file bytes; ValidationError when they are not a readable image.

    With Pillow installed the bytes are parsed (``verify``), which catches truncated and
    corrupt files; without it only the file signature is checked.
    """
    if not data:
        raise ValidationError(f"{where} is empty (0 bytes): pass the bytes of an image file")
    signature = _image_signature(data)
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        if signature is None:
            raise ValidationError(
                f"{where} is not an image file this producer recognises (PNG, JPEG, GIF, BMP, "
                f"WebP, TIFF); first bytes {data[:8]!r}"
            ) from None
        return signature
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt = (image.format or signature or "unknown").lower()
            image.verify()
    except UnidentifiedImageError:
        if signature is not None:
            raise ValidationError(f"{where} is a corrupt {signature} file: Pillow cannot read "
                                  "it") from None
        raise ValidationError(
            f"{where} is not a readable image (first bytes {data[:8]!r}): pass the bytes of a "
            "PNG, JPEG, GIF, BMP, WebP or TIFF file"
        ) from None
    except Exception as exc:  # Pillow raises many types for damaged files
        raise ValidationError(f"{where} is a corrupt {signature or 'image'} file: {exc}") from None
    return fmt


def _image_signature(data: bytes) -> str | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data.startswith(b"BM"):
        return "bmp"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return None


def _encode_audio(task: str, item: Any, where: str, limit: int) -> Blob | dict[str, Any]:
    if isinstance(item, str) and item.startswith(("http://", "https://")):
        _check_url(item, where)
        return {MEDIA_KEY: "audio", "url": item}
    if isinstance(item, (str, pathlib.Path)):
        return _audio_file_blob(_read_file(item, where, limit), where, limit)
    if isinstance(item, (bytes, bytearray, memoryview)):
        return _audio_file_blob(bytes(item), where, limit)
    if isinstance(item, dict):
        return _audio_dict(task, item, where, limit)
    if _is_array(item):
        return _pcm_blob(task, item, None, where, limit)
    raise ValidationError(
        f"{where} must be audio: bytes of an audio file, a path, an http(s) URL, a numpy "
        f"array, or {{'array': ndarray, 'sampling_rate': int}}, got {_kind(item)}"
    )


def _audio_dict(task: str, item: dict[str, Any], where: str, limit: int) -> Blob:
    unknown = set(item) - {"array", "raw", "sampling_rate", "path"}
    waveform = item.get("raw", item.get("array"))
    if unknown or waveform is None or "sampling_rate" not in item:
        raise ValidationError(
            f"{where}: an audio dict needs 'array' (or 'raw') and 'sampling_rate', "
            f"got keys {sorted(item)}"
        )
    rate = item["sampling_rate"]
    if isinstance(rate, bool) or not isinstance(rate, numbers.Integral):
        raise ValidationError(
            f"{where}: sampling_rate must be an int (samples per second), got {_kind(rate)}"
        )
    if not 0 < int(rate) <= MAX_SAMPLING_RATE:
        raise ValidationError(f"{where}: sampling_rate must be in 1..{MAX_SAMPLING_RATE}, "
                              f"got {int(rate)}")
    if not _is_array(waveform):
        raise ValidationError(f"{where}: the waveform must be a numpy array (or a torch "
                              f"tensor), got {_kind(waveform)}")
    return _pcm_blob(task, waveform, int(rate), where, limit)


def _pcm_blob(task: str, waveform: Any, rate: int | None, where: str, limit: int) -> Blob:
    array = _as_numpy(waveform)
    dtype = array.dtype.name
    if dtype not in PCM_DTYPES:
        raise ValidationError(f"{where}: audio samples of dtype {dtype} are not supported; "
                              f"use one of {', '.join(sorted(PCM_DTYPES))}")
    channels_ok = array.ndim == 1 or (
        task in MULTICHANNEL_AUDIO_TASKS and array.ndim == 2 and array.shape[0] <= 2)
    if not channels_ok:
        expected = ("(samples,) or (channels<=2, samples)" if task in MULTICHANNEL_AUDIO_TASKS
                    else "mono (samples,)")
        raise ValidationError(f"{where}: {task} expects audio shaped {expected}, got shape "
                              f"{tuple(array.shape)}")
    if array.size == 0:
        raise ValidationError(f"{where}: the audio has no samples")
    data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    _check_size(len(data), where, limit)
    fields: dict[str, Any] = {"format": "pcm", "dtype": dtype, "shape": list(array.shape)}
    if rate is not None:
        fields["sampling_rate"] = rate
    return Blob("audio", fields, data)


def _audio_file_blob(data: bytes, where: str, limit: int) -> Blob:
    _check_size(len(data), where, limit)
    return Blob("audio", {"format": sniff_audio(data, where)}, data)


def sniff_audio(data: bytes, where: str) -> str:
    """The audio file format of ``data`` by its signature; ValidationError if unsupported."""
    if not data:
        raise ValidationError(f"{where} is empty (0 bytes): pass the bytes of an audio file")
    fmt = _audio_signature(data)
    if fmt in AUDIO_FILE_FORMATS:
        return fmt
    what = f"{fmt} audio" if fmt else f"an unknown format (first bytes {data[:12]!r})"
    raise ValidationError(
        f"{where} is {what}, which workers cannot decode; supported audio files: "
        f"{', '.join(AUDIO_FILE_FORMATS)}. Decode it yourself and pass "
        "{'array': samples, 'sampling_rate': rate}"
    )


def _audio_signature(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return "wav"
    if data[:4] == b"fLaC":
        return "flac"
    if data[:4] == b"OggS":
        return "ogg"
    if data[:4] == b"FORM" and data[8:12] in (b"AIFF", b"AIFC"):
        return "aiff"
    if data[:3] == b"ID3":
        return "mp3"
    if len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0:
        # MPEG audio frame sync; layer bits 00 mean an AAC ADTS stream instead.
        return "mp3" if (data[1] >> 1) & 0b11 else "aac"
    if data[4:8] == b"ftyp":
        return "mp4/m4a"
    if data[:4] == b"\x1a\x45\xdf\xa3":
        return "webm/matroska"
    return None


# --- packing: inline or claim check ---------------------------------------------------------


class _Packer:
    """Turns Blobs into envelopes: inline while the job's inline total allows, else claimed."""

    def __init__(self, job_id: str, keys: Keys, threshold: int):
        self.job_id = job_id
        self.keys = keys
        self.threshold = threshold
        self.claims: dict[str, bytes] = {}
        self.inline = 0
        self.claimed = 0

    def pack(self, value: Any) -> Any:
        if isinstance(value, Blob):
            return self._envelope(value)
        if isinstance(value, dict) and not is_envelope(value):
            return {key: self.pack(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self.pack(item) for item in value]
        return value

    def _envelope(self, blob: Blob) -> dict[str, Any]:
        envelope: dict[str, Any] = {MEDIA_KEY: blob.kind, **blob.fields}
        size = len(blob.data)
        if self.inline + size <= self.threshold:
            self.inline += size
            envelope["data"] = base64.b64encode(blob.data).decode("ascii")
        else:
            key = self.keys.payload(self.job_id, len(self.claims))
            self.claims[key] = blob.data
            self.claimed += size
            envelope["claim"] = key
            envelope["size"] = size
        return envelope


# --- checks and helpers ---------------------------------------------------------------------


def _envelope_size(envelope: dict[str, Any], source: str) -> int:
    if source == "claim":
        size = envelope.get("size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValidationError("a claim-checked media envelope needs its size in bytes")
        return size
    text = envelope["data"]
    return len(text) * 3 // 4 - text[-2:].count("=")


def _check_pcm_fields(envelope: dict[str, Any], where: str, size: int) -> None:
    dtype, shape = envelope.get("dtype"), envelope.get("shape")
    if dtype not in PCM_DTYPES:
        raise ValidationError(f"{where}: unsupported pcm dtype {dtype!r}")
    if (not isinstance(shape, list) or not 1 <= len(shape) <= 2
            or not all(isinstance(n, int) and n > 0 for n in shape)):
        raise ValidationError(f"{where}: pcm shape must be 1 or 2 positive ints, got {shape!r}")
    if math.prod(shape) * _itemsize(dtype) != size:
        raise ValidationError(f"{where}: pcm data of {size} bytes does not hold {dtype} "
                              f"samples of shape {shape}")
    rate = envelope.get("sampling_rate")
    if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int)
                             or not 0 < rate <= MAX_SAMPLING_RATE):
        raise ValidationError(f"{where}: sampling_rate must be an int in 1..{MAX_SAMPLING_RATE}")


def _itemsize(dtype: str) -> int:
    return {"float16": 2, "float32": 4, "float64": 8, "int8": 1, "int16": 2, "int32": 4,
            "uint8": 1}[dtype]


def _check_url(url: str, where: str) -> None:
    if not url.startswith(("http://", "https://")) or len(url) > 4096 or any(
            c.isspace() for c in url):
        raise ValidationError(f"{where}: media URLs must be http(s) URLs without spaces "
                              f"(at most 4096 characters), got {url!r:.80}")


def _check_size(size: int, where: str, limit: int) -> None:
    if size > limit:
        raise ValidationError(_too_large(where, size, limit))


def _too_large(where: str, size: int, limit: int) -> str:
    return (f"{where} is {size:,} bytes, over the payload limit of {limit:,} bytes "
            "(max_payload_bytes of the route, or PIPEQ_MAX_PAYLOAD_BYTES): send a smaller "
            "file, or raise the limit")


def _read_file(path: str | pathlib.Path, where: str, limit: int) -> bytes:
    name = os.fspath(path)
    try:
        size = os.path.getsize(name)
        if size > limit:
            raise ValidationError(_too_large(f"{where} ({name})", size, limit))
        with open(name, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise ValidationError(
            f"{where}: cannot read file {name!r} ({exc.strerror or exc}); a path is read by the "
            "producer, so it must exist here (or pass an http(s) URL for the worker to fetch)"
        ) from None


def _b64decode(text: str, where: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise ValidationError(f"{where}: the data: URI does not hold valid base64") from None


def _is_pil_image(value: Any) -> bool:
    pil = sys.modules.get("PIL.Image")  # a PIL image implies PIL is imported already
    return pil is not None and isinstance(value, pil.Image)


def _is_array(value: Any) -> bool:
    module = type(value).__module__
    return (module == "numpy" and type(value).__name__ == "ndarray") or (
        module.startswith("torch") and hasattr(value, "numpy"))


def _as_numpy(value: Any) -> Any:
    if type(value).__module__.startswith("torch"):
        return value.detach().cpu().numpy()
    return value


def _kind(value: Any) -> str:
    return f"{type(value).__name__} {value!r:.60}"
