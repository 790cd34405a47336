"""Images and audio from the caller's hands into media envelopes (``pipeq.core.envelopes``).

The producer stays light: no torch; Pillow and numpy are imported lazily, only when the caller
passes a PIL image or a numpy array (and Pillow, when installed, checks image bytes early).
Each encoder checks what it can before anything is enqueued (corrupt images, unsupported
audio formats, a non-int sampling rate, oversized payloads: ``ValidationError``) and returns
a :class:`Blob`, which :class:`Packer` turns into an inline or claim-checked envelope.
"""

from __future__ import annotations

import base64
import io
import numbers
import os
import pathlib
import stat
import sys
from dataclasses import dataclass
from typing import Any

from pipeq.core.envelopes import (
    AUDIO_FILE_FORMATS,
    IMAGE_FIELDS,
    MAX_SAMPLING_RATE,
    MEDIA_KEY,
    MULTICHANNEL_AUDIO_TASKS,
    PCM_DTYPES,
    check_envelope,
    check_size,
    check_url,
    encode_pil_image,
    is_envelope,
    too_large,
)
from pipeq.core.jsonsafe import check_json, describe
from pipeq.core.keys import Keys
from pipeq.core.validation import InputLimits
from pipeq.errors import ValidationError


@dataclass(slots=True)
class Blob:
    """One media payload before packing: its envelope fields and raw bytes."""

    kind: str
    fields: dict[str, Any]
    data: bytes


def encode_item(task: str, kind: str, item: Any, where: str, limits: InputLimits) -> Any:
    """One input of a media task, encoded and checked: a Blob (or a dict holding Blobs) to
    pack, an envelope built already, or a URL envelope."""
    limit = limits.max_payload_bytes or 0
    if is_envelope(item):  # already packed (e.g. a re-submitted message)
        check_envelope(item, where, limit)
        return item
    if isinstance(item, dict) and kind == "image":
        return {key: _encode_field(key, value, f"{where} {key!r}", limits)
                for key, value in item.items()}
    if kind == "image":
        return _encode_image(item, where, limit, limits.max_image_pixels)
    return _encode_audio(task, item, where, limit)


def _encode_field(key: str, value: Any, where: str, limits: InputLimits) -> Any:
    """A field of a document-style input: images are encoded, other values checked as JSON."""
    if key in IMAGE_FIELDS:
        return _encode_images(value, where, limits.max_payload_bytes or 0,
                              limits.max_image_pixels)
    check_json(value, where, max_chars=limits.max_chars, depth=1)
    return value


def _encode_images(value: Any, where: str, limit: int, pixels: int | None) -> Any:
    if isinstance(value, list):
        return [_encode_image(v, f"{where}[{i}]", limit, pixels) for i, v in enumerate(value)]
    return _encode_image(value, where, limit, pixels)


def _encode_image(item: Any, where: str, limit: int, pixels: int | None = None
                  ) -> Blob | dict[str, Any]:
    if isinstance(item, str) and item.startswith(("http://", "https://")):
        check_url(item, where)
        return {MEDIA_KEY: "image", "url": item}
    if isinstance(item, str) and item.startswith("data:image/"):
        data = _b64decode(item.partition(",")[2], where)
        return _image_blob(data, where, limit, pixels)
    if isinstance(item, (str, pathlib.Path)):
        return _image_blob(_read_file(item, where, limit), where, limit, pixels)
    if isinstance(item, (bytes, bytearray, memoryview)):
        return _image_blob(bytes(item), where, limit, pixels)
    if _is_pil_image(item):
        width, height = item.size
        check_pixels(width, height, where, pixels)
        data, fmt = encode_pil_image(item)
        check_size(len(data), where, limit)
        return Blob("image", {"format": fmt}, data)
    raise ValidationError(
        f"{where} must be an image: bytes of an image file, a path, a PIL image or an "
        f"http(s) URL, got {describe(item)}"
    )


def _image_blob(data: bytes, where: str, limit: int, pixels: int | None = None) -> Blob:
    check_size(len(data), where, limit)
    return Blob("image", {"format": sniff_image(data, where, pixels)}, data)


