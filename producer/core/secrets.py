"""Secrets never appear in logs, reprs, errors or ``pipeq config``: masking helpers."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit


def mask_url(url: str) -> str:
    """Replace the password (and a user-only secret, and ``?password=``) in a URL by asterisks."""
    parts = urlsplit(url)
    query = re.sub(r"(?i)(^|&)(password=)[^&]*", r"\1\2****", parts.query)
    if parts.password is None and not parts.username:
        if query == parts.query:
            return url
        base, _, rest = url.partition("?")
        return f"{base}?{query}{rest[len(parts.query):]}"
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    secret = "****" if parts.password is not None else ""
    creds = f"{user}:{secret}" if secret else ("****" if user else "")
    return urlunsplit((parts.scheme, f"{creds}@{host}", parts.path, query, parts.fragment))
