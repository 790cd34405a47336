"""Redis Sentinel URLs: ``sentinel://h1:26379,h2:26379,h3:26379/0?master=NAME``.

A deployment that must survive the loss of its Redis primary runs a primary, replicas and
(at least) three sentinels; every pipeq process is given the sentinels and the name of the
master they watch, asks them where the master is, and asks again after a failover. This
module parses that URL (pure logic: no connection is made here); ``pipeq.core.redis_io``
builds the clients and ``pipeq.core.celery_config`` the Celery broker settings from it.

Passwords are not part of the URL: the Redis servers' password is ``PIPEQ_REDIS_PASSWORD``,
the sentinels' ``PIPEQ_SENTINEL_PASSWORD``, and ``PIPEQ_SENTINEL_TLS`` turns on TLS to both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, urlsplit

#: The URL scheme of a Sentinel deployment.
SCHEME = "sentinel"
#: The port of a sentinel given without one (Redis Sentinel's own default).
DEFAULT_PORT = 26379
#: The form a sentinel URL must have, quoted in every error about one.
EXPECTED_FORM = "sentinel://host1:26379,host2:26379,host3:26379/0?master=NAME"

_HOST = re.compile(r"^(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9_.-]+))"
                   r"(?::(?P<port>[0-9]{1,5}))?$")
_MASTER = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


class SentinelURLError(ValueError):
    """Raised when a ``sentinel://`` URL does not have the expected form."""

    def __init__(self, problem: str):
        super().__init__(f"PIPEQ_REDIS_URL {problem}; expected {EXPECTED_FORM} (sentinels "
                         "separated by commas, the database number, the master's name)")


@dataclass(frozen=True, slots=True)
class SentinelURL:
    """A parsed sentinel URL: where the sentinels are, which master, which database."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0

    def kombu_urls(self, password: str | None = None) -> list[str]:
        """One kombu ``sentinel://`` URL per sentinel (kombu's form: they are joined by
        ``;``), each with the Redis servers' ``password``: kombu takes the password of the
        URL it switches to, so every one must carry it."""
        auth = f":{quote(password, safe='')}@" if password else ""
        return [f"{SCHEME}://{auth}{_netloc(host, port)}/{self.db}"
                for host, port in self.sentinels]

    def describe(self) -> str:
        """The URL as written (it holds no secret): for logs and errors."""
        hosts = ",".join(_netloc(host, port) for host, port in self.sentinels)
        return f"{SCHEME}://{hosts}/{self.db}?master={self.master}"


def is_sentinel_url(url: str) -> bool:
    """True for a ``sentinel://`` URL (well-formed or not)."""
    return url[:len(SCHEME) + 3].lower() == f"{SCHEME}://"


def parse_sentinel_url(url: str) -> SentinelURL:
    """Parse ``sentinel://h1:26379,h2:26379/0?master=NAME``; SentinelURLError says what is
    wrong (without quoting anything that may be a secret)."""
    if not is_sentinel_url(url):
        raise SentinelURLError("is not a sentinel:// URL")
    parts = urlsplit(url)
    if "@" in parts.netloc:
        raise SentinelURLError(
            "carries a user or password: set PIPEQ_REDIS_PASSWORD (the Redis servers') and "
            "PIPEQ_SENTINEL_PASSWORD (the sentinels') instead")
    if parts.fragment:
        raise SentinelURLError("has a #fragment")
    hosts = [text for text in parts.netloc.split(",")]
    if not parts.netloc or any(not text for text in hosts):
        raise SentinelURLError("names no sentinel, or an empty one between commas")
    sentinels = tuple(_sentinel(text) for text in hosts)
    db_text = parts.path.strip("/") or "0"
    if not db_text.isdigit():
        raise SentinelURLError(f"has database {db_text!r}, not a number")
    query = parse_qsl(parts.query, keep_blank_values=True)
    unknown = sorted({name for name, _ in query} - {"master"})
    if unknown:
        raise SentinelURLError(f"has unknown parameter(s) {', '.join(unknown)}")
    masters = [value for name, value in query if name == "master"]
    if len(masters) != 1 or not _MASTER.match(masters[0]):
        raise SentinelURLError(
            "needs exactly one ?master=NAME (the name the sentinels monitor: letters, digits, "
            "'_', '.', '-')")
    return SentinelURL(sentinels=sentinels, master=masters[0], db=int(db_text))


def _sentinel(text: str) -> tuple[str, int]:
    match = _HOST.match(text)
    port = int(match.group("port") or DEFAULT_PORT) if match else 0
    if match is None or not 0 < port < 65536:
        raise SentinelURLError(f"has sentinel {text!r}, not host[:port] (port 1-65535)")
    return match.group("ipv6") or match.group("name"), port


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
