"""API keys of the gateway: who is calling, which routes it may use, how often.

Keys come from ``PIPEQ_GATEWAY_API_KEYS`` (``name:secret,...``) or a TOML file
(``PIPEQ_GATEWAY_API_KEYS_FILE``) of ``[[key]]`` tables. Only SHA-256 digests of the secrets
are kept in memory (a file may hold ``secret_sha256`` instead of ``secret``). Rate limits
are counted in Redis, so every gateway replica shares them.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pydantic
import redis
from pydantic import BaseModel, ConfigDict, Field

from pipeq.core.config import Settings
from pipeq.core.contract import Route
from pipeq.core.keys import Keys
from pipeq.errors import ConfigError

#: What an API key's name may be made of (it appears in Redis keys and metrics labels).
NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: The owner of every job when the gateway runs with ``--no-auth``.
ANONYMOUS = "anonymous"


def digest(secret: str) -> str:
    """The SHA-256 hex digest of an API key's secret (what is kept)."""
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyEntry(BaseModel):
    """One ``[[key]]`` table of the API keys file."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")  # as NAME
    secret: str | None = Field(default=None, min_length=16)
    secret_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    #: ``task:model`` of each route the key may use (none listed: every route).
    routes: list[str] = Field(default_factory=list)
    rate_limit_per_minute: int | None = Field(default=None, ge=1)
    #: Where this key's jobs' outcomes are POSTed unless a job names its own URL.
    webhook_url: str | None = None


class KeysFile(BaseModel):
    """The API keys file: a list of ``[[key]]`` tables."""

    model_config = ConfigDict(extra="forbid")

    key: list[KeyEntry] = Field(default_factory=list)


@dataclass(frozen=True)
class ApiKey:
    """A caller of the gateway, as its secret's digest identifies it."""

    name: str
    secret_sha256: str
    routes: frozenset[tuple[str, str]] = frozenset()
    rate_limit_per_minute: int = 600
    webhook_url: str | None = None

    def allows(self, route: Route) -> bool:
        """True if this key may submit jobs to ``route``."""
        return not self.routes or (route.task, route.model) in self.routes


class KeyRing:
    """Every API key of the gateway, found by the digest of the secret a request sends."""

    def __init__(self, keys: list[ApiKey]):
        self._by_digest = {k.secret_sha256: k for k in keys}
        names = [k.name for k in keys]
        if len(set(names)) != len(names):
            raise ConfigError(f"API key names must be unique, got {sorted(names)}")

    def __len__(self) -> int:
        return len(self._by_digest)

    def find(self, secret: str) -> ApiKey | None:
        """The key whose secret is ``secret``, or None."""
        wanted = digest(secret)
        for known, key in self._by_digest.items():
            if hmac.compare_digest(known, wanted):
                return key
        return None


def load_keyring(settings: Settings) -> KeyRing:
    """The API keys from the settings (ConfigError naming what is wrong)."""
    limit = settings.gateway_rate_limit_per_minute
    keys: list[ApiKey] = []
    if settings.gateway_api_keys is not None:
        for item in filter(None, (p.strip() for p in
                                  settings.gateway_api_keys.get_secret_value().split(","))):
            name, sep, secret = item.partition(":")
            if not sep or not NAME.fullmatch(name) or len(secret) < 16:
                raise ConfigError(
                    "PIPEQ_GATEWAY_API_KEYS takes name:secret,... with names of letters, digits, "
                    "_ . - and secrets of 16 characters "
                    f"or more (e.g. from `openssl rand -hex 24`); entry {name or '?'!r} is not")
            keys.append(ApiKey(name, digest(secret), rate_limit_per_minute=limit))
    if settings.gateway_api_keys_file is not None:
        keys += _keys_from_file(settings.gateway_api_keys_file, limit)
    return KeyRing(keys)


def _keys_from_file(path: Path, default_limit: int) -> list[ApiKey]:
    try:
        entries = KeysFile.model_validate(tomllib.loads(path.read_text())).key
    except (OSError, tomllib.TOMLDecodeError, pydantic.ValidationError) as exc:
        raise ConfigError(f"invalid API keys file {path}: {exc}") from None
    keys = []
    for entry in entries:
        if (entry.secret is None) == (entry.secret_sha256 is None):
            raise ConfigError(f"API key {entry.name!r} in {path}: give secret or secret_sha256 "
                              "(exactly one)")
        routes = set()
        for text in entry.routes:
            task, sep, model = text.partition(":")
            if not sep or not task or not model:
                raise ConfigError(f"API key {entry.name!r} in {path}: route {text!r} is not "
                                  "task:model")
            routes.add((task, model))
        keys.append(ApiKey(entry.name, entry.secret_sha256 or digest(entry.secret or ""),
                           frozenset(routes), entry.rate_limit_per_minute or default_limit,
                           entry.webhook_url))
    return keys


class RateLimiter:
    """Requests per key per minute, counted in Redis (fixed one-minute windows)."""

    def __init__(self, client: redis.Redis, keys: Keys):
        self.client = client
        self.keys = keys

    def take(self, key: ApiKey) -> float | None:
        """Count one request of ``key``; None if allowed, else seconds until it may retry."""
        now = time.time()
        window = int(now // 60)
        name = self.keys.rate_window(key.name, window)
        pipe = self.client.pipeline(transaction=False)
        pipe.incr(name)
        pipe.expire(name, 120)
        count = int(pipe.execute()[0])
        if count <= key.rate_limit_per_minute:
            return None
        return max(1.0, (window + 1) * 60 - now)
