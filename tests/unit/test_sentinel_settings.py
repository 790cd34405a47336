"""Sentinel URLs and the settings that go with them: parsing, errors, secrets, clients built
from them (no server needed: nothing here connects)."""

from __future__ import annotations

import ssl

import pytest
import redis

from pipeq.core.celery_config import SENTINELS_OPTION, celery_config
from pipeq.core.config import Settings, load_settings
from pipeq.core.redis_io import SentinelRedis, connect
from pipeq.core.sentinel import EXPECTED_FORM, SentinelURL, SentinelURLError, parse_sentinel_url
from pipeq.errors import ConfigError

URL = "sentinel://h1:26379,h2:26380,h3/2?master=jobs"


def settings(**overrides: object) -> Settings:
    return Settings(routes_file="/nonexistent/routes.toml", **overrides)  # type: ignore[arg-type]


def test_the_documented_form_parses() -> None:
    assert parse_sentinel_url(URL) == SentinelURL(
        sentinels=(("h1", 26379), ("h2", 26380), ("h3", 26379)), master="jobs", db=2)
    assert parse_sentinel_url("sentinel://[::1]:5000,10.0.0.2/0?master=a.b-c_d") == SentinelURL(
        sentinels=(("::1", 5000), ("10.0.0.2", 26379)), master="a.b-c_d", db=0)
    assert parse_sentinel_url("sentinel://h1?master=m").db == 0  # no database: 0


@pytest.mark.parametrize(("url", "problem"), [
    ("sentinel://h1:26379,h2:26379/0", "needs exactly one ?master=NAME"),
    ("sentinel://h1/0?master=a&master=b", "needs exactly one ?master=NAME"),
    ("sentinel://h1/0?master=", "needs exactly one ?master=NAME"),
    ("sentinel://h1/0?master=a%20b", "needs exactly one ?master=NAME"),
    ("sentinel://h1/0?master=m&password=x", "unknown parameter(s) password"),
    ("sentinel://:secret@h1/0?master=m", "PIPEQ_REDIS_PASSWORD"),
    ("sentinel://h1:99999/0?master=m", "has sentinel 'h1:99999', not host[:port]"),
    ("sentinel://h1:0/0?master=m", "not host[:port]"),
    ("sentinel://h1,,h2/0?master=m", "empty one between commas"),
    ("sentinel:///0?master=m", "names no sentinel"),
    ("sentinel://h1/zero?master=m", "database 'zero', not a number"),
    ("sentinel://h1;sentinel://h2/0?master=m", "not host[:port]"),  # kombu's form: not ours
    ("sentinel://h1/0?master=m#x", "#fragment"),
])
def test_a_malformed_url_is_refused_saying_the_expected_form(url: str, problem: str) -> None:
    with pytest.raises(SentinelURLError) as info:
        parse_sentinel_url(url)
    assert problem in str(info.value)
    assert EXPECTED_FORM in str(info.value)
    # Through the settings: a ConfigError naming the setting, never echoing a secret.
    with pytest.raises(ConfigError) as config_info:
        load_settings(redis_url=url, routes_file="/nonexistent/routes.toml")
    assert problem in str(config_info.value) and EXPECTED_FORM in str(config_info.value)
    assert "secret" not in str(config_info.value)


def test_an_unknown_scheme_names_sentinel_among_the_accepted_ones() -> None:
    with pytest.raises(ConfigError, match="sentinel://"):
        load_settings(redis_url="sentinels://h1/0?master=m", routes_file="/nonexistent")


def test_passwords_are_masked_in_the_effective_settings() -> None:
    shown = settings(redis_url=URL, redis_password="data-secret",
                     sentinel_password="sentinel-secret", sentinel_tls=True).masked()
    assert shown["redis_url"] == URL
    assert shown["redis_password"] == shown["sentinel_password"] == "**********"
    assert shown["sentinel_tls"] is True
    assert "data-secret" not in repr(settings(redis_url=URL, redis_password="data-secret"))


def test_a_redis_url_and_redis_password_may_not_disagree() -> None:
    with pytest.raises(ConfigError, match="set it in one place"):
        load_settings(redis_url="redis://:one@h:6379/0", redis_password="two",
                      routes_file="/nonexistent")
    same = settings(redis_url="redis://:p%40ss@h:6379/0", redis_password="p@ss")
    assert same.redis_password_value() == "p@ss"


