"""The bulk result cache: an input already answered for the same route and parameters
within the result TTL is not run again.

Opt-in per bulk job (``pipeq bulk --cache``, ``map(..., cache=True)``): a cached answer is
the route's earlier output for the identical input and call parameters, read from Redis
instead of being recomputed. Only successful answers of JSON-like inputs (text, text pairs)
are cached; each entry expires with ``PIPEQ_RESULT_TTL_S``. Mind Redis memory: an entry
holds the whole result (a token-embedding result is ~10-100 KB).
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import redis

from pipeq.core.codec import decode, encode
from pipeq.core.contract import Route
from pipeq.core.keys import Keys

log = logging.getLogger("pipeq.cache")

#: Marks an input without a cached answer.
MISS = object()


class ResultCache:
    """Earlier answers of one route with one set of call parameters, keyed by input."""

    def __init__(self, client: redis.Redis, keys: Keys, route: Route, params: dict[str, Any],
                 ttl_s: int):
        self.client = client
        self.keys = keys
        self.ttl_s = ttl_s
        self._scope = json.dumps([route.id, params], sort_keys=True)
        #: Inputs answered from the cache, and answers stored in it, so far.
        self.hits = 0
        self.stored = 0

    def key(self, item: Any) -> str | None:
        """The cache key of ``item``, or None if it cannot be cached (media, bytes)."""
        if not isinstance(item, str | dict) or (
                isinstance(item, dict) and not all(isinstance(v, str) for v in item.values())):
            return None
        text = json.dumps(item, sort_keys=True, ensure_ascii=False)
        digest = hashlib.sha256(f"{self._scope}\0{text}".encode()).hexdigest()
        return self.keys.cache(digest)

    def get_many(self, items: list[Any]) -> list[Any]:
        """Each item's cached answer, or MISS."""
        found: list[Any] = [MISS] * len(items)
        wanted = [(i, k) for i, k in enumerate(self.key(item) for item in items) if k]
        if not wanted:
            return found
        try:
            values = self.client.mget([k for _, k in wanted])
        except redis.RedisError as exc:  # a cache is never worth failing the job for
            log.warning("result cache unavailable (%s): computing instead", exc)
            return found
        for (index, _), value in zip(wanted, values, strict=True):
            if isinstance(value, bytes):
                found[index] = decode(value)
                self.hits += 1
        return found

    def put_many(self, items: list[Any], answers: list[Any]) -> None:
        """Keep the answers of ``items`` for the TTL."""
        with self.client.pipeline(transaction=False) as pipe:
            count = 0
            for item, answer in zip(items, answers, strict=True):
                key = self.key(item)
                if key is None:
                    continue
                try:
                    value = encode(answer)
                except (TypeError, ValueError):  # not encodable as stored: skip it
                    continue
                pipe.set(key, value, ex=self.ttl_s)
                count += 1
            if not count:
                return
            try:
                pipe.execute()
            except redis.RedisError as exc:
                log.warning("could not store %d answers in the result cache: %s", count, exc)
                return
        self.stored += count
