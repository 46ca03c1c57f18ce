"""One effective setting and where it came from: what ``hubcache config`` shows, one row each.

A leaf (it imports nothing of hubcache), so that any module that reports settings of its own (the
network's proxies and certificates, a backend's variables) can build rows without importing the
whole of :mod:`hubcache.core.config`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Setting:
    """One effective setting.

    Attributes:
        name: the setting's name (``cache_dir``, ``load_format``...).
        value: its effective value.
        source: ``env``, ``flag`` or ``default``.
        origin: the variable or flag it came from (empty for defaults).
        help: one line saying what it does.
    """

    name: str
    value: object
    source: str
    origin: str = ""
    help: str = ""
