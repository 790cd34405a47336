"""Images and audio through real Redis and real workers equal the local pipeline()'s results.

One module-scoped deployment with one worker per task (tiny random models built in fixtures),
each result compared with ``transformers.pipeline()`` in this process on the same input.
Payload sizes used: images of 40x30 to 320x240 pixels (PNG 2-112 KB, JPEG ~1 KB), audio of
0.3-1.0 s at 16 kHz (float32 arrays and WAV files of 19-64 KB).
"""

from __future__ import annotations

import http.server
import io
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import transformers
from compare import assert_same
from conftest import Deployment
from PIL import Image
from tiny_media_models import (
    MEDIA_TASKS,
    build_media_model,
    image_bytes,
    sample_audio,
    sample_image,
    wav_bytes,
)

from pipeq import RemotePipeline
from pipeq.client import Client
from pipeq.core.config import Settings
from pipeq.core.contract import Route
from pipeq.errors import JobFailed, ValidationError

RATE = 16_000
#: Worker options per task: object-detection also proves URL fetching and a route's limit.
WORKER_ARGS = {
    "object-detection": ["--allow-urls", "--max-payload-bytes", "100000"],
    "audio-classification": ["--max-wait-ms", "300"],
    "automatic-speech-recognition": ["--max-wait-ms", "300"],
    "image-classification": ["--max-wait-ms", "300"],
}


def as_plain(value: Any) -> Any:
    """PIL images as (mode, size, pixel bytes) so assert_same can compare them exactly."""
    if isinstance(value, Image.Image):
        return {"mode": value.mode, "size": list(value.size), "pixels": value.tobytes()}
    if isinstance(value, dict):
        return {k: as_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_plain(v) for v in value]
    return value


def same(remote: Any, local: Any) -> None:
    assert_same(as_plain(remote), as_plain(local))


@pytest.fixture(scope="module")
def served(module_deployment: Deployment, models_dir: Path) -> dict[str, str]:
    """A ready worker per media task; returns task -> model directory."""
    paths = {task: str(build_media_model(task, models_dir)) for task in MEDIA_TASKS}
    # The URL test's server is on loopback, which a worker fetches only when allowed.
    allow = {"PIPEQ_URL_ALLOW_NETWORKS": '["127.0.0.1/32"]'}
    workers = [module_deployment.start_worker(task, path, *WORKER_ARGS.get(task, []),
                                              ready=False, env=allow)
               for task, path in paths.items()]
    for worker in workers:
        worker.wait_ready()
    return paths


@pytest.fixture(scope="module")
def local(served: dict[str, str]) -> dict[str, Any]:
    """The local truth: plain transformers.pipeline() per task."""
    return {task: transformers.pipeline(task, model=path) for task, path in served.items()}


def remote(dep: Deployment, served: dict[str, str], task: str, **settings: Any
           ) -> RemotePipeline:
    """A remote pipeline; with ``settings`` overrides, on a Client of its own."""
    if not settings:
        return dep.remote(task, served[task])
    own = Settings(redis_url=dep.redis_url, queue_prefix=dep.prefix,
                   routes_file=dep.workdir / "routes.toml", **{**dep.overrides, **settings})
    return RemotePipeline(Route(task=task, model=served[task]), Client(own))


def audio(seconds: float, seed: int) -> dict[str, Any]:
    return {"array": sample_audio(seconds, seed), "sampling_rate": RATE}


# --- images ---------------------------------------------------------------------------------


def test_image_classification_bytes_path_pil_and_lists(
        module_deployment: Deployment, served: dict[str, str], local: dict[str, Any],
        tmp_path: Path) -> None:
    pipe = remote(module_deployment, served, "image-classification")
    image = sample_image(40, 30, seed=1)
    path = tmp_path / "photo.jpg"
    path.write_bytes(image_bytes(image, "JPEG"))
    truth = local["image-classification"]
    same(pipe(image_bytes(image)), truth(image))
    same(pipe(str(path)), truth(str(path)))
    same(pipe(image, top_k=2), truth(image, top_k=2))
    images = [sample_image(40 + 8 * i, 30, seed=i) for i in range(3)]
    same(pipe(images), truth(images))


def test_image_segmentation_masks_come_back_as_pil_images(
        module_deployment: Deployment, served: dict[str, str], local: dict[str, Any]) -> None:
    pipe = remote(module_deployment, served, "image-segmentation")
    image = sample_image(40, 30, seed=3)
    got = pipe(image_bytes(image))
    expected = local["image-segmentation"](image)
    assert got and all(isinstance(segment["mask"], Image.Image) for segment in got)
    assert [s["mask"].mode for s in got] == ["L"] * len(got)
    same(got, expected)
    pair = [sample_image(64, 48, seed=4), image]
    same(pipe(pair), local["image-segmentation"](pair))


