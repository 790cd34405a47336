"""Issue #19's configuration probes: secrets however the URL is written, unknown PIPEQ_*
variables, the URL allow-list, the address checks of URL fetches, parameter templates."""

from __future__ import annotations

import ipaddress
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeq.core.config import OTHER_VARIABLES, Settings, load_settings, warn_unknown_variables
from pipeq.core.params import validate_params
from pipeq.core.secrets import mask_url
from pipeq.errors import ConfigError, ValidationError
from pipeq.worker.model.fetch import address_allowed, parse_networks

ROOT = Path(__file__).resolve().parents[2]
#: base64-style secrets: every character a URL parser stumbles on.
SECRETS = ["ab/cd#ef?gh", "x@y:z/w", "Zm9v/YmFy+Kw==", "p%2Fw#", "a?b=c&d"]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("PIPEQ_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("secret", SECRETS)
@pytest.mark.parametrize("template", [
    "redis://:{s}@cache:6379/0", "redis://admin:{s}@cache/0", "rediss://{s}@cache:6380",
    "unix://:{s}@/run/redis.sock?db=1", "redis://cache:6379/0?password={s}",
])
def test_mask_url_hides_the_secret_however_it_is_written(template: str, secret: str) -> None:
    url = template.format(s=secret)
    shown = mask_url(url)
    assert "****" in shown
    for piece in (p for p in secret.replace("?", "/").replace("#", "/").split("/") if len(p) > 2):
        assert piece not in shown.replace("password", ""), (url, shown)


def test_mask_url_keeps_what_is_not_secret() -> None:
    assert mask_url("redis://admin:s3cr/et@cache:6379/2") == "redis://admin:****@cache:6379/2"
    assert mask_url("redis://cache:6379/0") == "redis://cache:6379/0"


@pytest.mark.parametrize("secret", ["ab/cd", "ab#cd", "ab?cd", "a@b/c"])
def test_an_unencoded_password_is_refused_without_being_shown(
        monkeypatch: pytest.MonkeyPatch, secret: str) -> None:
    monkeypatch.setenv("PIPEQ_REDIS_URL", f"redis://:{secret}@cache:6379/0")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "percent-encode" in str(info.value)
    assert secret not in str(info.value) and "cd" not in str(info.value).replace("encode", "")


def test_a_percent_encoded_password_works_and_is_masked(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    monkeypatch.setenv("PIPEQ_REDIS_URL", "redis://:ab%2Fcd%23ef@cache:6379/0")
    assert load_settings().masked()["redis_url"] == "redis://:****@cache:6379/0"


def test_cli_config_and_status_never_show_the_secret_nor_a_traceback(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPEQ_")}
    env.update(PIPEQ_REDIS_URL="redis://:s3cr/et#tail@cache:6379/0", PYTHONPATH=str(ROOT),
               PIPEQ_SETTINGS_DIR=str(tmp_path))
    for command in ("config", "status"):
        done = subprocess.run([sys.executable, "-P", "-m", "pipeq", command], env=env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=60)
        output = done.stdout + done.stderr
        assert done.returncode == 2, output
        assert "Traceback" not in output and "s3cr" not in output and "tail" not in output
        assert "percent-encode" in output


def test_unknown_pipeq_variables_are_warned_not_refused(caplog: pytest.LogCaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPEQ_BOGUS", "1")
    monkeypatch.setenv("PIPEQ_WORKER_TASK", "fill-mask")  # docker compose's own: not warned
    monkeypatch.setenv("PIPEQ_RESULT_TTL_S", "60")
    with caplog.at_level(logging.WARNING, logger="pipeq.config"):
        settings = load_settings()
    assert settings.result_ttl_s == 60
    assert "unknown environment variable(s) PIPEQ_BOGUS ignored" in caplog.text
    assert "PIPEQ_WORKER_TASK" not in caplog.text
    assert warn_unknown_variables({"PIPEQ_TYPO_TTL": "1", "PIPEQ_LOG_JSON": "1"}) == [
        "PIPEQ_TYPO_TTL"]


def test_variables_that_are_not_settings_are_not_settings_either() -> None:
    assert not {f"PIPEQ_{n.upper()}" for n in Settings.model_fields} & OTHER_VARIABLES


def test_url_allow_networks_is_checked() -> None:
    assert Settings(url_allow_networks=["10.0.0.0/8", "127.0.0.1"]).url_allow_networks
    with pytest.raises(ConfigError, match="'ten' is not a network"):
        load_settings(url_allow_networks=["ten"])


@pytest.mark.parametrize(("address", "allowed"), [
    ("93.184.216.34", True), ("2606:2800:220:1:248:1893:25c8:1946", True),
    ("127.0.0.1", False), ("127.8.9.10", False), ("::1", False), ("0.0.0.0", False),
    ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.0.1", False), ("100.64.0.1", False),
    ("169.254.169.254", False), ("fe80::1", False), ("fd00:ec2::254", False),
    ("::ffff:127.0.0.1", False), ("::ffff:10.0.0.1", False), ("2002:7f00:1::", False),
    ("224.0.0.1", False), ("255.255.255.255", False), ("198.18.0.1", False),
])
def test_only_public_addresses_are_fetched(address: str, allowed: bool) -> None:
    assert address_allowed(ipaddress.ip_address(address), ()) is allowed


def test_the_allow_list_opens_exactly_what_it_names() -> None:
    nets = parse_networks(["10.1.0.0/16", "127.0.0.1"])
    assert address_allowed(ipaddress.ip_address("10.1.200.3"), nets)
    assert address_allowed(ipaddress.ip_address("127.0.0.1"), nets)
    assert not address_allowed(ipaddress.ip_address("10.2.0.1"), nets)
    assert not address_allowed(ipaddress.ip_address("127.0.0.2"), nets)


@pytest.mark.parametrize("template", ["This is {}.", "{}", "label: {} ({{literal}})"])
def test_plain_hypothesis_templates_pass(template: str) -> None:
    params = {"candidate_labels": ["a"], "hypothesis_template": template}
    assert validate_params("zero-shot-classification", params) == params


@pytest.mark.parametrize("template", ["{:x>3000000}", "{0}", "{label}", "{!r}", "{} {}",
                                      "{0.__class__}", "{[0]}", "none", "a } b {}"])
def test_other_hypothesis_templates_are_refused(template: str) -> None:
    with pytest.raises(ValidationError, match="hypothesis_template"):
        validate_params("zero-shot-classification",
                        {"candidate_labels": ["a"], "hypothesis_template": template})
