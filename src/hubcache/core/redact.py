"""Keep credentials of URLs out of everything hubcache shows or stores.

A handle may carry credentials (``https://user:password@host/model.tar.gz``): they are sent as
HTTP basic auth, and everywhere else (descriptors, manifests, events, log lines, progress bars,
error messages) the URL's userinfo reads :data:`HIDDEN`.
"""

from __future__ import annotations

import re

#: What a URL's userinfo (``user:password``) is replaced with wherever it is shown or stored.
HIDDEN = "***"

# The userinfo of a URL at the start of a string: everything between ``scheme://`` and the last
# ``@`` of the authority (which ends at the first ``/``, ``?`` or ``#``), as urllib splits it.
_LEADING = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)([^/?#]*)@")
# The same anywhere in free text, where the authority also ends at whitespace or a quote.
_ANYWHERE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s'\"@]*(?:@[^/?#\s'\"@]*)*@")


def split_credentials(url: str) -> tuple[str, str]:
    """Split a URL's userinfo off.

    Returns:
        ``(url with its userinfo replaced by HIDDEN, the userinfo)``, or ``(url, "")`` for a URL
        without one.
    """
    match = _LEADING.match(url)
    if match is None:
        return url, ""
    return f"{match.group(1)}{HIDDEN}@{url[match.end():]}", match.group(2)


def redact(text: str) -> str:
    """``text`` with the userinfo of every URL in it replaced by :data:`HIDDEN`."""
    if "@" not in text:  # the common case, without a regex
        return text
    return _ANYWHERE.sub(rf"\g<1>{HIDDEN}@", text)