def test_object_detection_with_threshold(
        module_deployment: Deployment, served: dict[str, str], local: dict[str, Any]) -> None:
    pipe = remote(module_deployment, served, "object-detection")
    image = sample_image(48, 36, seed=5)
    got = pipe(image, threshold=0.1)
    assert got, "the tiny detector should find boxes at threshold 0.1"
    same(got, local["object-detection"](image, threshold=0.1))


def test_zero_shot_image_classification_text_and_image(
        module_deployment: Deployment, served: dict[str, str], local: dict[str, Any]) -> None:
    """The multimodal task: CLIP scores an image against text labels."""
    pipe = remote(module_deployment, served, "zero-shot-image-classification")
    labels = ["a photo of a cat", "a photo of a dog", "a red car on a road"]
    images = [sample_image(40, 30, seed=6), sample_image(32, 32, seed=7)]
    truth = local["zero-shot-image-classification"]
    same(pipe(images[0], candidate_labels=labels), truth(images[0], candidate_labels=labels))
    same(pipe(images, candidate_labels=labels[:2]), truth(images, candidate_labels=labels[:2]))


# --- audio ----------------------------------------------------------------------------------


def test_audio_classification_array_file_path(
        module_deployment: Deployment, served: dict[str, str], local: dict[str, Any],
        tmp_path: Path) -> None:
    pipe = remote(module_deployment, served, "audio-classification")
    truth = local["audio-classification"]
    clip = audio(0.5, 0)
    same(pipe(clip), truth(dict(clip)))
    same(pipe(clip["array"], top_k=2), truth(clip["array"], top_k=2))  # bare: the model's rate
    path = tmp_path / "clip.wav"
    path.write_bytes(wav_bytes(clip["array"]))  # 32-bit float WAV: lossless
    same(pipe(path.read_bytes()), truth(dict(clip)))
    same(pipe(str(path)), truth(dict(clip)))


def test_speech_recognition_array_file_and_timestamps(
        module_deployment: Deployment, served: dict[str, str], local: dict[str, Any]) -> None:
    pipe = remote(module_deployment, served, "automatic-speech-recognition")
    truth = local["automatic-speech-recognition"]
    clip = audio(0.6, 1)
    got = pipe(clip)
    assert got["text"]
    same(got, truth(dict(clip)))
    same(pipe(wav_bytes(clip["array"])), truth(dict(clip)))
    same(pipe(clip, return_timestamps="char"), truth(dict(clip), return_timestamps="char"))
    clips = [audio(0.3, 2), audio(0.7, 3)]
    same(pipe(clips), truth([dict(c) for c in clips]))


@pytest.mark.parametrize("task", ["audio-classification", "automatic-speech-recognition",
                                  "image-classification"])
def test_concurrent_media_jobs_share_batches(
        module_deployment: Deployment, served: dict[str, str], local: dict[str, Any],
        task: str) -> None:
    """Many jobs at once go through the micro-batcher in shared batches, each result equal."""
    pipe = remote(module_deployment, served, task)
    worker = module_deployment.workers[MEDIA_TASKS.index(task)]
    before = len(batch_sizes(worker.log()))
    if task == "image-classification":
        inputs: list[Any] = [sample_image(40, 30, seed=i % 4) for i in range(12)]
    else:  # a few distinct durations: equal ones batch together, speech recognition too
        inputs = [audio((0.3, 0.5, 0.8)[i % 3], i) for i in range(12)]
    jobs = [pipe.submit(item) for item in inputs]
    for item, job in zip(inputs, jobs, strict=True):
        same(job.result(60), local[task](dict(item) if isinstance(item, dict) else item))
    sizes = wait_for_batches(worker, before)
    assert max(sizes) > 1, f"no shared batch among {sizes}"


def batch_sizes(log: str) -> list[int]:
    return [int(n) for n in re.findall(r"batch route=\S+ size=(\d+)", log)]


def wait_for_batches(worker: Any, before: int) -> list[int]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        sizes = batch_sizes(worker.log())[before:]
        if sum(sizes) >= 12:
            return sizes
        time.sleep(0.1)
    return batch_sizes(worker.log())[before:]


# --- claim check, limits, URLs, bad input ---------------------------------------------------


