"""Turning pipeline outputs into wire values (``pipeq.core.codec``) without losing anything.

Tensors and arrays become :class:`ArrayPayload` (raw bytes, decoded by the producer into
the same nested lists ``tolist()`` gives); numpy scalars become Python scalars; PIL images
(segmentation masks, depth maps) become :class:`ImagePayload` (lossless PNG/TIFF bytes).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeq.core.codec import ArrayPayload, ImagePayload
from pipeq.core.envelopes import encode_pil_image


def array_payload(value: torch.Tensor | np.ndarray, *, as_list: bool = True) -> ArrayPayload:
    """An ArrayPayload holding a tensor's or array's values, little-endian."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
        if tensor.dtype in (torch.float16, torch.bfloat16):
            tensor = tensor.float()
        array = tensor.cpu().numpy()
    else:
        array = value
    shape = tuple(array.shape)  # taken first: ascontiguousarray turns a 0-d array into 1-d
    array = np.ascontiguousarray(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return ArrayPayload(str(array.dtype), shape, array.tobytes(), as_list)


def to_wire(value: Any, *, tensors_as_list: bool = True) -> Any:
    """Recursively convert a pipeline output into values ``pipeq.core.codec`` can encode."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): to_wire(v, tensors_as_list=tensors_as_list) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_wire(v, tensors_as_list=tensors_as_list) for v in value]
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return array_payload(value, as_list=tensors_as_list)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Image.Image):
        return ImagePayload(encode_pil_image(value)[0])
    raise TypeError(f"pipeline returned a {type(value).__name__}, which pipeq cannot carry yet")