def test_the_client_of_a_sentinel_url_asks_every_sentinel_for_the_master() -> None:
    client = connect(settings(redis_url=URL, redis_password="data-secret",
                              sentinel_password="sentinel-secret"), socket_timeout_s=7)
    assert isinstance(client, SentinelRedis)
    pool = client.connection_pool
    assert pool.service_name == "jobs" and pool.is_master
    manager = pool.sentinel_manager
    hosts = [(s.connection_pool.connection_kwargs["host"], s.connection_pool.connection_kwargs[
        "port"]) for s in manager.sentinels]
    assert hosts == [("h1", 26379), ("h2", 26380), ("h3", 26379)]
    assert manager.sentinels[0].connection_pool.connection_kwargs["password"] == "sentinel-secret"
    kwargs = pool.connection_kwargs
    assert (kwargs["password"], kwargs["db"], kwargs["socket_timeout"]) == ("data-secret", 2, 7)
    client.close()


def test_sentinel_tls_applies_to_the_sentinels_and_the_servers() -> None:
    client = connect(settings(redis_url=URL, sentinel_tls=True, redis_ssl_cert_reqs="optional"))
    pool = client.connection_pool
    assert pool.connection_class.__name__ == "SentinelManagedSSLConnection"
    assert pool.connection_kwargs["ssl_cert_reqs"] == "optional"
    sentinel_pool = pool.sentinel_manager.sentinels[0].connection_pool
    assert sentinel_pool.connection_class is redis.SSLConnection
    client.close()


def test_redis_password_applies_to_a_redis_url_without_one() -> None:
    client = connect(settings(redis_url="redis://h:6379/0", redis_password="pw"))
    assert client.connection_pool.connection_kwargs["password"] == "pw"
    config = celery_config(settings(redis_url="redis://h:6379/0", redis_password="p/w@"),
                           "redis://h:6379/0")
    assert config["broker_url"] == "redis://:p%2Fw%40@h:6379/0"


def test_celery_gets_kombus_sentinel_form_with_every_sentinel_and_password() -> None:
    config = celery_config(settings(redis_url=URL, redis_password="p@ss",
                                    sentinel_password="sp", sentinel_tls=True), URL)
    assert config["broker_url"] == ";".join(
        f"sentinel://:p%40ss@{host}/2" for host in ("h1:26379", "h2:26380", "h3:26379"))
    options = config["broker_transport_options"]
    assert options["master_name"] == "jobs"
    assert options["sentinel_kwargs"]["password"] == "sp"
    assert options["sentinel_kwargs"]["ssl"] is True
    assert options[SENTINELS_OPTION] == [["h1", 26379], ["h2", 26380], ["h3", 26379]]
    assert config["broker_use_ssl"] == {"ssl_cert_reqs": ssl.CERT_REQUIRED}


class ServerInfo:
    """A client whose INFO server section says ``mode`` (what Redis Cluster answers)."""

    def __init__(self, mode: str):
        self.mode = mode

    def info(self, section: str) -> dict[str, str]:
        return {"redis_version": "7.2.4", "redis_mode": self.mode}


def test_a_worker_refuses_redis_cluster_and_a_bare_sentinel_saying_what_to_use() -> None:
    from pipeq.worker.broker.claiming import unsupported_redis

    assert unsupported_redis(ServerInfo("standalone")) is None
    cluster = unsupported_redis(ServerInfo("cluster"))
    assert cluster is not None and "Redis Cluster is not supported" in cluster
    assert "use Sentinel, or one Redis per group of routes" in cluster
    sentinel = unsupported_redis(ServerInfo("sentinel"))
    assert sentinel is not None and EXPECTED_FORM.replace("NAME", "") in sentinel


def test_a_replica_wait_must_end_before_the_connect_timeout() -> None:
    with pytest.raises(ConfigError, match="WAIT_TIMEOUT_MS must be below PIPEQ_CONNECT_TIMEOUT_S"):
        load_settings(redis_wait_replicas=1, redis_wait_timeout_ms=2000, connect_timeout_s=2,
                      routes_file="/nonexistent")
    assert settings(redis_wait_replicas=1, redis_wait_timeout_ms=1999,
                    connect_timeout_s=2).redis_wait_timeout_ms == 1999
