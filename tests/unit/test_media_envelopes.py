"""Media envelopes without services: encoding, claim-check threshold, bad input, decoding.

The producer side (``producer.media``, ``producer.validation``) builds and checks envelopes;
the worker side (``worker.media``) turns them back into what ``pipeline()`` takes; the codec
carries output images. Services (Redis, workers): tests/integration/test_media.py (this file
is named differently because pytest needs unique basenames across the test folders).
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from tiny_media_models import image_bytes, sample_audio, sample_image, wav_bytes

from pipeq.core import codec
from pipeq.core.envelopes import claim_keys, claim_ttl_s
from pipeq.core.keys import Keys
from pipeq.core.validation import InputLimits, check_inputs
from pipeq.errors import ValidationError
from pipeq.inputs import PreparedInputs, prepare_inputs
from pipeq.worker.batching.jobs import input_length
from pipeq.worker.model.media import decode_audio_file, decode_image, decode_pcm, media_length

KEYS = Keys("unit")
MB = 1024 * 1024


def pack(task: str, items: list[Any], *, threshold: int = MB, limit: int = 8 * MB,
         job_id: str = "job1") -> PreparedInputs:
    return prepare_inputs(task, list(items), job_id=job_id, keys=KEYS,
                          limits=InputLimits(100_000, 10_000, limit), claim_check_bytes=threshold)


def data_of(envelope: dict[str, Any]) -> bytes:
    return base64.b64decode(envelope["data"])


def pixels(image: Image.Image) -> tuple[str, tuple[int, int], bytes]:
    return image.mode, image.size, image.tobytes()


# --- images ---------------------------------------------------------------------------------


def test_image_bytes_travel_inline_unchanged() -> None:
    png = image_bytes(sample_image())
    packed = pack("image-classification", [png])
    (envelope,) = packed.items
    assert envelope["$media"] == "image" and envelope["format"] == "png"
    assert data_of(envelope) == png
    assert packed.claims == {} and packed.inline_bytes == len(png)
    # base64 longer than max_chars is fine for media
    check_inputs("image-classification", packed.items, InputLimits(10, 10, MB))


def test_pil_image_and_path_and_jpeg(tmp_path: Path) -> None:
    image = sample_image(33, 21, seed=2)
    path = tmp_path / "photo.jpg"
    path.write_bytes(image_bytes(image, "JPEG"))
    packed = pack("object-detection", [image, str(path), path])
    pil_env, str_env, path_env = packed.items
    assert pil_env["format"] == "png"
    assert pixels(decode_image(data_of(pil_env), "x")) == pixels(image)  # lossless
    assert str_env["format"] == path_env["format"] == "jpeg"
    assert data_of(str_env) == path.read_bytes()


def test_pil_modes_png_cannot_hold_go_as_tiff() -> None:
    depth = Image.fromarray(np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4), "F")
    (envelope,) = pack("image-classification", [depth]).items
    assert envelope["format"] == "tiff"
    assert pixels(decode_image(data_of(envelope), "x")) == pixels(depth)


def test_url_becomes_a_url_envelope() -> None:
    (envelope,) = pack("image-classification", ["https://example.com/cat.png"]).items
    assert envelope == {"$media": "image", "url": "https://example.com/cat.png"}


def test_document_inputs_encode_image_fields_only() -> None:
    png = image_bytes(sample_image())
    (item,) = pack("document-question-answering", [{"image": png, "question": "Who?"}]).items
    assert item["question"] == "Who?"
    assert data_of(item["image"]) == png


@pytest.mark.parametrize(("data", "message"), [
    (image_bytes(sample_image())[:60], "corrupt"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "corrupt"),
    (b"hello, I am text", "not a readable image"),
    (b"", "is empty"),
], ids=["truncated-png", "png-signature-only", "text", "empty"])
def test_bad_image_bytes_fail_at_the_producer(data: bytes, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        pack("image-classification", [data])


def test_missing_path_and_wrong_type() -> None:
    with pytest.raises(ValidationError, match=r"cannot read file '/no/such\.png'"):
        pack("image-classification", ["/no/such.png"])
    with pytest.raises(ValidationError, match="input #1 must be an image"):
        pack("image-classification", [image_bytes(sample_image()), 42])


# --- audio ----------------------------------------------------------------------------------


def test_audio_array_with_rate_round_trips_exactly() -> None:
    wave = sample_audio(0.1)
    (envelope,) = pack("audio-classification",
                       [{"array": wave, "sampling_rate": np.int64(16000)}]).items
    assert {k: envelope[k] for k in ("format", "dtype", "shape", "sampling_rate")} == {
        "format": "pcm", "dtype": "float32", "shape": [1600], "sampling_rate": 16000}
    decoded = decode_pcm(data_of(envelope), envelope, "x")
    assert decoded["sampling_rate"] == 16000
    np.testing.assert_array_equal(decoded["raw"], wave)
    assert decoded["raw"].flags.writeable


def test_bare_int16_array_and_stereo_for_speech_recognition() -> None:
    mono = (sample_audio(0.05) * 30000).astype(np.int16)
    stereo = np.stack([sample_audio(0.05, 1), sample_audio(0.05, 2)])
    packed = pack("automatic-speech-recognition", [mono, {"raw": stereo, "sampling_rate": 8000}])
    bare, pair = packed.items
    np.testing.assert_array_equal(decode_pcm(data_of(bare), bare, "x"), mono)
    assert pair["shape"] == [2, 800]
    np.testing.assert_array_equal(decode_pcm(data_of(pair), pair, "x")["raw"], stereo)


def test_audio_file_bytes_decode_to_mono_float() -> None:
    stereo = np.stack([sample_audio(0.1, 0), sample_audio(0.1, 1)], axis=1)
    (envelope,) = pack("audio-classification", [wav_bytes(stereo, 22050)]).items
    assert envelope["format"] == "wav"
    decoded = decode_audio_file(data_of(envelope), "x")
    assert decoded["sampling_rate"] == 22050 and decoded["raw"].dtype == np.float32
    np.testing.assert_allclose(decoded["raw"], stereo.mean(axis=1), atol=1e-7)
    flac = wav_bytes(sample_audio(0.1), fmt="FLAC", subtype="PCM_16")
    assert pack("audio-classification", [flac]).items[0]["format"] == "flac"


@pytest.mark.parametrize(("item", "message"), [
    (b"\x00\x00\x00\x20ftypM4A \x00\x00", "mp4/m4a audio, which workers cannot decode"),
    (b"\xff\xf1\x50\x80\x00\x1f\xfc", "aac audio"),
    (b"just some bytes", "unknown format"),
    ({"array": sample_audio(0.1), "sampling_rate": 16000.0}, "sampling_rate must be an int"),
    ({"array": sample_audio(0.1), "sampling_rate": "16k"}, "sampling_rate must be an int"),
    ({"array": sample_audio(0.1), "sampling_rate": True}, "sampling_rate must be an int"),
    ({"array": sample_audio(0.1), "sampling_rate": 0}, "sampling_rate must be in"),
    ({"array": sample_audio(0.1)}, "needs 'array' .* and 'sampling_rate'"),
    ({"array": [0.0, 0.1], "sampling_rate": 16000}, "must be a numpy array"),
    (np.zeros((2, 100), np.float32), r"expects audio shaped mono \(samples,\)"),
    (np.zeros(0, np.float32), "has no samples"),
    (np.zeros(10, np.complex64), "dtype complex64 are not supported"),
    ("https://example.com/a b.wav", "without spaces"),
], ids=["m4a", "aac", "unknown", "float-rate", "str-rate", "bool-rate", "zero-rate", "no-rate",
        "list-samples", "stereo", "empty", "complex", "url-with-space"])
def test_bad_audio_fails_at_the_producer(item: Any, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        pack("audio-classification", [item])


def test_speech_recognition_takes_two_channels_not_three() -> None:
    pack("automatic-speech-recognition", [np.zeros((2, 50), np.float32)])
    with pytest.raises(ValidationError, match=r"got shape \(3, 50\)"):
        pack("automatic-speech-recognition", [np.zeros((3, 50), np.float32)])


def test_corrupt_audio_file_fails_to_decode_on_the_worker() -> None:
    header_only = wav_bytes(sample_audio(0.1))[:30]
    (envelope,) = pack("audio-classification", [header_only]).items  # the signature is fine
    with pytest.raises(ValidationError, match="cannot decode the audio file"):
        decode_audio_file(data_of(envelope), "input #0")


# --- size limit and claim check -------------------------------------------------------------


def test_oversized_payload_is_refused_with_the_limit() -> None:
    png = image_bytes(sample_image(64, 64))
    with pytest.raises(ValidationError, match=rf"is {len(png):,} bytes, over the payload limit "
                       r"of 1,000 bytes \(max_payload_bytes"):
        pack("image-classification", [png], limit=1000)
    with pytest.raises(ValidationError, match="over the payload limit"):
        pack("audio-classification", [sample_audio(1.0)], limit=1000)


def test_claim_check_threshold_counts_the_jobs_inline_total() -> None:
    images = [image_bytes(sample_image(seed=i)) for i in range(3)]
    sizes = [len(b) for b in images]
    packed = pack("image-classification", images, threshold=sizes[0] + sizes[1], job_id="j7")
    first, second, third = packed.items
    assert data_of(first) == images[0] and data_of(second) == images[1]
    assert third == {"$media": "image", "format": "png", "claim": KEYS.payload("j7", 0),
                     "size": sizes[2]}
    assert packed.claims == {KEYS.payload("j7", 0): images[2]}
    assert claim_keys(packed.items) == [KEYS.payload("j7", 0)]
    assert (packed.inline_bytes, packed.claimed_bytes) == (sizes[0] + sizes[1], sizes[2])


def test_threshold_zero_claims_everything_and_keys_are_per_job() -> None:
    wave = sample_audio(0.1)
    packed = pack("audio-classification", [wave, wave], threshold=0, job_id="abc")
    assert [e["claim"] for e in packed.items] == ["unit:payload:abc:0", "unit:payload:abc:1"]
    assert all("data" not in e for e in packed.items)
    assert claim_ttl_s(30.2) == 31 + 60


@pytest.mark.parametrize(("envelope", "message"), [
    ({"$media": "image", "format": "png", "data": "aGk=", "claim": "k", "size": 2},
     "exactly one of data, claim, url"),
    ({"$media": "image", "data": "aGk=", "colour": "red"}, "unknown media envelope field"),
    ({"$media": "video", "data": "aGk="}, "unknown media kind 'video'"),
    ({"$media": "image", "claim": "k"}, "needs its size"),
    ({"$media": "image", "claim": "k", "size": 10_000}, "over the payload limit of 1,000"),
    ({"$media": "audio", "format": "pcm", "dtype": "float32", "shape": [3], "data": "aGk="},
     "does not hold float32 samples"),
    ({"$media": "image", "url": "file:///etc/passwd"}, "must be http"),
])
def test_envelopes_are_checked_on_both_sides(envelope: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        check_inputs("image-classification", [envelope], InputLimits(100, 10, 1000))


def test_plain_values_where_media_belongs_are_refused() -> None:
    with pytest.raises(ValidationError, match="must be a media envelope"):
        check_inputs("audio-classification", ["/tmp/a.wav"], InputLimits(100, 10))


# --- outputs and batching -------------------------------------------------------------------


def test_output_images_come_back_as_pil_images() -> None:
    from pipeq.worker.model.wire import to_wire

    mask = Image.fromarray((np.arange(30 * 40).reshape(30, 40) % 255).astype(np.uint8), "L")
    wire = to_wire([{"label": "sky", "score": None, "mask": mask}])
    (result,) = codec.decode(codec.encode(wire))
    assert result["label"] == "sky" and result["score"] is None
    assert isinstance(result["mask"], Image.Image)
    assert pixels(result["mask"]) == pixels(mask)


def test_media_batching_length_is_samples_or_pixels() -> None:
    assert input_length({"raw": np.zeros(16000, np.float32), "sampling_rate": 16000}) == 16000
    assert input_length(np.zeros((2, 800), np.float32)) == 800
    assert media_length(sample_image(40, 30)) == 1200
    assert input_length("hello") == 5  # text keeps its proxy


def test_decode_image_refuses_garbage() -> None:
    with pytest.raises(ValidationError, match="input #3: cannot decode the image"):
        decode_image(b"\x89PNG\r\n\x1a\n garbage", "input #3")
    assert decode_image(image_bytes(sample_image()), "x").size == (40, 30)