def check_pixels(width: int, height: int, where: str, max_pixels: int | None) -> None:
    """Refuse an image of more than ``max_pixels`` (what workers decode: PIPEQ_MAX_IMAGE_PIXELS)."""
    if max_pixels is not None and width * height > max_pixels:
        raise ValidationError(
            f"{where} is {width}x{height} = {width * height:,} pixels, over the limit of "
            f"{max_pixels:,} per image (PIPEQ_MAX_IMAGE_PIXELS): scale it down before sending")


def sniff_image(data: bytes, where: str, max_pixels: int | None = None) -> str:
    """The image format of file bytes; ValidationError when they are not a readable image
    (or, with Pillow and ``max_pixels``, one with more pixels than workers decode).

    With Pillow installed the bytes are parsed (``verify``), which catches truncated and
    corrupt files; without it only the file signature is checked.
    """
    if not data:
        raise ValidationError(f"{where} is empty (0 bytes): pass the bytes of an image file")
    signature = _image_signature(data)
    try:
        from PIL import Image, UnidentifiedImageError
        from PIL.Image import DecompressionBombError
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
            width, height = image.size
            check_pixels(width, height, where, max_pixels)
            image.verify()
    except ValidationError:
        raise
    except DecompressionBombError as exc:
        raise ValidationError(f"{where} has far more pixels than the limit a worker decodes "
                              f"(PIPEQ_MAX_IMAGE_PIXELS): {exc}; scale it down") from None
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
        check_url(item, where)
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
        f"array, or {{'array': ndarray, 'sampling_rate': int}}, got {describe(item)}"
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
            f"{where}: sampling_rate must be an int (samples per second), got {describe(rate)}"
        )
    if not 0 < int(rate) <= MAX_SAMPLING_RATE:
        raise ValidationError(f"{where}: sampling_rate must be in 1..{MAX_SAMPLING_RATE}, "
                              f"got {int(rate)}")
    if not _is_array(waveform):
        raise ValidationError(f"{where}: the waveform must be a numpy array (or a torch "
                              f"tensor), got {describe(waveform)}")
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
    check_size(len(data), where, limit)
    fields: dict[str, Any] = {"format": "pcm", "dtype": dtype, "shape": list(array.shape)}
    if rate is not None:
        fields["sampling_rate"] = rate
    return Blob("audio", fields, data)


def _audio_file_blob(data: bytes, where: str, limit: int) -> Blob:
    check_size(len(data), where, limit)
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


class Packer:
    """Turns Blobs into envelopes: inline while the job's inline total allows, else claimed."""

    def __init__(self, job_id: str, keys: Keys, threshold: int):
        self.job_id = job_id
        self.keys = keys
        self.threshold = threshold
        self.claims: dict[str, bytes] = {}
        self.inline = 0
        self.claimed = 0

    def pack(self, value: Any) -> Any:
        """``value`` with every Blob in it replaced by its envelope."""
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


# --- helpers -------------------------------------------------------------------------------


def _read_file(path: str | pathlib.Path, where: str, limit: int) -> bytes:
    """A regular file's bytes, at most ``limit``: a device, FIFO or directory is refused before
    any read (``/dev/zero`` has size 0 and never ends), and the read itself stops at the limit
    (a file growing while it is read)."""
    name = os.fspath(path)
    try:
        # O_NONBLOCK: opening a FIFO without a writer would otherwise wait forever (no effect
        # on the reads of a regular file).
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
        try:
            info = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise ValidationError(
                f"{where} ({name!r}) is not a regular file (a device, pipe, socket or "
                "directory); pass the path of an image or audio file, or its bytes")
        with open(fd, "rb") as handle:
            if info.st_size > limit:
                raise ValidationError(too_large(f"{where} ({name})", info.st_size, limit))
            data = handle.read(limit + 1)
    except OSError as exc:
        raise ValidationError(
            f"{where}: cannot read file {name!r} ({exc.strerror or exc}); a path is read by the "
            "producer, so it must exist here (or pass an http(s) URL for the worker to fetch)"
        ) from None
    if len(data) > limit:
        raise ValidationError(too_large(f"{where} ({name})", len(data), limit))
    return data


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
