"""The gateway's pure parts: webhook signatures, URL checks, API keys, start-up refusals."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks import Webhook

from pipeq.core.config import Settings
from pipeq.errors import ConfigError, ValidationError
from pipeq.gateway.app import PREFER_WAIT
from pipeq.gateway.auth import load_keyring
from pipeq.gateway.webhooks import check_url, secret_key, signed_headers
from pipeq.gateway.wire import check_media_inputs, jsonable
from pipeq.ops.cli import main
from pipeq.ops.exits import Exit

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()


def test_signatures_verify_with_the_standard_webhooks_library() -> None:
    body = b'{"type":"job.success","data":{"id":"j1"}}'
    headers = signed_headers(secret_key(SECRET), "msg_j1", body)
    assert Webhook(SECRET).verify(body, headers)["data"] == {"id": "j1"}
    assert headers["webhook-signature"].startswith("v1,")
    stale = signed_headers(secret_key(SECRET), "msg_j1", body, now=time.time() - 3600)
    with pytest.raises(Exception, match=r"(?i)timestamp|old"):
        Webhook(SECRET).verify(body, stale)


@pytest.mark.parametrize("secret", ["nope", "whsec_", "whsec_!!!", "whsec_" + "QUJD"])
def test_a_bad_webhook_secret_is_a_config_error(secret: str) -> None:
    with pytest.raises(ConfigError, match="whsec_"):
        secret_key(secret)


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8080/hook", "http://localhost/hook", "http://10.1.2.3/x",
    "http://192.168.0.1/x", "http://169.254.169.254/latest/meta-data", "http://[::1]/x",
    "http://0.0.0.0/x", "http://172.16.0.9/x"])
def test_webhook_urls_into_the_deployment_are_refused(url: str) -> None:
    with pytest.raises(ValidationError, match="PIPEQ_WEBHOOK_ALLOW_PRIVATE"):
        check_url(url, allow_private=False)
    check_url(url, allow_private=True)


@pytest.mark.parametrize("url", ["ftp://example.com/x", "file:///etc/passwd", "http:///x",
                                 "javascript:alert(1)"])
def test_webhook_urls_must_be_http(url: str) -> None:
    with pytest.raises(ValidationError, match="http"):
        check_url(url, allow_private=True)


def test_a_public_address_is_allowed() -> None:
    check_url("https://93.184.216.34/hook", allow_private=False)


def test_api_keys_from_the_variable_and_a_file(tmp_path: Path) -> None:
    file = tmp_path / "keys.toml"
    digest = hashlib.sha256(b"s" * 20).hexdigest()
    file.write_text(f'[[key]]\nname = "f"\nsecret_sha256 = "{digest}"\n'
                    'routes = ["text-classification:m1"]\nrate_limit_per_minute = 5\n')
    ring = load_keyring(Settings(gateway_api_keys="a:" + "x" * 16 + ",b:" + "y" * 16,
                                 gateway_api_keys_file=file))
    assert len(ring) == 3
    key = ring.find("s" * 20)
    assert key is not None and key.name == "f" and key.rate_limit_per_minute == 5
    found = ring.find("x" * 16)
    assert found is not None and found.name == "a"
    assert ring.find("x" * 15) is None and ring.find("") is None


@pytest.mark.parametrize(("value", "text"), [
    ("a:short", "16 characters"), ("nocolon", "name:secret"),
    ('a"b:' + "x" * 16, "names of letters"),
    ("a:" + "x" * 16 + ",a:" + "y" * 16, "unique")])
def test_bad_api_keys_are_config_errors(value: str, text: str) -> None:
    with pytest.raises(ConfigError, match=text):
        load_keyring(Settings(gateway_api_keys=value))


def test_a_keys_file_entry_needs_exactly_one_secret(tmp_path: Path) -> None:
    file = tmp_path / "keys.toml"
    file.write_text('[[key]]\nname = "f"\n')
    with pytest.raises(ConfigError, match="exactly one"):
        load_keyring(Settings(gateway_api_keys_file=file))
    file.write_text('[[key]]\nname = "f"\nsecret = "' + "z" * 16 + '"\nunknown = 1\n')
    with pytest.raises(ConfigError, match="unknown"):
        load_keyring(Settings(gateway_api_keys_file=file))


def test_prefer_wait_is_read_among_other_preferences() -> None:
    def read(header: str) -> str | None:
        match = PREFER_WAIT.search(header)
        return match.group(1) if match else None

    assert read("wait=10") == "10"
    assert read("respond-async, wait=2.5") == "2.5"
    assert read("handling=lenient; Wait = 7") == "7"
    assert read("respond-async") is None and read("nowait=3") is None


def test_the_gateway_refuses_to_start_without_keys(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("PIPEQ_GATEWAY_API_KEYS", raising=False)
    monkeypatch.delenv("PIPEQ_GATEWAY_API_KEYS_FILE", raising=False)
    assert main(["gateway"]) == Exit.USAGE
    assert "refuses to start without API keys" in capsys.readouterr().err
    assert main(["gateway", "--no-auth", "--host", "0.0.0.0"]) == Exit.USAGE
    assert "binds loopback only" in capsys.readouterr().err


@pytest.mark.parametrize(("task", "inputs", "where"), [
    ("image-classification", "/etc/passwd", "inputs"),
    ("image-classification", ["https://example.com/a.png", "secret.png"], "inputs[1]"),
    ("image-classification", {"$media": "image", "format": "png", "claim": "pipeq:job:x"},
     "inputs"),
    ("document-question-answering", {"image": "/etc/hosts", "question": "what?"},
     "inputs.image"),
    ("automatic-speech-recognition", "/tmp/a.wav", "inputs"),
    ("automatic-speech-recognition", {"path": "/tmp/a.wav", "sampling_rate": 16000}, "inputs"),
])
def test_http_media_inputs_cannot_reach_into_the_deployment(task: str, inputs: Any,
                                                             where: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(where + ":")):
        check_media_inputs(task, inputs)


@pytest.mark.parametrize(("task", "inputs"), [
    ("image-classification", ["https://example.com/a.png", "data:image/png;base64,iVBORw0K"]),
    ("image-classification", {"$media": "image", "format": "png", "data": "iVBORw0K"}),
    ("automatic-speech-recognition", {"$media": "audio", "format": "wav", "data": "UklGRg=="}),
    ("automatic-speech-recognition", {"array": [0.0, 0.1], "sampling_rate": 16000}),
    ("text-classification", "/etc/passwd"),  # a text task's string is text
])
def test_http_media_inputs_that_carry_their_bytes_pass(task: str, inputs: Any) -> None:
    check_media_inputs(task, inputs)


def test_results_become_json_as_the_python_client_sees_them() -> None:
    import numpy as np
    from PIL import Image

    image = Image.new("L", (3, 2), color=7)
    out = jsonable({"embedding": np.arange(4, dtype=np.float32).reshape(2, 2),
                    "score": np.float64(0.5), "nan": float("nan"), "mask": image,
                    "raw": b"\x89PNG...", "labels": ("a", "b")})
    assert out["embedding"] == [[0.0, 1.0], [2.0, 3.0]] and out["score"] == 0.5
    assert out["nan"] is None and out["labels"] == ["a", "b"]
    assert out["raw"]["$media"] == "image" and out["raw"]["format"] == "png"
    mask = out["mask"]
    assert mask["$media"] == "image" and mask["format"] == "png"
    decoded = Image.open(io.BytesIO(base64.b64decode(mask["data"])))
    assert decoded.size == (3, 2) and decoded.getpixel((1, 1)) == 7
    json.dumps(out, allow_nan=False)
