"""Secrets never appear in logs, reprs, errors or ``pipeq config``: masking helpers."""

from __future__ import annotations

import re

#: ``scheme://`` then the authority's user info: everything up to the LAST ``@`` before the
#: path. A password may hold ``/``, ``#``, ``?`` or ``@`` unquoted (base64-style secrets), and
#: urlsplit then cuts the URL in the wrong place and shows the rest as path or fragment, so
#: the user info is found by its ``@``, not parsed.
_USERINFO = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<info>.*)@", re.DOTALL)
_QUERY_SECRET = re.compile(r"(?i)([?&;](?:password|pass|pwd|secret|token)=)[^&;#]*")


def mask_url(url: str) -> str:
    """``url`` with its password (or a user-only secret, as in ``redis://secret@host``) and any
    ``password=`` query value replaced by asterisks, however the URL is written.

    The user name stays (``redis://user:****@host``); where the user info cannot be told apart
    it is masked whole: a URL that does not parse never shows its secret.
    """
    masked = url
    match = _USERINFO.match(url)
    if match:
        # Everything up to the last "@" is taken as user info, even where it may have been a
        # path ("redis://host/0?x=a@b"): better a URL shown too masked than a secret shown.
        user, sep, _ = match.group("info").partition(":")
        creds = f"{user}:****" if sep and "/" not in user else "****"
        masked = match.group("scheme") + creds + "@" + url[match.end():]
    return _QUERY_SECRET.sub(r"\1****", masked)
