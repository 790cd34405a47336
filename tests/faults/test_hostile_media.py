"""Hostile media and URLs against real workers whose address space is capped (prlimit --as).

An image worker (``--allow-urls``, loopback 127.0.0.1 allowed by ``url_allow_networks`` so
that a misbehaving server can be reached at all) and an audio worker, both capped at
``CAP_MB`` of address space: an input that escapes its bounds makes the worker fail with a
MemoryError (and the test with it) instead of taking the machine. Every probe must end
with a final record and a clear error within its deadline; the workers serve on.

- URLs: a dripping server, a garbage status line, a 70 KiB header, an endless body, a
  Content-Length of a terabyte, redirects to ftp:, to https:, in a loop and to a private
  address; private, loopback, link-local (cloud metadata), mapped and numeric addresses
  are refused before any connection, all with one and the same error text (an open port
  and a closed one cannot be told apart).
- Images: 13000x13000 PNGs of 170 KB (169 M pixels decoded), refused by the producer from
  the header and, sent six at a time past it, by the worker; a job of three
  images over the worker's decoded-pixel budget, and six 6000x6000 images at once within
  it (they take turns).
- Audio: a 1 Hz waveform (resampling would make 16,000x of it), a WAV file of 601 s.
- The producer's file reads: /dev/zero, /dev/urandom, a FIFO, a directory, a sparse 3 GB
  file, all refused at once by a producer capped at 1 GB.
- SIGTERM while a fetch drips: the worker exits within the fetch deadline.
"""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import transformers
from compare import assert_same
from conftest import Deployment, WorkerProcess, wait_until
from fault_support import HOSTILE_CAP_MB
from hostile_server import HostileServer, drip, endless, free_port, ok, redirect
from PIL import Image
from tiny_media_models import build_media_model, image_bytes, sample_audio, sample_image, wav_bytes

from pipeq import RemotePipeline
from pipeq.errors import JobFailed, ValidationError

CAP_MB = HOSTILE_CAP_MB
FETCH_DEADLINE_S = 3.0
PIXEL_BUDGET = 80_000_000


@dataclass
class Hostile:
    dep: Deployment
    image: RemotePipeline
    audio: RemotePipeline
    image_worker: WorkerProcess
    audio_worker: WorkerProcess
    allowed: HostileServer
    private: HostileServer
    local_image: Any
    png: bytes


