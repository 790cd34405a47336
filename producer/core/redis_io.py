"""Talking to Redis the same way everywhere: clients, text replies, bounded retries.

Redis restarting is not an error anyone should see; Redis staying away is, after a bounded
wait, as :class:`~pipeq.errors.BrokerUnavailable`, never a hang. Every retry in pipeq goes
through :func:`call_with_retry` (a call that must succeed) or :class:`Backoff` (a loop that
keeps going).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from importlib import resources
from typing import TYPE_CHECKING, Any, TypeVar

import redis
from redis.sentinel import Sentinel

from pipeq.core.secrets import mask_url
from pipeq.core.sentinel import SentinelURL, is_sentinel_url, parse_sentinel_url
from pipeq.errors import BrokerUnavailable

if TYPE_CHECKING:
    from pipeq.core.config import Settings

T = TypeVar("T")

#: What a lost or refused connection looks like (redis-py wraps most, not all, OSErrors).
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    redis.ConnectionError, redis.TimeoutError, OSError)


def is_redis_full(exc: BaseException) -> bool:
    """True for Redis refusing a write at ``maxmemory`` (noeviction), also when the refusal
    comes from inside a Lua script (Redis 6 wraps it in a script error)."""
    return isinstance(exc, redis.exceptions.OutOfMemoryError) or (
        isinstance(exc, redis.ResponseError) and "OOM command not allowed" in str(exc))


def as_text(value: Any) -> str:
    """A Redis reply (bytes or str) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def load_lua(name: str, package: str = "pipeq.core") -> str:
    """The text of the Lua script ``lua/<name>`` shipped in ``package``."""
    return (resources.files(package) / "lua" / name).read_text()


#: Longest wait for one sentinel to answer: a dead one must not hold every reconnect for
#: the whole connect timeout (the client asks the next sentinel instead).
SENTINEL_TIMEOUT_S = 2.0


def connect(settings: Settings, *, connect_timeout_s: float | None = None,
            socket_timeout_s: float | None = None, **kwargs: Any) -> redis.Redis:
    """A client of the deployment's Redis: the one way pipeq builds one from its settings
    (the URL, ``redis://``, ``rediss://``, ``unix://`` or ``sentinel://``, with the passwords
    and TLS settings that go with it). ``connect_timeout_s`` defaults to the setting's."""
    return redis_client(settings.redis_url_value(),
                        **_client_options(settings, connect_timeout_s, socket_timeout_s), **kwargs)


def _client_options(settings: Settings, connect_timeout_s: float | None,
                    socket_timeout_s: float | None) -> dict[str, Any]:
    """The keyword arguments of ``redis_client`` / ``async_redis_client`` from settings."""
    return {"ssl_cert_reqs": settings.redis_ssl_cert_reqs,
            "connect_timeout_s": (settings.connect_timeout_s if connect_timeout_s is None
                                  else connect_timeout_s),
            "socket_timeout_s": socket_timeout_s, "password": settings.redis_password_value(),
            "sentinel_password": settings.sentinel_password_value(),
            "sentinel_tls": settings.sentinel_tls}


def redis_client(url: str, *, ssl_cert_reqs: str = "required", connect_timeout_s: float = 10.0,
                 socket_timeout_s: float | None = None, password: str | None = None,
                 sentinel_password: str | None = None, sentinel_tls: bool = False,
                 **kwargs: Any) -> redis.Redis:
    """A client for ``url``; ``rediss://`` URLs verify certificates unless told otherwise.

    ``password``: the Redis servers' password where the URL carries none (always, for a
    ``sentinel://`` URL). A ``sentinel://`` URL gives a client of the master the sentinels
    name, which asks them again after a failover (``sentinel_password`` and ``sentinel_tls``
    apply to them; TLS then applies to the Redis servers too).
    """
    if is_sentinel_url(url):
        return sentinel_client(parse_sentinel_url(url), password=password,
                               sentinel_password=sentinel_password, tls=sentinel_tls,
                               ssl_cert_reqs=ssl_cert_reqs, connect_timeout_s=connect_timeout_s,
                               socket_timeout_s=socket_timeout_s, **kwargs)
    if url.startswith("rediss://"):
        kwargs.setdefault("ssl_cert_reqs", ssl_cert_reqs)
    if password:  # from_url lets a password in the URL win
        kwargs.setdefault("password", password)
    return redis.Redis.from_url(url, socket_connect_timeout=connect_timeout_s,
                                socket_timeout=socket_timeout_s, **kwargs)


class SentinelRedis(redis.Redis):
    """A client of a Sentinel-managed master whose ``close()`` also closes its connections
    to the sentinels (redis-py's leaves them open)."""

    def close(self) -> None:
        """Close the master's connections, then the sentinels'."""
        super().close()
        manager = getattr(self.connection_pool, "sentinel_manager", None)
        if manager is not None:
            manager.close()


def sentinel_client(target: SentinelURL, *, password: str | None, sentinel_password: str | None,
                    tls: bool, ssl_cert_reqs: str, connect_timeout_s: float,
                    socket_timeout_s: float | None, **kwargs: Any) -> redis.Redis:
    """A client of ``target``'s master. Each new connection asks the sentinels where the
    master is; a connection to a master that became a replica (``READONLY``) is dropped and
    raises ConnectionError, so a retried call reaches the new master."""
    asking, serving = sentinel_options(
        password=password, sentinel_password=sentinel_password, tls=tls,
        ssl_cert_reqs=ssl_cert_reqs, connect_timeout_s=connect_timeout_s,
        socket_timeout_s=socket_timeout_s)
    manager = Sentinel(list(target.sentinels), sentinel_kwargs=asking, db=target.db, **serving)
    return manager.master_for(target.master, redis_class=SentinelRedis, **kwargs)


