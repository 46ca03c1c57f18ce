"""Effective settings and where each came from.

Names and precedence follow tensorflow_hub so existing set-ups keep working: an environment
variable beats the absl flag, which beats the default. hubcache's own settings are environment
variables prefixed ``HUBCACHE_``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import ConfigError
from .setting import Setting

ENV_CACHE_DIR = "TFHUB_CACHE_DIR"
ENV_LOAD_FORMAT = "TFHUB_MODEL_LOAD_FORMAT"
ENV_BACKEND = "HUBCACHE_BACKEND"
FLAG_CACHE_DIR = "tfhub_cache_dir"
FLAG_LOAD_FORMAT = "tfhub_model_load_format"
ENV_DOWNLOAD_DEADLINE = "HUBCACHE_DOWNLOAD_DEADLINE"
#: Seconds one download may take in all (6 h: about 50 GB at 20 Mbit/s). HUBCACHE_TIMEOUT bounds
#: each wait for bytes; this bounds an origin that keeps sending a few bytes at a time forever.
DEFAULT_DOWNLOAD_DEADLINE = 6 * 3600.0
ENV_CONNECTIONS = "HUBCACHE_CONNECTIONS"
ENV_CHUNK_SIZE = "HUBCACHE_CHUNK_SIZE"
#: Connections one http(s) download uses (``download/parallel.py``). Eight fill a link whose
#: connections are capped at a few tens of MB/s each (CDNs, object stores, long round trips);
#: each may hold a chunk in memory until the reader gets to it.
DEFAULT_CONNECTIONS = 8
MAX_CONNECTIONS = 64
#: Bytes per range request, at most: the bytes held, received but not yet read, are at most
#: two chunks per connection for http(s) (one for object stores), and chunks shrink so that is
#: never more than 64 MiB (32 MiB): 8 http(s) connections use 4 MiB chunks. The round trip
#: each request waits is hidden: a worker asks for its next chunk before its current one ends.
DEFAULT_CHUNK_SIZE = 8 << 20
MIN_CHUNK_SIZE = 64 << 10
MAX_CHUNK_SIZE = 256 << 20

LOAD_FORMATS = ("COMPRESSED", "UNCOMPRESSED", "AUTO")

#: hubcache's own numeric settings: env var -> (default, parser name, help).
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


#: The defaults of hubcache's own settings (one place: :func:`load_config` and the typed
#: properties of :class:`Config` both read them).
DEFAULTS: dict[str, object] = {
    "backend": None,
    "cache_dir": None,
    "load_format": "AUTO",
    "offline": False,
    "max_size": None,
    "max_archive_bytes": 256 << 30,
    "max_members": 50_000,
    "timeout": 60.0,
    "download_deadline": DEFAULT_DOWNLOAD_DEADLINE,
    "retries": 4,
    "lock_timeout": 3600.0,
    "connections": DEFAULT_CONNECTIONS,
    "chunk_size": DEFAULT_CHUNK_SIZE,
    "pins": None,
    "lease_ttl": 30.0,
    "progress": "auto",
    "patch_tfhub": False,
}


@dataclass(frozen=True)
class Config:
    """A snapshot of every setting, taken by :func:`load_config`.

    hubcache's own settings are typed properties (``config.timeout`` is a ``float``, ``None``
    never: an unset setting has its default from :data:`DEFAULTS`); :meth:`get` reads any setting
    by name, including the environment variables a plugin declares.
    """

    settings: dict[str, Setting] = field(default_factory=dict)

    def __getitem__(self, name: str) -> object:
        return self.settings[name].value

    def get(self, name: str, default: object = None) -> object:
        """A setting's value by name, ``default`` when there is no such setting."""
        setting = self.settings.get(name)
        return default if setting is None else setting.value

    def replace(self, **values: object) -> Config:
        """A copy with some values replaced (source ``override``): for tests and embedding."""
        settings = dict(self.settings)
        for name, value in values.items():
            old = settings.get(name)
            settings[name] = Setting(name, value, "override", "", old.help if old else "")
        return Config(settings)

    # -- typed views of hubcache's own settings ---------------------------------------------

    def _value(self, name: str) -> object:
        setting = self.settings.get(name)
        return DEFAULTS[name] if setting is None or setting.value is None else setting.value

    def _text(self, name: str) -> str | None:
        value = self._value(name)
        return None if value is None else str(value)

    def _number(self, name: str) -> float:
        value = self._value(name)
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"setting {name}={value!r} is not a number")
        return _parse_float(value, name) if isinstance(value, str) else float(value)

    def _count(self, name: str) -> int:
        value = self._value(name)
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"setting {name}={value!r} is not a whole number")
        return _parse_int(value, name) if isinstance(value, str) else value

    @property
    def backend(self) -> str | None:
        """``HUBCACHE_BACKEND``: a backend name or a comma-separated chain; ``None``: implied."""
        return self._text("backend")

    @property
    def cache_dir(self) -> str | None:
        """``TFHUB_CACHE_DIR`` / ``--tfhub_cache_dir``; ``None``: the backend's default root."""
        return self._text("cache_dir")

    @property
    def load_format(self) -> str:
        """``COMPRESSED``, ``UNCOMPRESSED`` or ``AUTO``."""
        return str(self._value("load_format"))

    @property
    def offline(self) -> bool:
        """``HUBCACHE_OFFLINE``: use only cached entries."""
        return bool(self._value("offline"))

    @property
    def max_size(self) -> int | None:
        """``HUBCACHE_MAX_SIZE`` in bytes: the home cache's budget; ``None``: no budget."""
        return None if self._value("max_size") is None else self._count("max_size")

    @property
    def max_archive_bytes(self) -> int:
        """``HUBCACHE_MAX_EXTRACT_SIZE``: the most an archive may unpack to."""
        return self._count("max_archive_bytes")

    @property
    def max_members(self) -> int:
        """``HUBCACHE_MAX_MEMBERS``: the most members an archive may have."""
        return self._count("max_members")

    @property
    def timeout(self) -> float:
        """``HUBCACHE_TIMEOUT``: seconds to wait for a connection or the next bytes."""
        return self._number("timeout")

    @property
    def download_deadline(self) -> float:
        """``HUBCACHE_DOWNLOAD_DEADLINE``: seconds one whole download may take."""
        return self._number("download_deadline")

    @property
    def retries(self) -> int:
        """``HUBCACHE_RETRIES``: retries of a failed or interrupted download."""
        return self._count("retries")

    @property
    def connections(self) -> int:
        """``HUBCACHE_CONNECTIONS``: connections one download may use (http(s) ranges, an object
        store's ranged reads, a tier copy's reads, a bucket's uploads; 1: one stream)."""
        return self._count("connections")

    @property
    def chunk_size(self) -> int:
        """``HUBCACHE_CHUNK_SIZE``: bytes per range request of a download over several connections
        (object-store reads use smaller ones if connections x chunk would pass 32 MiB)."""
        return self._count("chunk_size")

    @property
    def lock_timeout(self) -> float:
        """``HUBCACHE_LOCK_TIMEOUT``: seconds to wait for another process's download."""
        return self._number("lock_timeout")

    @property
    def pins(self) -> str | None:
        """``HUBCACHE_PINS``: the path of a pins file, if set."""
        return self._text("pins")

    @property
    def lease_ttl(self) -> float:
        """``HUBCACHE_LEASE_TTL``: object-store caches' lease lifetime without a heartbeat."""
        return self._number("lease_ttl")

    @property
    def progress(self) -> str:
        """``auto``, ``always`` or ``never``."""
        return str(self._value("progress"))


