"""kombu's Redis transport, with dead letters for queue items that are not kombu messages.

kombu pops an item off a queue list and parses it as a JSON kombu envelope inside the
worker's event loop: an item that is not JSON (or not an envelope) raises there,
and Celery stops the whole worker ("Unrecoverable error"). One stray ``LPUSH`` would take a
route down. This transport keeps such an item in the dead-letter list with the reason and
goes on with the next message.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import Message

from producer.deadletters import DeadLetters

log = logging.getLogger("pipeq.consumer")


class NotAKombuMessage(Exception):
    """Raised when a queue item parses as JSON but is not a kombu message envelope."""

    def __init__(self, payload: Any, problem: str):
        super().__init__(problem)
        self.payload = payload


class CheckedMessage(Message):
    """kombu's message, refusing envelopes that lack what kombu and Celery rely on."""

    def __init__(self, payload: Any, channel: Any = None, **kwargs: Any):
        properties = payload.get("properties") if isinstance(payload, dict) else None
        if not isinstance(properties, dict) or "delivery_tag" not in properties:
            raise NotAKombuMessage(payload, "no properties.delivery_tag")
        if not isinstance(properties.get("delivery_info"), dict):
            raise NotAKombuMessage(payload, "no properties.delivery_info")
        try:
            super().__init__(payload, channel=channel, **kwargs)
        except (TypeError, ValueError, KeyError, AttributeError) as exc:  # e.g. bad base64 body
            raise NotAKombuMessage(payload, f"{type(exc).__name__}: {exc}") from None


class _ShownAsScheme(type):
    """Shows a transport class as its URL scheme (Celery logs "Connected to redis://...")."""

    scheme = "redis"

    def __str__(cls) -> str:
        return cls.scheme


def dead_lettering_transport(dead_letters: DeadLetters, scheme: str = "redis"
                             ) -> type[kombu_redis.Transport]:
    """A Redis transport class whose channels dead-letter unparseable queue items."""

    class DeadLetteringChannel(kombu_redis.Channel):
        """kombu's Redis channel; a queue item it cannot parse becomes a dead letter."""

        Message = CheckedMessage

        def _brpop_read(self, **options: Any) -> Any:
            try:
                return super()._brpop_read(**options)
            except json.JSONDecodeError as exc:  # (kombu decodes bytes with errors="replace")
                raw, reason = exc.doc.encode(), f"queue item is not JSON: {exc}"
            except NotAKombuMessage as exc:
                raw = json.dumps(exc.payload).encode()
                reason = f"queue item is not a kombu message ({exc})"
            try:
                entry = dead_letters.add(reason, raw=raw)
                log.warning("dead letter %s: %s", entry.id, reason)
            except Exception:  # never let bookkeeping stop the consumer
                log.exception("could not record a dead letter (%s)", reason)
            return True

    class Transport(kombu_redis.Transport, metaclass=_ShownAsScheme):
        """kombu's Redis transport with the dead-lettering channel."""

        Channel = DeadLetteringChannel

    Transport.scheme = scheme

    return Transport
