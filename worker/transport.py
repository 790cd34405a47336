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
from producer.transport import RingingChannel, ringing_transport

from .claiming import ClaimHook, ClaimingChannel

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


def dead_lettering_transport(dead_letters: DeadLetters, scheme: str = "redis",
                             on_claimed: ClaimHook | None = None
                             ) -> type[kombu_redis.Transport]:
    """A Redis transport class whose channels claim messages atomically
    (worker/claiming.py) and dead-letter unparseable queue items."""

    class DeadLetteringChannel(ClaimingChannel, RingingChannel):
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
                self._forget_claim(exc.payload)
            try:
                entry = dead_letters.add(reason, raw=raw)
                log.warning("dead letter %s: %s", entry.id, reason)
            except Exception:  # never let bookkeeping stop the consumer
                log.exception("could not record a dead letter (%s)", reason)
            return True

        def _forget_claim(self, payload: Any) -> None:
            """Drop the unacked entry of a claimed item that is being dead-lettered
            (else the visibility timeout would restore it, to be dead-lettered again)."""
            properties = payload.get("properties") if isinstance(payload, dict) else None
            tag = properties.get("delivery_tag") if isinstance(properties, dict) else None
            if isinstance(tag, str):
                self.qos._remove_from_indices(tag).execute()

    DeadLetteringChannel.on_claimed = on_claimed

    return ringing_transport(scheme, DeadLetteringChannel)
