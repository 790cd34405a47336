"""Completion webhooks: Standard Webhooks signatures, URL checks, the Redis outbox.

A job submitted with a webhook URL gets a hash (``Keys.webhook``) and a place in the outbox
(``Keys.webhook_outbox``, a sorted set scored by when to look next) in the same round trip
as its gateway record. :mod:`pipeq.gateway.delivery` looks at due entries until the job is
final, then POSTs the outcome until the receiver answers 2xx or ``webhook_retry_for_s``
has passed (then the webhook is dead-lettered). Everything lives in Redis, so a webhook
survives gateway, worker and (persistent) Redis restarts: delivered at least once.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import socket
import time
from urllib.parse import urlsplit

import redis

from pipeq.core.keys import Keys
from pipeq.errors import ConfigError, ValidationError

SECRET_PREFIX = "whsec_"


def secret_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_<base64>`` secret (ConfigError if it is not one)."""
    try:
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if not secret.startswith(SECRET_PREFIX) or len(key) < 24:
        raise ConfigError(
            "PIPEQ_WEBHOOK_SECRET must be whsec_ followed by base64 of 24 to 64 random bytes, "
            "e.g. whsec_$(openssl rand -base64 32)")
    return key


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value (Standard Webhooks, ``v1`` HMAC-SHA256)."""
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def signed_headers(key: bytes, msg_id: str, body: bytes, now: float | None = None
                   ) -> dict[str, str]:
    """The headers of one delivery attempt (a fresh timestamp and signature each time)."""
    timestamp = int(time.time() if now is None else now)
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(key, msg_id, timestamp, body),
            "content-type": "application/json", "user-agent": "pipeq-webhooks"}


def check_url(url: str, allow_private: bool) -> None:
    """Refuse a webhook URL that is not http(s), or (unless allowed) resolves to a loopback,
    link-local, private or otherwise non-public address. Blocking (DNS)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationError(f"webhook URL {url!r} must be an http:// or https:// URL with a "
                              "host")
    if allow_private:
        return
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 443, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise ValidationError(f"webhook host {parts.hostname!r} does not resolve: {exc}"
                              ) from None
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if not address.is_global or address.is_multicast:
            raise ValidationError(
                f"webhook URL {url!r} resolves to {address}, a loopback, link-local or private "
                "address: refused (no requests into the deployment). Set "
                "PIPEQ_WEBHOOK_ALLOW_PRIVATE=true to allow it")


class Outbox:
    """The webhooks waiting for their job to end or for a successful delivery."""

    def __init__(self, client: redis.Redis, keys: Keys, ttl_s: float):
        self.client = client
        self.keys = keys
        self.ttl_s = int(ttl_s)

    def add(self, pipe: redis.client.Pipeline, job_id: str, url: str, owner: str) -> None:
        """Queue a job's webhook (on the caller's pipeline, with the job's gateway record)."""
        name = self.keys.webhook(job_id)
        pipe.hset(name, mapping={"url": url, "owner": owner, "attempts": 0,
                                 "created": f"{time.time():.3f}"})
        pipe.expire(name, self.ttl_s)
        pipe.zadd(self.keys.webhook_outbox(), {job_id: time.time()})

    def depth(self) -> int:
        """Webhooks not yet delivered (jobs still running included)."""
        return int(self.client.zcard(self.keys.webhook_outbox()))

    def dead_count(self) -> int:
        """Webhooks given up on."""
        return int(self.client.llen(self.keys.webhook_dead()))

    def stats(self) -> dict[str, int]:
        """Totals: delivered, attempts, failed_attempts, dead."""
        raw = self.client.hgetall(self.keys.webhook_stats())
        return {k.decode() if isinstance(k, bytes) else str(k): int(v) for k, v in raw.items()}