def test_large_payloads_go_out_of_band_and_are_deleted(
        module_deployment: Deployment, served: dict[str, str], local: dict[str, Any]) -> None:
    dep = module_deployment
    big = sample_image(320, 240, seed=8)
    data = image_bytes(big)
    assert len(data) > 100_000
    pipe = remote(dep, served, "image-classification", claim_check_bytes=64 * 1024)
    small = image_bytes(sample_image(40, 30, seed=9))
    # Not served: the message stays queued, so what it carries can be inspected.
    idle = RemotePipeline(Route(task="image-classification", model="unserved-model"),
                          pipe.client)
    job = idle.submit([small, data], require_worker=False, timeout=30)
    (payload_key,) = dep.keys(f":payload:{job.id}:*")
    assert dep.redis.get(payload_key) == data
    assert 30 < dep.redis.ttl(payload_key) <= 30 + 60
    message = dep.redis.lindex(dep.settings.keys.lane_queue_key(idle.route, "interactive"), 0)
    assert message is not None and len(message) < 2 * len(small) + 8_000 < len(data)
    assert job.cancel()

    served = pipe.submit([small, data], timeout=60)
    same(served.result(60),
         local["image-classification"]([Image.open(io.BytesIO(small)), big]))
    deadline = time.monotonic() + 5  # the worker deletes the payloads right after the job
    while dep.keys(f":payload:{served.id}:*") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert dep.keys(f":payload:{served.id}:*") == []


def test_audio_claim_check_everything_out_of_band(
        module_deployment: Deployment, served: dict[str, str], local: dict[str, Any]) -> None:
    pipe = remote(module_deployment, served, "audio-classification", claim_check_bytes=0)
    clip = audio(1.0, 4)  # 64 KB of float32 samples
    job = pipe.submit(clip)
    same(job.result(60), local["audio-classification"](dict(clip)))
    deadline = time.monotonic() + 5
    while module_deployment.keys(f":payload:{job.id}:*") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert module_deployment.keys(f":payload:{job.id}:*") == []


def test_payload_limits_at_the_producer_and_the_route(
        module_deployment: Deployment, served: dict[str, str]) -> None:
    data = image_bytes(sample_image(320, 240, seed=8))
    strict = remote(module_deployment, served, "image-classification", max_payload_bytes=50_000)
    with pytest.raises(ValidationError, match=r"over the payload limit of 50,000 bytes"):
        strict.submit(data)
    # The object-detection route's own limit (--max-payload-bytes 100000) holds at its worker.
    with pytest.raises(JobFailed) as failed:
        remote(module_deployment, served, "object-detection")(data, timeout=60)
    assert failed.value.error_type == "ValidationError"
    assert "is 111,735 bytes, over the payload limit of 100,000 bytes" in str(failed.value)


@pytest.fixture
def image_server(tmp_path: Path) -> Iterator[str]:
    """An HTTP server on localhost serving tmp_path."""
    (tmp_path / "street.png").write_bytes(image_bytes(sample_image(48, 36, seed=10)))

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_urls_are_fetched_only_where_the_route_allows(
        module_deployment: Deployment, served: dict[str, str], local: dict[str, Any],
        image_server: str) -> None:
    url = f"{image_server}/street.png"
    image = sample_image(48, 36, seed=10)
    detector = remote(module_deployment, served, "object-detection")
    same(detector(url, threshold=0.1), local["object-detection"](image, threshold=0.1))
    with pytest.raises(JobFailed, match=r"does not fetch URLs.*--allow-urls"):
        remote(module_deployment, served, "image-classification")(url, timeout=60)
    with pytest.raises(JobFailed, match="cannot fetch"):
        detector(f"{image_server}/missing.png", timeout=60)


def test_bad_media_is_refused_before_anything_is_enqueued(
        module_deployment: Deployment, served: dict[str, str]) -> None:
    dep = module_deployment
    before = set(dep.keys())
    with pytest.raises(ValidationError, match="corrupt png"):
        remote(dep, served, "image-classification")(image_bytes(sample_image())[:80])
    with pytest.raises(ValidationError, match="mp4/m4a audio, which workers cannot decode"):
        remote(dep, served, "audio-classification")(b"\x00\x00\x00\x20ftypM4A " + b"\x00" * 64)
    with pytest.raises(ValidationError, match="sampling_rate must be an int"):
        remote(dep, served, "automatic-speech-recognition")(
            {"array": sample_audio(0.2), "sampling_rate": 16000.0})
    assert set(dep.keys()) - before == set()


def test_undecodable_audio_fails_the_job_with_a_clear_error(
        module_deployment: Deployment, served: dict[str, str], local: dict[str, Any]) -> None:
    pipe = remote(module_deployment, served, "audio-classification")
    truncated = wav_bytes(sample_audio(0.2))[:40]
    with pytest.raises(JobFailed, match="cannot decode the audio file") as failed:
        pipe(truncated, timeout=60)
    assert failed.value.error_type == "ValidationError"
    clip = audio(0.3, 5)  # the worker goes on serving
    same(pipe(clip), local["audio-classification"](dict(clip)))
