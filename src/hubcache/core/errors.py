"""The exceptions hubcache raises: one base class, one subclass per thing a user can get wrong.

Every error carries the handle it concerns (filled in by the resolver when the raising code did
not know it) and, where there is one, a hint saying what to do. ``str(error)`` is one line a user
can act on; the CLI prints exactly that. It never shows the credentials of a URL (``user:password@``
reads ``***@``), wherever in the handle, message or hint they appear.
"""

from __future__ import annotations

from .redact import redact


class HubcacheError(Exception):
    """Base class of every error hubcache raises on purpose.

    Args:
        message: what went wrong, without the handle (it is prefixed).
        handle: the model handle being resolved, if known.
        hint: what the user can do about it.
    """

    def __init__(self, message: str, *, handle: str | None = None, hint: str | None = None):
        # Callers log these attributes too (not only str(error)): no credentials in any of them.
        message = redact(message)
        super().__init__(message)
        self.message = message
        self.handle = redact(handle) if handle else handle
        self.hint = redact(hint) if hint else hint

    def __str__(self) -> str:
        text = self.message
        if self.handle is not None:
            text = f"{self.handle!r}: {text}"
        if self.hint:
            text = f"{text} ({self.hint})"
        return redact(text)


class HandleError(HubcacheError, ValueError):
    """The handle is malformed or names nothing that exists."""


class ConfigError(HubcacheError, ValueError):
    """A setting (environment variable, flag, backend name) is invalid."""


class MissingDependencyError(HubcacheError, ImportError):
    """An optional dependency is needed; the hint names the extra to install."""


class DownloadError(HubcacheError):
    """Fetching bytes from the origin failed.

    Attributes:
        url: the URL that failed.
        status: the HTTP status, when there was one.
        attempts: how many attempts were made.
    """

    def __init__(
        self,
        message: str,
        *,
        url: str,
        status: int | None = None,
        attempts: int = 1,
        handle: str | None = None,
        hint: str | None = None,
    ):
        super().__init__(message, handle=handle, hint=hint)
        self.url = url
        self.status = status
        self.attempts = attempts


class SourceChangedError(DownloadError):
    """The bytes being downloaded stopped being one version of one file: the file changed on the
    origin during the download, or a resume could not be shown to continue the same file (no
    validator, a 200 to a range request, a 206 that does not match).

    The bytes already read went downstream (digest, decoder, files), so the download must start
    again from byte 0 with a fresh writer; the cache does that a bounded number of times.
    """


class ArchiveError(HubcacheError):
    """The bytes are not a readable archive (corrupt, truncated, HTML, empty, not a tar)."""


class UnsafeArchiveError(ArchiveError):
    """The archive holds a member that would escape the entry or break a limit.

    Attributes:
        member: the offending member's name.
    """

    def __init__(self, message: str, *, member: str, handle: str | None = None, hint: str | None = None):
        super().__init__(message, handle=handle, hint=hint)
        self.member = member


class IntegrityError(HubcacheError):
    """The downloaded bytes do not match a pinned digest."""


class OfflineError(HubcacheError):
    """Offline mode is on and the handle is not in any cache."""


class CacheError(HubcacheError):
    """The cache cannot be used (read-only, full, or damaged beyond repair)."""


class LeaseLostError(CacheError):
    """This process's download lease on an entry was taken over by another host while it was
    writing (it stalled past the lease's TTL): what it wrote is withdrawn, the entry is the new
    holder's, and the resolver waits for that holder's commit instead."""
