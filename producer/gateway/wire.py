"""What crosses the gateway: media inputs an HTTP caller may send, results as JSON.

The Python client reads a string input of an image or audio task as a *path on the
producer's machine*, and takes envelopes whose payload is a Redis key (claim check) as
built already. Over HTTP both would let a caller reach into the deployment (read the
gateway's files; make a worker read, then delete, any Redis key), so the gateway takes only
http(s) URLs (fetched by workers of routes that allow it), ``data:`` URIs of images, and
envelopes carrying their bytes inline (``{"$media": ..., "data": "<base64>"}``).

Results are made JSON the way the Python client sees them: arrays as nested lists, images
(e.g. segmentation masks) as the documented envelope with inline base64 data.
"""

from __future__ import annotations

import base64
import math
from typing import Any

from pipeq.core.envelopes import IMAGE_FIELDS, MEDIA_KEY, encode_pil_image, is_envelope, media_kind
from pipeq.core.tasks import canonical_task
from pipeq.errors import ValidationError

URL_PREFIXES = ("http://", "https://")


def check_media_inputs(task: str, inputs: Any) -> None:
    """Refuse media inputs that would reach into the deployment (ValidationError)."""
    kind = media_kind(canonical_task(task))
    if kind is None:
        return
    items = inputs if isinstance(inputs, list) else [inputs]
    for index, item in enumerate(items):
        where = f"inputs[{index}]" if isinstance(inputs, list) else "inputs"
        if isinstance(item, dict) and not is_envelope(item) and kind == "image":
            for field in IMAGE_FIELDS:
                values = item.get(field)
                for value in values if isinstance(values, list) else [values]:
                    if value is not None:
                        _check_item(kind, value, f"{where}.{field}")
        else:
            _check_item(kind, item, where)


def _check_item(kind: str, item: Any, where: str) -> None:
    if isinstance(item, str):
        if item.startswith(URL_PREFIXES) or (kind == "image" and item.startswith("data:image/")):
            return
        accepted = "an http(s) URL or a data:image/...;base64 URI" if kind == "image" else \
            "an http(s) URL"
        raise ValidationError(
            f"{where}: a text {kind} input over HTTP must be {accepted}, or send the bytes as "
            f'{{"{MEDIA_KEY}": "{kind}", "format": "...", "data": "<base64>"}} (the gateway '
            "reads no files of its own)")
    if is_envelope(item) and "claim" in item:
        raise ValidationError(f"{where}: envelopes over HTTP carry their bytes inline "
                              '("data": "<base64>"), not a "claim" key')
    if isinstance(item, dict) and "path" in item:
        raise ValidationError(f"{where}: a \"path\" is not accepted over HTTP (the gateway "
                              "reads no files of its own); send the samples or the file bytes")


def jsonable(value: Any) -> Any:
    """``value`` (a result as the Python client receives it) in JSON types."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (bytes, bytearray)):  # an image's file bytes (no Pillow here)
        return {MEDIA_KEY: "image", "format": _image_format(bytes(value)),
                "data": base64.b64encode(value).decode()}
    if hasattr(value, "getexif") and hasattr(value, "mode"):  # a PIL image
        data, fmt = encode_pil_image(value)
        return {MEDIA_KEY: "image", "format": fmt, "data": base64.b64encode(data).decode()}
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return jsonable(value.tolist())
    return str(value)


def _image_format(data: bytes) -> str:
    return "png" if data.startswith(b"\x89PNG") else "tiff"
