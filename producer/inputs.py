"""A call's inputs, from the caller's hands to what the job message carries, in one pass.

For each input: text and JSON inputs are checked (``pipeq.core.validation``); images and
audio are encoded and checked (``pipeq.media``) and packed into envelopes, inline or claim
checked (``Packer``). Nothing is enqueued when any input is wrong: the ValidationError names
the first bad input and says how to fix it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeq.core.envelopes import media_kind
from pipeq.core.keys import Keys
from pipeq.core.validation import InputLimits, check_count, check_item, where_of
from pipeq.errors import ValidationError
from pipeq.media import Packer, encode_item


@dataclass(slots=True)
class PreparedInputs:
    """A job's inputs as they travel, and the media payloads to store before publishing."""

    items: list[Any]
    #: True when the caller passed one input rather than a list: the result is not a list.
    single: bool
    #: Redis key -> raw bytes of claim-checked media (stored before the message is sent).
    claims: dict[str, bytes] = field(default_factory=dict)
    #: Media bytes carried inline (before base64) and out of band.
    inline_bytes: int = 0
    claimed_bytes: int = 0


def normalize_inputs(inputs: Any) -> tuple[list[Any], bool]:
    """Split a call's inputs into a list and whether the caller passed a single input."""
    if isinstance(inputs, (list, tuple)):
        if not inputs:
            raise ValidationError("inputs is an empty list: pass at least one input")
        return list(inputs), False
    if inputs is None:
        raise ValidationError("inputs is None: pass a string (or a list of strings)")
    return [inputs], True


def prepare_inputs(task: str, inputs: Any, *, job_id: str, keys: Keys, limits: InputLimits,
                   claim_check_bytes: int) -> PreparedInputs:
    """Check (and for media, encode and pack) every input of a call to ``task``."""
    items, single = normalize_inputs(inputs)
    check_count(len(items), limits)
    kind = media_kind(task)
    if kind is None:
        for index, item in enumerate(items):
            check_item(task, item, where_of(index, len(items)), limits)
        return PreparedInputs(items, single)
    packer = Packer(job_id, keys, claim_check_bytes)
    packed = [packer.pack(encode_item(task, kind, item, where_of(index, len(items)), limits))
              for index, item in enumerate(items)]
    return PreparedInputs(packed, single, packer.claims, packer.inline, packer.claimed)