def big_png(width: int, height: int) -> bytes:
    """A valid grayscale PNG of width x height black pixels: a few hundred KB on disk."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

    packer = zlib.compressobj(9)
    row = b"\x00" * (width + 1)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def hostile(redis_url: str, models_dir: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Hostile]:
    dep = Deployment(redis_url, tmp_path_factory.mktemp("hostile"),
                     max_decoded_pixels=PIXEL_BUDGET, url_fetch_timeout_s=FETCH_DEADLINE_S)
    image_model = str(build_media_model("image-classification", models_dir))
    audio_model = str(build_media_model("audio-classification", models_dir))
    png = image_bytes(sample_image(48, 36, seed=3))
    private = HostileServer("127.0.0.2", {"/ok.png": ok(png)})
    allowed = HostileServer("127.0.0.1", {"/ok.png": ok(png)})
    stop = allowed.stop
    allowed.routes.update({
        "/drip-headers": drip(stop, b"HTTP/1.1 200 OK\r\n"),
        "/drip-body": drip(stop, b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"),
        "/bad-status": b"garbage, not HTTP\r\n\r\n",
        "/long-header": b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 70_000 + b"\r\n\r\n",
        "/endless": endless(stop),
        "/terabyte": b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000000\r\n\r\n" + png,
        "/short-body": b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" + png[:100],
        "/not-found": b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
        "/to-ftp": redirect("ftp://127.0.0.1/ok.png"),
        "/to-file": redirect("file:///etc/passwd"),
        "/to-https": redirect(f"https://127.0.0.1:{allowed.port}/ok.png"),
        "/to-private": redirect(private.url("/ok.png")),
        "/to-metadata": redirect("http://169.254.169.254/latest/meta-data/", 307),
        "/loop": redirect("/loop"),
        "/relative": redirect("/ok.png", 301),
    })
    env = {"PIPEQ_URL_ALLOW_NETWORKS": '["127.0.0.1/32"]'}
    image_worker = dep.start_worker(
        "image-classification", image_model, "--allow-urls", "--max-payload-bytes", "2000000",
        "--max-wait-ms", "20", ready=False, env=env, address_space_mb=CAP_MB)
    audio_worker = dep.start_worker("audio-classification", audio_model, "--max-wait-ms", "20",
                                    ready=False, address_space_mb=CAP_MB)
    image_worker.wait_ready()
    audio_worker.wait_ready()
    yield Hostile(dep, dep.remote("image-classification", image_model),
                  dep.remote("audio-classification", audio_model), image_worker, audio_worker,
                  allowed, private, transformers.pipeline("image-classification",
                                                          model=image_model), png)
    allowed.close()
    private.close()
    dep.close()


def outcomes(jobs: list[tuple[str, Any, float]], wait: float) -> dict[str, tuple[str, float]]:
    """name -> (what the caller got, seconds from submit to answer) for submitted jobs,
    each awaited on its own thread."""
    def answer(entry: tuple[str, Any, float]) -> tuple[str, tuple[str, float]]:
        name, job, started = entry
        try:
            got = f"OK {job.result(timeout=wait)!r:.60}"
        except JobFailed as exc:
            got = f"{exc.error_type}: {exc.remote_message}"
        except Exception as exc:
            got = f"{type(exc).__name__}: {exc}"
        return name, (got, time.monotonic() - started)

    with ThreadPoolExecutor(len(jobs)) as pool:
        return dict(pool.map(answer, jobs))


def peak_mb(worker: WorkerProcess, field: str = "VmHWM") -> float:
    """The worker's peak resident memory (VmHWM) or address space (VmPeak), in MB."""
    status = Path(f"/proc/{worker.pid}/status").read_text()
    line = next(x for x in status.splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def alive_and_serving(h: Hostile) -> None:
    assert h.image_worker.proc.poll() is None, h.image_worker.log()[-3000:]
    assert h.audio_worker.proc.poll() is None, h.audio_worker.log()[-3000:]
    assert_same(h.image(h.png, timeout=60), h.local_image(Image.open(io.BytesIO(h.png))))
    assert "MemoryError" not in h.image_worker.log() + h.audio_worker.log()


# --- URLs ----------------------------------------------------------------------------------


def test_url_probes_end_within_the_deadline_with_one_generic_error(hostile: Hostile) -> None:
    h, a, p = hostile, hostile.allowed, hostile.private
    closed, closed_private = free_port("127.0.0.1"), free_port("127.0.0.2")
    generic = [
        ("dripping headers", a.url("/drip-headers")),
        ("dripping body", a.url("/drip-body")),
        ("garbage status line", a.url("/bad-status")),
        ("70 KiB header line", a.url("/long-header")),
        ("body shorter than its length", a.url("/short-body")),
        ("404", a.url("/not-found")),
        ("closed port (allowed host)", f"http://127.0.0.1:{closed}/ok.png"),
        ("redirect to ftp:", a.url("/to-ftp")),
        ("redirect to file:", a.url("/to-file")),
        ("redirect http -> https", a.url("/to-https")),
        ("redirect to a private address", a.url("/to-private")),
        ("redirect to cloud metadata", a.url("/to-metadata")),
        ("redirect loop", a.url("/loop")),
        ("loopback, open port", p.url("/ok.png")),
        ("loopback, closed port", f"http://127.0.0.2:{closed_private}/ok.png"),
        ("loopback as a decimal number", f"http://2130706434:{p.port}/ok.png"),
        ("loopback in hex", f"http://0x7f000002:{p.port}/ok.png"),
        ("IPv4-mapped IPv6 loopback", f"http://[::ffff:127.0.0.2]:{p.port}/ok.png"),
        ("IPv6 loopback", f"http://[::1]:{p.port}/ok.png"),
        ("unspecified 0.0.0.0", f"http://0.0.0.0:{a.port}/ok.png"),
        ("cloud metadata", "http://169.254.169.254/latest/meta-data/"),
        ("private 10/8", "http://10.0.0.1/ok.png"),
        ("private 192.168/16", "http://192.168.1.1/ok.png"),
        ("shared 100.64/10", "http://100.64.0.1/ok.png"),
        ("no such host", "http://no-such-host.invalid/ok.png"),
        ("port out of range", "http://127.0.0.1:99999/ok.png"),
    ]
    too_large = [("endless body", a.url("/endless")), ("a terabyte announced", a.url("/terabyte"))]
    fine = [("allowed host", a.url("/ok.png")), ("relative redirect", a.url("/relative"))]
    jobs = [(name, h.image.submit(url, timeout=60), time.monotonic())
            for name, url in generic + too_large + fine]
    got = outcomes(jobs, wait=40)
    table = "\n".join(f"  {n:<32} {s:6.2f}s  {g[:110]}" for n, (g, s) in got.items())
    print(f"\nURL probes ({len(got)}):\n{table}")

    generic_texts = {got[name][0] for name, _ in generic}
    assert len(generic_texts) == 1, table  # nothing tells an open port from a closed one
    (text,) = generic_texts
    assert text.startswith("ValidationError: input #0: cannot fetch the URL"), table
    for name, _ in too_large:
        assert "larger than this route's payload limit of 2,000,000 bytes" in got[name][0], table
    expected = h.local_image(Image.open(io.BytesIO(h.png)))
    results = {name: job for name, job, _ in jobs}
    for name, _ in fine:
        assert got[name][0].startswith("OK "), table
        assert_same(results[name].result(timeout=5), expected)
    # Each within the fetch deadline (plus a turn behind the 4 media threads); the drips
    # were cut by the deadline, not by anything else.
    assert max(s for _, s in got.values()) < 2 * FETCH_DEADLINE_S + 15, table
    assert got["dripping body"][1] >= FETCH_DEADLINE_S - 0.5, table
    assert p.hits == {}, "a private address was contacted"
    for _, job, _ in jobs:  # every job has its final record
        assert job.status() in ("SUCCESS", "FAILURE")
    alive_and_serving(h)


# --- images and audio ------------------------------------------------------------------------


def test_decoded_pixels_are_bounded_per_image_and_per_worker(hostile: Hostile) -> None:
    h = hostile
    bomb = big_png(13000, 13000)
    assert len(bomb) < 600_000
    medium = big_png(6000, 6000)
    # The producer reads the header and refuses it before anything is enqueued ...
    with pytest.raises(ValidationError, match=r"is 13000x13000 = 169,000,000 pixels, over the "
                                              r"limit of 50,000,000 per image"):
        h.image.submit(bomb)
    # ... and so does the worker, for messages that bypass the producer (a ready envelope).
    envelope = {"$media": "image", "format": "png", "data": base64.b64encode(bomb).decode()}
    with ThreadPoolExecutor(6) as pool:
        started = time.monotonic()
        bombs = list(pool.map(lambda _: h.image.submit(envelope, timeout=120), range(6)))
        mediums = list(pool.map(lambda _: h.image.submit(medium, timeout=120), range(6)))
    over_budget = h.image.submit([medium, medium, medium], timeout=120)
    for job in bombs:
        with pytest.raises(JobFailed) as info:
            job.result(timeout=60)
        assert "is 13000x13000 = 169,000,000 pixels, over the limit of 50,000,000 per image " \
               "(PIPEQ_MAX_IMAGE_PIXELS)" in info.value.remote_message
    with pytest.raises(JobFailed) as info:
        over_budget.result(timeout=60)
    assert f"108,000,000 pixels decoded, over this worker's limit of {PIXEL_BUDGET:,}" in \
        info.value.remote_message
    # Each against the local pipeline (within float tolerance): the six ran in batches of
    # different sizes, which may change the last bits (one CI run saw unequal floats).
    local = h.local_image(Image.open(io.BytesIO(medium)))
    for job in mediums:
        assert_same(job.result(timeout=120), local)
    print(f"\npixels: 6 bombs + 6 x 36 Mpx + 1 over budget in {time.monotonic() - started:.1f}s; "
          f"image worker peak RSS {peak_mb(h.image_worker):.0f} MB, address space "
          f"{peak_mb(h.image_worker, 'VmPeak'):.0f} MB (cap {CAP_MB} MB)")
    # Pillow's own bomb limit: refused by the producer, nothing enqueued.
    with pytest.raises(ValidationError, match=r"has far more pixels than the limit"):
        h.image.submit(big_png(14000, 14000))
    alive_and_serving(h)


def test_audio_duration_is_bounded_before_decoding(hostile: Hostile) -> None:
    h = hostile
    one_hertz = {"array": np.zeros(100_000, dtype=np.float32), "sampling_rate": 1}
    long_wav = wav_bytes(np.zeros(601 * 1000, dtype=np.float32), rate=1000, subtype="PCM_16")
    for probe, what in [(one_hertz, "100,000 samples at 1 Hz"),
                        (long_wav, "601,000 samples at 1000 Hz")]:
        started = time.monotonic()
        with pytest.raises(JobFailed) as info:
            h.audio(probe, timeout=60)
        assert what in info.value.remote_message
        assert "over the limit of 600s of audio per input (PIPEQ_MAX_AUDIO_SECONDS)" in \
            info.value.remote_message
        assert time.monotonic() - started < 10
    clip = {"array": sample_audio(0.3, 1), "sampling_rate": 16_000}
    assert h.audio(clip, timeout=60)
    alive_and_serving(h)


# --- the producer's file reads -----------------------------------------------------------------


PRODUCER_PROBE = textwrap.dedent("""
    import json, sys, time
    from pipeq import pipeline
    remote = pipeline("image-classification", model=sys.argv[1])
    out = {}
    for path in sys.argv[2:]:
        started = time.monotonic()
        try:
            remote.submit(path, require_worker=False)
            got = "enqueued"
        except Exception as exc:
            got = f"{type(exc).__name__}: {exc}"
        out[path] = [got, time.monotonic() - started]
    print(json.dumps(out))
""")


def test_the_producer_reads_only_bounded_regular_files(hostile: Hostile, tmp_path: Path
                                                       ) -> None:
    fifo, sparse = tmp_path / "fifo", tmp_path / "sparse.png"
    os.mkfifo(fifo)
    with open(sparse, "wb") as handle:
        handle.truncate(3 * 1024**3)
    paths = ["/dev/zero", "/dev/urandom", str(fifo), str(tmp_path), str(sparse)]
    run = subprocess.run(
        ["prlimit", f"--as={1024**3}", "--", sys.executable, "-c", PRODUCER_PROBE,
         hostile.image.route.model, *paths],
        env=hostile.dep.env(), capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.splitlines()[-1])
    for path in paths[:4]:
        assert got[path][0].startswith("ValidationError: the input ("), got
        assert "is not a regular file" in got[path][0], got
    assert "is 3,221,225,472 bytes, over the payload limit" in got[str(sparse)][0], got
    assert max(seconds for _, seconds in got.values()) < 2, got


# --- stopping ---------------------------------------------------------------------------------


def test_sigterm_while_a_fetch_drips_ends_within_the_fetch_deadline(hostile: Hostile) -> None:
    h = hostile
    job = h.image.submit(h.allowed.url("/drip-body"), timeout=60)
    wait_until(lambda: h.allowed.hits.get("/drip-body", 0) >= 2, 20, "the dripping fetch")
    started = time.monotonic()
    code = h.image_worker.stop(timeout=60)
    took = time.monotonic() - started
    print(f"\nSIGTERM during a dripping fetch: exit {code} after {took:.1f}s")
    assert took < FETCH_DEADLINE_S + 15
    # Its job ended with a record (the fetch failed), or went back to the queue unstarted.
    state = job.status()
    assert state == "FAILURE" or state == "PENDING", state