def sentinel_options(*, password: str | None, sentinel_password: str | None, tls: bool,
                     ssl_cert_reqs: str, connect_timeout_s: float,
                     socket_timeout_s: float | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The connection options of the sentinels, and of the Redis servers they name (for
    redis-py's ``Sentinel``, sync or asyncio)."""
    tls_options: dict[str, Any] = {"ssl": True, "ssl_cert_reqs": ssl_cert_reqs} if tls else {}
    quick = min(connect_timeout_s, SENTINEL_TIMEOUT_S)
    asking = {"socket_connect_timeout": quick, "socket_timeout": quick,
              "password": sentinel_password, **tls_options}
    serving = {"socket_connect_timeout": connect_timeout_s, "socket_timeout": socket_timeout_s,
               "password": password, **tls_options}
    return asking, serving


def async_connect(settings: Settings, *, connect_timeout_s: float | None = None,
                  socket_timeout_s: float | None = None, **kwargs: Any) -> Any:
    """An asyncio client (``redis.asyncio``) of the deployment's Redis, built as
    :func:`connect` builds a client (any URL form, passwords, TLS)."""
    return async_redis_client(
        settings.redis_url_value(),
        **_client_options(settings, connect_timeout_s, socket_timeout_s), **kwargs)


def async_redis_client(url: str, *, ssl_cert_reqs: str = "required",
                       connect_timeout_s: float = 10.0, socket_timeout_s: float | None = None,
                       password: str | None = None, sentinel_password: str | None = None,
                       sentinel_tls: bool = False, **kwargs: Any) -> Any:
    """An asyncio client (``redis.asyncio``) for ``url``, configured as :func:`redis_client`."""
    import redis.asyncio

    if is_sentinel_url(url):
        from redis.asyncio.sentinel import Sentinel as AsyncSentinel

        target = parse_sentinel_url(url)
        asking, serving = sentinel_options(
            password=password, sentinel_password=sentinel_password, tls=sentinel_tls,
            ssl_cert_reqs=ssl_cert_reqs, connect_timeout_s=connect_timeout_s,
            socket_timeout_s=socket_timeout_s)
        manager = AsyncSentinel(list(target.sentinels), sentinel_kwargs=asking, db=target.db,
                                **serving)
        # A client option, not a connection one: master_for would hand it to the pool.
        single = kwargs.pop("single_connection_client", False)
        client = manager.master_for(target.master, **kwargs)
        if not single:
            return client
        dedicated = redis.asyncio.Redis(connection_pool=client.connection_pool,
                                        single_connection_client=True)
        dedicated.auto_close_connection_pool = True  # as master_for's own client does
        return dedicated
    if url.startswith("rediss://"):
        kwargs.setdefault("ssl_cert_reqs", ssl_cert_reqs)
    if password:  # from_url lets a password in the URL win
        kwargs.setdefault("password", password)
    return redis.asyncio.Redis.from_url(url, socket_connect_timeout=connect_timeout_s,
                                        socket_timeout=socket_timeout_s, **kwargs)


class Backoff:
    """Exponential delays with jitter for a loop that retries Redis: 50 ms, 100 ms ... max_s."""

    def __init__(self, first_s: float = 0.05, max_s: float = 2.0):
        self.first_s = first_s
        self.max_s = max_s
        self._next = first_s

    def next_delay(self) -> float:
        """The next delay (the one after it doubles), without sleeping."""
        delay = self._next * random.uniform(0.75, 1.25)
        self._next = min(self._next * 2, self.max_s)
        return delay

    def sleep(self) -> float:
        """Sleep for the next delay; returns it."""
        delay = self.next_delay()
        time.sleep(delay)
        return delay

    def reset(self) -> None:
        """Back to the first delay (after a success)."""
        self._next = self.first_s


def call_with_retry(action: Callable[[], T], *, timeout_s: float, url: str | None = None,
                    what: str = "reach Redis") -> T:
    """``action()``, retried on connection errors for up to ``timeout_s`` seconds.

    Raises BrokerUnavailable (naming ``url`` with its password masked) when Redis stays away.
    """
    deadline = time.monotonic() + timeout_s
    backoff = Backoff(max_s=1.0)
    while True:
        began = time.monotonic()
        try:
            return action()
        except CONNECTION_ERRORS as exc:
            # No attempt that, lasting as long as this one, would end after the deadline:
            # on a host cut off from Redis (packets vanish) an attempt lasts up to a whole
            # connect timeout, and one begun just before the deadline made the caller wait
            # half as long again (measured: 3.1 s for a 2 s timeout). Refused connections
            # (a restarting Redis) fail at once and are retried until the deadline.
            now = time.monotonic()
            took = now - began
            if now + backoff.first_s + took > deadline:
                where = f" at {mask_url(url)}" if url else ""
                raise BrokerUnavailable(
                    f"cannot {what}{where} (retried {timeout_s:g}s): {exc}") from exc
            time.sleep(min(backoff.next_delay(), deadline - now - took))