def parse_size(text: str, *, name: str = "size") -> int:
    """Parse a byte size such as ``"20G"``, ``"512M"``, ``"1.5GiB"`` or ``"1000"``.

    Raises:
        ConfigError: if the text is not a size.
    """
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise ConfigError(f"{name}={text!r} is not a size", hint="write e.g. 500M, 20G or a number of bytes")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def _parse_bool(text: str) -> bool:
    return text.strip().lower() not in ("", "0", "false", "no", "off")


def _parse_float(text: str, name: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not a number") from None
    if value < 0:
        raise ConfigError(f"{name}={text!r} must not be negative")
    return value


def _parse_positive(text: str, name: str) -> float:
    value = _parse_float(text, name)
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"{name}={text!r} must be a positive number of seconds")
    return value


def _parse_between(text: str, name: str, low: int, high: int, parse: Callable[[str], int]) -> int:
    value = parse(text)
    if not low <= value <= high:
        raise ConfigError(f"{name}={text!r} is out of range", hint=f"use {low} to {high}")
    return value


def _parse_int(text: str, name: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not a whole number") from None
    if value < 0:
        raise ConfigError(f"{name}={text!r} must not be negative")
    return value


# -- absl flags ---------------------------------------------------------------------------------

_flags_defined = False


def define_absl_flags() -> None:
    """Define ``--tfhub_cache_dir`` and ``--tfhub_model_load_format`` if absl is installed.

    They are defined only when nobody (tensorflow_hub, say) defined them first, so importing both
    libraries does not crash with a duplicate-flag error.
    """
    global _flags_defined
    if _flags_defined or importlib.util.find_spec("absl") is None:
        return
    from absl import flags

    # tensorflow_hub defines the same flags unconditionally when imported: allow_override lets its
    # definition replace ours (same names and values) instead of raising DuplicateFlagError.
    if FLAG_CACHE_DIR not in flags.FLAGS:
        flags.DEFINE_string(
            FLAG_CACHE_DIR, None,
            "If set, hubcache (and TF-Hub) download and cache models in this directory; "
            "a gs:// path makes a cache shared by many hosts.", allow_override=True)
    if FLAG_LOAD_FORMAT not in flags.FLAGS:
        flags.DEFINE_enum(
            FLAG_LOAD_FORMAT, "AUTO", list(LOAD_FORMATS),
            "COMPRESSED downloads and caches archives; UNCOMPRESSED reads models straight "
            "from remote storage; AUTO means COMPRESSED.", allow_override=True)
    _flags_defined = True


def _flag_value(name: str) -> object:
    """The value of an absl flag if absl is loaded, the flag defined and argv parsed."""
    flags_module = sys.modules.get("absl.flags")
    if flags_module is None:
        return None
    FLAGS = flags_module.FLAGS
    if name not in FLAGS or not FLAGS.is_parsed():
        return None
    flag = FLAGS[name]
    # An untouched flag is a default, not a choice the user made.
    if not flag.present and flag.value == flag.default:
        return None
    return flag.value


# -- the settings ---------------------------------------------------------------------------------


def _env_or_flag(env: str, flag: str, default: object, name: str, help: str) -> Setting:
    value: object = os.environ.get(env)
    if value:
        return Setting(name, value, "env", env, help)
    value = _flag_value(flag)
    if value:
        return Setting(name, value, "flag", f"--{flag}", help)
    return Setting(name, default, "default", "", help)


def _env(env: str, default: object, name: str, help: str,
         parse: Callable[[str], object] | None = None) -> Setting:
    text = os.environ.get(env)
    if text is None or text.strip() == "":
        return Setting(name, default, "default", "", help)
    return Setting(name, parse(text) if parse else text, "env", env, help)


def load_config() -> Config:
    """Read every setting from the environment and absl flags.

    Raises:
        ConfigError: if a setting has an invalid value.
    """
    s: dict[str, Setting] = {}
    s["backend"] = _env(ENV_BACKEND, DEFAULTS["backend"], "backend",
                        "backend name, or a comma-separated chain of tiers (default: implied)")
    s["cache_dir"] = _env_or_flag(ENV_CACHE_DIR, FLAG_CACHE_DIR, DEFAULTS["cache_dir"], "cache_dir",
                                  "cache root; a gs:// (or other fsspec) URL selects that store")
    cache_dir = s["cache_dir"]
    # An empty value means unset, as for tensorflow_hub; spaces alone would make a cache in a
    # directory named "  " under whatever the working directory is: surely a mistake.
    if isinstance(cache_dir.value, str) and not cache_dir.value.strip():
        raise ConfigError(f"{cache_dir.origin}={cache_dir.value!r} is blank",
                          hint=f"unset {cache_dir.origin} for the default cache, or name a directory")
    fmt = _env_or_flag(ENV_LOAD_FORMAT, FLAG_LOAD_FORMAT, DEFAULTS["load_format"], "load_format",
                       "COMPRESSED (download + cache), UNCOMPRESSED (read remote), AUTO (= COMPRESSED)")
    value = str(fmt.value).strip().upper()
    if value not in LOAD_FORMATS:
        raise ConfigError(
            f"{fmt.origin or 'load format'}={fmt.value!r} is not a model load format",
            hint="use COMPRESSED, UNCOMPRESSED or AUTO")
    s["load_format"] = Setting(fmt.name, value, fmt.source, fmt.origin, fmt.help)
    s["offline"] = _env("HUBCACHE_OFFLINE", DEFAULTS["offline"], "offline",
                        "1: use only cached entries, never the network", _parse_bool)
    s["max_size"] = _env("HUBCACHE_MAX_SIZE", DEFAULTS["max_size"], "max_size",
                         "size budget of the home cache, e.g. 20G (LRU eviction)",
                         lambda t: parse_size(t, name="HUBCACHE_MAX_SIZE"))
    s["max_archive_bytes"] = _env("HUBCACHE_MAX_EXTRACT_SIZE", DEFAULTS["max_archive_bytes"], "max_archive_bytes",
                                  "refuse archives that unpack to more than this",
                                  lambda t: parse_size(t, name="HUBCACHE_MAX_EXTRACT_SIZE"))
    # A SavedModel has tens to thousands of files; each member costs a file creation (~200 µs
    # here), so a member flood is refused in seconds, not minutes.
    s["max_members"] = _env("HUBCACHE_MAX_MEMBERS", DEFAULTS["max_members"], "max_members",
                            "refuse archives with more members than this",
                            lambda t: _parse_int(t, "HUBCACHE_MAX_MEMBERS"))
    s["timeout"] = _env("HUBCACHE_TIMEOUT", DEFAULTS["timeout"], "timeout",
                        "seconds to wait for a connection or for the next bytes",
                        lambda t: _parse_float(t, "HUBCACHE_TIMEOUT"))
    s["download_deadline"] = _env(ENV_DOWNLOAD_DEADLINE, DEFAULTS["download_deadline"], "download_deadline",
                                  "seconds one whole download may take, however steadily bytes arrive",
                                  lambda t: _parse_positive(t, ENV_DOWNLOAD_DEADLINE))
    s["retries"] = _env("HUBCACHE_RETRIES", DEFAULTS["retries"], "retries",
                        "retries of a failed or interrupted download",
                        lambda t: _parse_int(t, "HUBCACHE_RETRIES"))
    s["connections"] = _env(ENV_CONNECTIONS, DEFAULTS["connections"], "connections",
                            "connections one download may use, each fetching a range of chunk_size "
                            "bytes (http(s), gs://, s3://, tier copies from a bucket; also a bucket's "
                            "parallel uploads; 1: one stream)",
                            lambda t: _parse_between(t, ENV_CONNECTIONS, 1, MAX_CONNECTIONS,
                                                     lambda u: _parse_int(u, ENV_CONNECTIONS)))
    s["chunk_size"] = _env(ENV_CHUNK_SIZE, DEFAULTS["chunk_size"], "chunk_size",
                           "bytes per range request of a download over several connections "
                           "(memory: up to 2 x connections x chunk_size for http(s), at most 64 MiB; connections x chunk_size for object stores, at most 32 MiB: chunks shrink to fit)",
                           lambda t: _parse_between(t, ENV_CHUNK_SIZE, MIN_CHUNK_SIZE, MAX_CHUNK_SIZE,
                                                    lambda u: parse_size(u, name=ENV_CHUNK_SIZE)))
    s["lock_timeout"] = _env("HUBCACHE_LOCK_TIMEOUT", DEFAULTS["lock_timeout"], "lock_timeout",
                             "seconds to wait for another process downloading the same handle",
                             lambda t: _parse_float(t, "HUBCACHE_LOCK_TIMEOUT"))
    s["pins"] = _env("HUBCACHE_PINS", DEFAULTS["pins"], "pins",
                     "a file of `HANDLE sha256=HEX` lines: those archives must have that digest")
    s["lease_ttl"] = _env("HUBCACHE_LEASE_TTL", DEFAULTS["lease_ttl"], "lease_ttl",
                          "object-store caches (gcs): seconds without a heartbeat before a "
                          "download lease is taken over",
                          lambda t: _parse_float(t, "HUBCACHE_LEASE_TTL"))
    # Read at interpreter start by the start-up hook (_hubcache_autopatch), with the same rule
    # as _parse_bool; shown here so `hubcache config` says whether it is in force.
    s["patch_tfhub"] = _env("HUBCACHE_PATCH_TFHUB", DEFAULTS["patch_tfhub"], "patch_tfhub",
                            "1: tensorflow_hub resolves through hubcache once imported (read at start-up)",
                            _parse_bool)
    progress = _env("HUBCACHE_NO_PROGRESS", None, "progress", "", _parse_bool)
    if progress.source == "env" and progress.value:
        s["progress"] = Setting("progress", "never", "env", "HUBCACHE_NO_PROGRESS",
                                "progress bar: auto (when stderr is a terminal), always, never")
    else:
        forced = _env("TFHUB_DOWNLOAD_PROGRESS", None, "progress", "", _parse_bool)
        if forced.source == "env" and forced.value:
            s["progress"] = Setting("progress", "always", "env", "TFHUB_DOWNLOAD_PROGRESS",
                                    "progress bar: auto (when stderr is a terminal), always, never")
        else:
            s["progress"] = Setting("progress", DEFAULTS["progress"], "default", "",
                                    "progress bar: auto (when stderr is a terminal), always, never")
    return Config(s)


#: The variables whose values select a backend or change what a resolve returns.
_FINGERPRINT_VARS = (ENV_BACKEND, ENV_CACHE_DIR, ENV_LOAD_FORMAT, "HUBCACHE_OFFLINE", "HUBCACHE_PINS")
#: names -> the environment's own keys for them (bytes from os.environ.encodekey on POSIX, else
#: the names); Any as the key type is the platform's.
_encoded_keys: dict[tuple[str, ...], tuple[Any, ...]] = {}


def config_fingerprint(extra: tuple[str, ...] = ()) -> tuple[object, ...]:
    """A cheap tuple that changes whenever the backend selection could change.

    Used by the resolver to memoise hits without re-reading every setting on each call, so it
    is on the hot path of every resolve: it reads the environment's underlying dict with
    pre-encoded keys (one C-level lookup each) where CPython exposes it.

    Args:
        extra: more environment variables that matter: the ones backends declare in
            :attr:`~hubcache.core.backend.Backend.settings`.
    """
    keys = _encoded_keys.get(extra)
    if keys is None:
        names = _FINGERPRINT_VARS + tuple(extra)
        encode = getattr(os.environ, "encodekey", None)
        keys = _encoded_keys[extra] = tuple(map(encode, names)) if encode else names
    data = getattr(os.environ, "_data", None)
    values = tuple(map(data.get, keys)) if data is not None else tuple(map(os.environ.get, keys))
    flags_module = sys.modules.get("absl.flags")
    if flags_module is not None and flags_module.FLAGS.is_parsed():
        return values + ((_flag_value(FLAG_CACHE_DIR), _flag_value(FLAG_LOAD_FORMAT)),)
    return values


def env_settings(declared: dict[str, str]) -> list[Setting]:
    """The current value and source of environment variables a plugin declared (name -> help)."""
    return [_env(name, None, name, help) for name, help in declared.items()]
