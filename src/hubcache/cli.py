"""The ``hubcache`` command."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import threading
from typing import TYPE_CHECKING, Any, Callable, Sequence, cast

from ._version import __version__
from .core.errors import HubcacheError

if TYPE_CHECKING:
    from typing_extensions import NotRequired, TypedDict

    class _ConfigRow(TypedDict):
        """One line of ``hubcache config``."""

        name: str
        value: object
        source: str
        help: NotRequired[str]

    class _PluginRow(TypedDict):
        """One plugin in ``hubcache plugins`` (and its ``--json``)."""

        name: str
        distribution: str
        version: str
        module: str
        builtin: bool
        backends: list[str]
        hooks: list[str]
        status: str
        error: str

    class _BackendTotals(TypedDict):
        """One backend's summary in ``hubcache ls`` (and its ``--json``)."""

        root: str
        entries: int
        bytes: int
        states: dict[str, int]

DESCRIPTION = """\
Resolve ML model handles to loadable paths, through pluggable storage backends.

A handle is a tfhub.dev-style URL (https://tfhub.dev/google/spice/2), an archive URL
(.tar, .tar.gz, .tar.zst, .tar.bz2, .tar.xz), a gs:// or other fsspec URL, or a local
path. On first use the archive is streamed, checked and unpacked into a cache; later
resolves are instant and never touch the network.
"""

EPILOG = """\
examples:
  hubcache resolve https://tfhub.dev/google/spice/2
  hubcache resolve --json model-a.tar.zst model-b.tar.gz
  HUBCACHE_BACKEND=home hubcache resolve https://example.com/m.tar.gz
  TFHUB_CACHE_DIR=gs://bucket/cache hubcache resolve https://tfhub.dev/google/spice/2
  hubcache prefetch -f models.txt       # warm the cache, then run with HUBCACHE_OFFLINE=1
  hubcache ls                           # what is cached, how big, last used
  hubcache prune --max-size 20G         # free space (never what a process is using)
  hubcache verify --full                # check entries against their manifests
  hubcache config                       # every setting and where it came from
  hubcache COMMAND --help               # each command's own options and examples

settings (environment beats absl flags, which beat defaults):
  HUBCACHE_BACKEND         tmp (default), home, gcs, remote, a plugin's, or a chain: home,gcs
  HUBCACHE_MAX_SIZE=20G    size budget of the home cache (least recently used go first)
  TFHUB_CACHE_DIR          cache root (--tfhub_cache_dir); gs://bucket/prefix selects gcs
  TFHUB_MODEL_LOAD_FORMAT  COMPRESSED | UNCOMPRESSED | AUTO (--tfhub_model_load_format)
  HUBCACHE_OFFLINE=1       use only what is cached; never the network
  HUBCACHE_NO_PROGRESS=1   no progress bar (TFHUB_DOWNLOAD_PROGRESS=1 forces one)
  HUBCACHE_PINS=FILE       pinned archive digests, `HANDLE sha256=HEX` a line (also `URL#sha256=HEX`)
  see `hubcache config` for every setting and where its value came from.
"""


# C0 controls (tab, CR, LF, ESC...), DEL, C1 controls (CSI 0x9b...), and the Unicode line
# separators and bidirectional overrides that reorder or break what a terminal shows.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: object) -> str:
    """``text`` with every control character escaped (``\\x1b``, ``\\r``, ``\\u202e``).

    Handles, names and messages printed by the CLI may come from a cache or bucket that others
    write: raw, an escape sequence could retitle or rewrite the terminal, a CR or LF forge lines.
    Applied to every human-readable line the CLI prints (``--json`` is escaped by ``json``).
    """
    return _CONTROL.sub(_escape, str(text))


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    named = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}.get(char)
    if named is not None:
        return named
    return f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"


def _say(text: object = "", *, err: bool = False, flush: bool = False) -> None:
    """Print one line of human-readable output, control characters escaped (see :func:`printable`)."""
    print(printable(text), file=sys.stderr if err else sys.stdout, flush=flush)


class _PrintableFormatter(logging.Formatter):
    """Log lines (``-v``) name handles and paths from caches too: escaped like every other line."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


def _print_json(data: object) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def cmd_resolve(args: argparse.Namespace) -> int:
    from .core.resolver import resolve

    results = []
    failed = False
    for handle in args.handles:
        try:
            path = resolve(handle)
        except HubcacheError as error:
            failed = True
            results.append({"handle": handle, "error": str(error), "kind": type(error).__name__})
            if not args.json:
                _say(f"hubcache: error: {error}", err=True)
            continue
        results.append({"handle": handle, "path": path})
        if not args.json:
            _say(path, flush=True)
    if args.json:
        _print_json(results)
    return 1 if failed else 0


def cmd_config(args: argparse.Namespace) -> int:
    from .core.config import env_settings, load_config
    from .core.resolver import make_backend, select_backend_name
    from .download import network
    from .plugins.registry import get_registry

    config = load_config()
    name, why = select_backend_name(config)
    registry = get_registry()
    backend = make_backend(name, config)
    details = backend.describe()
    rows: list[_ConfigRow] = [{"name": "backend (selected)", "value": name, "source": why}]
    for key, value in details.items():
        if key == "tiers" and isinstance(value, list):  # a chain: one line per tier, in order
            for i, tier in enumerate(value, 1):
                where = tier.get("root") or tier.get("description", "")
                rows.append({"name": f"backend.tier{i}", "value": f"{tier.get('name')}  {where}",
                             "source": "backend"})
        elif key not in ("name", "description"):
            rows.append({"name": f"backend.{key}", "value": value, "source": "backend"})
    # Variables the selected backend(s) read themselves (Backend.settings), e.g. a plugin's endpoint.
    declared: dict[str, str] = {}
    for part in name.split(","):
        declared.update(getattr(registry.backends.get(part.strip()), "settings", None) or {})
    backend_settings = env_settings(declared)
    for setting in backend_settings:
        rows.append({"name": setting.name, "value": setting.value,
                     "source": setting.source + (f" ({setting.origin})" if setting.origin else "")})
    for setting in config.settings.values():
        if setting.name == "backend":  # already shown, with the reason, as "backend (selected)"
            continue
        source = setting.source + (f" ({setting.origin})" if setting.origin else "")
        rows.append({"name": setting.name, "value": setting.value, "source": source, "help": setting.help})
    # Proxies and certificates: the standard variables tensorflow_hub honours (proxy credentials as ***).
    network_settings = network.current().settings()
    for setting in network_settings:
        rows.append({"name": setting.name, "value": setting.value,
                     "source": setting.source + (f" ({setting.origin})" if setting.origin else "")})
    if args.json:
        _print_json({"backend": name, "reason": why, "backend_details": details,
                     "backend_settings": {b.name: {"value": b.value, "source": b.source, "help": b.help}
                                          for b in backend_settings},
                     "settings": {s.name: {"value": s.value, "source": s.source, "origin": s.origin}
                                  for s in config.settings.values()},
                     "network": {s.name: {"value": s.value, "source": s.source, "origin": s.origin, "help": s.help}
                                 for s in network_settings},
                     "installed_backends": sorted(registry.backends)})
        return 0
    width = max(len(r["name"]) for r in rows)
    for row in rows:
        value = "-" if row["value"] is None else row["value"]
        _say(f"{row['name']:<{width}}  {value}  [{row['source']}]")
    _say(f"{'installed backends':<{width}}  {', '.join(sorted(registry.backends))}")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from .plugins.registry import get_registry

    registry = get_registry()
    plugins = [p for p in registry.plugins.values() if args.all or not p.builtin]
    rows: list[_PluginRow]
    rows = [{"name": p.name, "distribution": p.distribution, "version": p.version, "module": p.value,
             "builtin": p.builtin, "backends": p.backends, "hooks": p.hooks,
             "status": "disabled" if p.disabled else ("failed" if p.error else "loaded"), "error": p.error}
            for p in plugins]
    if args.json:
        _print_json(rows)
        return 0
    if not rows:
        _say("no third-party plugins installed (`hubcache plugins --all` shows the built-in ones)")
        return 0
    for row in rows:
        origin = f"{row['distribution']} {row['version']}".strip() or row["module"]
        _say(f"{row['name']}  ({origin}{', built-in' if row['builtin'] else ''})  {row['status']}")
        if row["backends"]:
            _say(f"    backends: {', '.join(row['backends'])}")
        if row["hooks"]:
            _say(f"    hooks:    {', '.join(row['hooks'])}")
        if row["error"]:
            _say(f"    error:    {row['error']}")
    return 0


# -- cache management: ls, info, rm, prune, prefetch (hubcache.maintenance.manage, .prune, .prefetch) ----


def _para(text: str) -> str:
    """Wrap a --help description to the terminal width, keeping its paragraphs."""
    import shutil
    import textwrap

    width = min(shutil.get_terminal_size().columns, 100) - 2
    return "\n\n".join(textwrap.fill(par, width) for par in text.split("\n\n"))


def _size_arg(text: str) -> int:
    from .core.config import parse_size

    try:
        return parse_size(text, name="size")
    except HubcacheError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _duration_arg(text: str) -> float:
    from .maintenance.prune import parse_duration

    try:
        return parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _table(rows: list[list[str]], right: Sequence[int] = ()) -> None:
    rows = [[printable(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        _say("  ".join(cells).rstrip())


def cmd_ls(args: argparse.Namespace) -> int:
    from .core.config import load_config
    from .maintenance.manage import ago, cache_backends, list_entries
    from .maintenance.prune import format_size

    backends = cache_backends(load_config(), args.backend)
    listed = list_entries(backends)
    totals: dict[str, _BackendTotals] = {b.name: {"root": b.store.root, "entries": 0, "bytes": 0, "states": {}}
                                         for b in backends}
    for item in listed:
        total = totals[item.backend]
        total["entries"] += 1
        total["bytes"] += item.entry.size
        total["states"][item.entry.state] = total["states"].get(item.entry.state, 0) + 1
    if args.json:
        _print_json({"entries": [item.to_json() for item in listed], "backends": totals,
                     "total": {"entries": len(listed), "bytes": sum(i.entry.size for i in listed)}})
        return 0
    if listed:
        rows = [["SIZE", "FILES", "LAST USED", "STATE", "BACKEND", "HANDLE"]]
        for item in listed:
            e = item.entry
            state = e.state + (", in use" if item.busy else "")
            rows.append([format_size(e.size), str(len(e.manifest.files)) if e.manifest else "-",
                         ago(e.last_used), state, item.backend, e.handle or f"(unknown handle) {e.key}"])
        _table(rows, right=(0, 1))
        _say()
    for name, total in totals.items():
        states = ", ".join(f"{n} {s}" for s, n in sorted(total["states"].items()))
        count = f"{total['entries']} entr{'y' if total['entries'] == 1 else 'ies'}"
        _say(f"{name}: {count}, {format_size(total['bytes'])} in {total['root']}"
              + (f" ({states})" if states else ""))
    debris = sum(n for t in totals.values() for s, n in t["states"].items() if s in ("damaged", "in progress"))
    if debris:
        _say(f"{debris} damaged or unfinished entries: `hubcache prune` removes them "
              "(a resolve also rebuilds a damaged entry)")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .core.config import load_config
    from .maintenance.manage import ago, handle_info
    from .maintenance.prune import format_size

    # A JSON document, nested (its shape: manage.handle_info); read here as such.
    info: dict[str, Any] = handle_info(args.handle, load_config())
    if args.json:
        _print_json(info)
        return 0
    location = info["location"]
    _say(f"handle    {info['handle']}")
    _say(f"key       {info['key']}" + (f"  (pinned {info['pin']})" if info["pin"] else ""))
    _say(f"backend   {info['backend']}  (selected by {info['backend_reason']})"
          + ("  [offline]" if info["offline"] else ""))
    if "error" in location:
        _say(f"source    cannot be located: {location['error']}")
    else:
        _say(f"source    {location['kind']} {location['url']}")
    for tier in info["tiers"]:
        name = tier["backend"]
        if "note" in tier and "root" not in tier:
            _say(f"{name:<9} {tier['note']}")
            continue
        if tier.get("note"):
            _say(f"{name:<9} {tier['note']}")
        if not tier.get("cached"):
            state = tier.get("state", "not cached")
            _say(f"{name:<9} {state}: would be at {tier['path']}")
            _say(f"{'':<9} run `hubcache prefetch {info['handle']}` to download it now")
            continue
        files = tier.get("manifest", {}).get("files", "?")
        busy = f", {tier['busy']}" if tier.get("busy") else ""
        _say(f"{name:<9} cached at {tier['path']}")
        _say(f"{'':<9} {tier['state']}, {format_size(tier['bytes'])} in {files} files, "
              f"last used {ago(tier.get('last_used_unix'))}{busy}")
        manifest = tier.get("manifest")
        if manifest:
            archive = manifest["archive"]
            if archive.get("sha256"):
                _say(f"{'':<9} archive sha256 {archive['sha256']}, "
                      f"{format_size(int(archive.get('bytes', 0)))} {archive.get('format', '')}")
            if manifest["source"]:
                _say(f"{'':<9} from {manifest['source']}")
            _say(f"{'':<9} created {manifest['created']} by {manifest['creator'] or 'unknown'}")
        if tier.get("pin_matches") is False:
            _say(f"{'':<9} the pinned digest does NOT match: `hubcache rm` it to download again")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from .core.config import load_config
    from .maintenance.manage import cache_backends, remove
    from .maintenance.prune import format_size

    # JSON rows (their keys: manage.remove); read here as such.
    results: list[dict[str, Any]] = remove(args.handles, cache_backends(load_config(), args.backend))
    if args.json:
        _print_json(results)
    else:
        for r in results:
            if r["outcome"] == "removed":
                _say(f"removed  {format_size(int(r['bytes']))}  {r['handle']}  [{r['backend']}]")
            elif r["outcome"] == "kept":
                _say(f"hubcache: kept {r['handle']} [{r['backend']}]: {r['reason']}; "
                      "try again when it is done", err=True)
            else:
                _say(f"hubcache: not cached: {r['handle']} [{r['backend']}]", err=True)
    return 1 if any(r["outcome"] == "kept" for r in results) else 0


def cmd_prune(args: argparse.Namespace) -> int:
    from .core.config import load_config
    from .maintenance.manage import ago, cache_backends
    from .maintenance.prune import format_size, prune_store, timestamp

    config = load_config()
    max_size = args.max_size
    if max_size is None and args.older_than is None and config.max_size:
        max_size = config.max_size  # the configured budget (HUBCACHE_MAX_SIZE)
    reports = [prune_store(b.store, backend=b.name, max_size=max_size, older_than=args.older_than,
                           dry_run=args.dry_run) for b in cache_backends(config, args.backend)]
    if args.json:
        _print_json([{"backend": r.backend, "root": r.root, "dry_run": r.dry_run, "max_size": r.max_size,
                      "bytes_before": r.total_before, "bytes_after": r.total_after, "freed": r.freed,
                      "actions": [{"handle": a.entry.handle, "key": a.entry.key, "path": a.entry.path,
                                   "state": a.entry.state, "bytes": a.entry.size, "reason": a.reason,
                                   "outcome": a.outcome, "kept_because": a.kept_because,
                                   "last_used_unix": timestamp(a.entry.last_used)} for a in r.actions]}
                     for r in reports])
        return 0
    for r in reports:
        for a in r.actions:
            what = a.entry.handle or a.entry.key
            if a.outcome == "kept":
                _say(f"kept          {format_size(a.entry.size):>10}  {what}: {a.kept_because}")
            elif a.outcome != "gone":
                _say(f"{a.outcome:<13} {format_size(a.entry.size):>10}  {what}  "
                      f"(last used {ago(a.entry.last_used)}; {a.reason})")
        verb = "would free" if r.dry_run else "freed"
        _say(f"{r.backend}: {verb} {format_size(r.freed)} in {len(r.removed)} entries; "
              f"{format_size(r.total_after)} {'would ' if r.dry_run else ''}remain in {r.root}"
              + (" (dry run: nothing was removed)" if r.dry_run else ""))
        if r.over_budget:  # so there is a budget: max_size is an int
            _say(f"{r.backend}: still over the budget of {format_size(cast(int, r.max_size))}: "
                  f"{len(r.kept)} entries are in use", err=True)
    return 0


def cmd_prefetch(args: argparse.Namespace) -> int:
    import time

    from . import progress
    from .maintenance.prefetch import (
        BarObserver,
        Fetched,
        Observer,
        prefetch,
        read_handle_list,
    )
    from .maintenance.prune import format_size

    handles = list(args.handles)
    for name in args.file or []:
        if name == "-":
            handles += read_handle_list(sys.stdin)
        else:
            try:
                with open(name, encoding="utf-8") as f:
                    handles += read_handle_list(f)
            except OSError as error:
                _say(f"hubcache: error: cannot read {name}: {error.strerror}", err=True)
                return 2
    handles = list(dict.fromkeys(handles))
    if not handles:
        _say("hubcache: error: no handles to prefetch (give some, or -f FILE)", err=True)
        return 2
    display = BarObserver(handles) if progress.enabled() else Observer(handles)
    lock = threading.Lock()

    def on_done(result: Fetched) -> None:
        with lock:
            display.finished(result)
            if args.json:
                return
            if result.error is not None:
                display.write(printable(f"hubcache: error: {result.error}"), sys.stderr)
            else:
                size = format_size(result.downloaded) if result.downloaded else ""
                display.write(printable(f"{result.status:<8} {size:>10}  {result.handle}"), sys.stdout)

    started = time.monotonic()
    with progress.muted():
        try:
            results = prefetch(handles, jobs=args.jobs, observer=display, on_done=on_done)
        finally:
            display.close()
    seconds = time.monotonic() - started
    failed = [r for r in results if r.error is not None]
    if args.json:
        _print_json([r.to_json() for r in results])
    else:
        fetched = [r for r in results if r.status == "fetched"]
        _say(f"{len(results)} handles in {seconds:.1f} s: {len(fetched)} downloaded "
              f"({format_size(sum(r.downloaded for r in fetched))}), "
              f"{sum(r.status == 'cached' for r in results)} already cached, {len(failed)} failed",
              err=True)
    return 1 if failed else 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .core.config import load_config
    from .maintenance.manage import cache_backends
    from .maintenance.verify import verify

    results = verify(cache_backends(load_config(), args.backend), args.handles, full=args.full,
                     repair=args.repair)
    if args.json:
        _print_json([r.to_json() for r in results])
    else:
        for r in results:
            what = r.handle or r.key
            detail = "; ".join(r.problems) if r.problems and r.status not in ("repaired", "cleaned") else ""
            if r.status == "repair failed":
                detail = r.error or detail
            elif r.status == "removed":
                detail = ("damaged, removed; not downloaded again because its handle was read from the cache: "
                          "`hubcache verify --repair HANDLE` or the next resolve downloads it")
            _say(f"{r.status:<13} {what}  [{r.backend}]" + (f": {detail}" if detail else ""))
        bad = [r for r in results if not r.good]
        _say(f"{len(results)} entr{'y' if len(results) == 1 else 'ies'} checked "
              f"({'sizes and CRC-32' if args.full else 'sizes'}): "
              f"{len(results) - len(bad)} good, {len(bad)} with problems"
              + ("" if args.repair or not bad else "; `hubcache verify --repair` fixes them"),
              err=True)
    return 0 if all(r.good for r in results) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hubcache", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"hubcache {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log what happens (downloads, waits, evictions) to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    p = sub.add_parser("resolve", help="print the local path of each handle (downloading on first use)",
                       description="Resolve each handle and print one path a line, in order. "
                                   "Exits 1 if any handle fails (the others are still resolved).",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n  hubcache resolve https://tfhub.dev/google/spice/2 ./model.tar.zst")
    p.add_argument("handles", nargs="+", metavar="HANDLE", help="URL, gs:// path or local path")
    p.add_argument("--json", action="store_true", help="print a JSON list of {handle, path|error}")
    p.set_defaults(func=cmd_resolve)

    p = sub.add_parser("config", help="show every effective setting and where it came from",
                       description="Show the selected backend and every setting, with its source: "
                                   "env (an environment variable), flag (an absl flag) or default.")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("plugins", help="list installed plugins, their backends and hooks",
                       description="List the plugins found in the `hubcache` entry-point group: "
                                   "their distribution and version, the backends and hooks each "
                                   "provides, and any that failed to load or were disabled with "
                                   "HUBCACHE_DISABLE_PLUGINS.",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  hubcache plugins\n  hubcache plugins --all --json")
    p.add_argument("--all", action="store_true", help="include the built-in plugins")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_plugins)

    # cache management (cmd_ls, cmd_info, cmd_rm, cmd_prune, cmd_prefetch)
    raw = argparse.RawDescriptionHelpFormatter
    backend_help = ("cache backend(s) to work on, e.g. home or tmp,home (repeatable; "
                    "default: the selected one, see `hubcache config`)")
    p = sub.add_parser(
        "ls", help="list cached models: size, files, last use, state", formatter_class=raw,
        description=_para("List every entry of a cache: its size, file count, when it was last used, its "
                    "state and its handle, most recently used first, then totals.\n\nStates: "
                    "committed (complete, trusted), foreign (written by tensorflow_hub, adopted on "
                    "first use), damaged (files missing: rebuilt on the next resolve), in progress "
                    "(being downloaded, or left over by a crash). `in use` marks entries a running "
                    "process resolved: rm, prune and the size budget leave those alone."),
        epilog="examples:\n  hubcache ls\n  hubcache ls --backend home\n  hubcache ls --backend tmp,home\n"
               "  hubcache ls --json | jq '.entries[] | select(.state != \"committed\")'")
    p.add_argument("--backend", action="append", metavar="NAME", help=backend_help)
    p.add_argument("--json", action="store_true", help="print JSON: entries and per-backend totals")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser(
        "info", help="where a handle would resolve, whether it is cached, its manifest", formatter_class=raw,
        description=_para("Show where HANDLE would resolve (backend, and why that one), where its bytes come "
                    "from, whether it is cached and, if so, its manifest: files, bytes, the archive's "
                    "SHA-256, source URL, creation and last use. Downloads nothing."),
        epilog="examples:\n  hubcache info https://tfhub.dev/google/spice/2\n"
               "  HUBCACHE_BACKEND=home hubcache info --json https://example.com/m.tar.gz")
    p.add_argument("handle", metavar="HANDLE", help="URL, gs:// path or local path")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "rm", help="remove cached models", formatter_class=raw,
        description=_para("Remove the cache entries of the given handles (or cache keys, as `ls --json` "
                    "prints them). An entry another process is using or downloading is kept, and "
                    "the command exits 1 naming who holds it; the next resolve of a removed handle "
                    "downloads it again."),
        epilog="examples:\n  hubcache rm https://tfhub.dev/google/spice/2\n"
               "  hubcache rm --backend home https://example.com/a.tar.gz https://example.com/b.tar.gz\n"
               "  hubcache ls --json | jq -r '.entries[].key' | xargs hubcache rm")
    p.add_argument("handles", nargs="+", metavar="HANDLE", help="handle or 40-hex-digit cache key")
    p.add_argument("--backend", action="append", metavar="NAME", help=backend_help)
    p.add_argument("--json", action="store_true", help="print a JSON list of {handle, backend, outcome, reason}")
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser(
        "prune", help="free space: remove debris, old and least recently used entries", formatter_class=raw,
        description=_para("Remove, in this order: damaged entries and leftovers of interrupted downloads; "
                    "entries not used for --older-than; then least recently used entries until the "
                    "cache holds at most --max-size. Without either option the budget is "
                    "HUBCACHE_MAX_SIZE, if set. Entries in use or being downloaded by another process "
                    "are never removed. --dry-run shows what would go and changes nothing."),
        epilog="examples:\n  hubcache prune --dry-run --max-size 10G\n  hubcache prune --older-than 30d\n"
               "  hubcache prune --backend home --max-size 500M --older-than 2w\n"
               "sizes: 500M, 10G, 1.5T, or bytes; durations: 45s, 90m, 12h, 30d, 2w")
    p.add_argument("--max-size", type=_size_arg, metavar="SIZE", help="evict least recently used entries "
                   "until the cache holds at most SIZE (e.g. 10G)")
    p.add_argument("--older-than", type=_duration_arg, metavar="AGE",
                   help="remove entries not used for AGE (e.g. 30d)")
    p.add_argument("--dry-run", "-n", action="store_true", help="show what would be removed; remove nothing")
    p.add_argument("--backend", action="append", metavar="NAME", help=backend_help)
    p.add_argument("--json", action="store_true", help="print JSON, one report per backend")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser(
        "prefetch", help="download models into the cache ahead of time, in parallel", formatter_class=raw,
        description=_para("Resolve every handle into the selected cache, --jobs at a time, with one progress "
                    "display on a terminal. Use it before going offline (then set HUBCACHE_OFFLINE=1) "
                    "or to warm the cache of each host of a fleet. Handles already cached cost nothing. "
                    "Prints one line per handle (fetched / cached) and a summary; exits 1 if any failed."),
        epilog="examples:\n  hubcache prefetch https://tfhub.dev/google/spice/2 https://example.com/m.tar.zst\n"
               "  HUBCACHE_BACKEND=home hubcache prefetch -f models.txt --jobs 8\n"
               "  cat models.txt | hubcache prefetch -f - --json\n"
               "list files: one handle a line; blank lines and # comments are ignored")
    p.add_argument("handles", nargs="*", metavar="HANDLE", help="URL, gs:// path or local path")
    p.add_argument("-f", "--file", action="append", metavar="FILE",
                   help="read handles from FILE, one a line (- for stdin); repeatable")
    p.add_argument("--jobs", "-j", type=int, default=4, metavar="N", help="parallel downloads (default 4)")
    p.add_argument("--json", action="store_true", help="print a JSON list of {handle, status, path, error, ...}")
    p.set_defaults(func=cmd_prefetch)

    p = sub.add_parser(
        "verify", help="check cached models against their manifests; --repair fixes them",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_para("Check each entry of HANDLEs (default: every entry of the cache) against its "
                          "manifest: every file present with its recorded size, or with --full also its "
                          "CRC-32 (reads every byte). A pinned handle (#sha256=..., or HUBCACHE_PINS) must "
                          "come from an archive with that digest. Leftovers of interrupted downloads are "
                          "reported too; with --full also files or objects in an entry that its manifest "
                          "does not list.\n\n--repair removes what is damaged or left over. It downloads "
                          "again only the HANDLEs named on the command line, as the next resolve would: "
                          "with no HANDLEs (or cache keys) it only cleans up and never fetches a handle read "
                          "from the cache, since a manifest or descriptor in a shared cache or bucket may be "
                          "planted (naming a local file or an intranet URL). Exits 1 if a problem remains."),
        epilog="examples:\n  hubcache verify\n  hubcache verify --full https://tfhub.dev/google/spice/2\n"
               "  hubcache verify --repair --json")
    p.add_argument("handles", nargs="*", metavar="HANDLE", help="handle or 40-hex-digit cache key")
    p.add_argument("--full", action="store_true", help="also compare every file's CRC-32 (reads all bytes)")
    p.add_argument("--repair", action="store_true", help="remove damaged entries and leftovers; download "
                   "again only the HANDLEs given (never a handle read from the cache)")
    p.add_argument("--backend", action="append", metavar="NAME",
                   help="cache backend(s) to check (default: the selected one)")
    p.add_argument("--json", action="store_true", help="print a JSON list of {handle, key, status, problems}")
    p.set_defaults(func=cmd_verify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    restore_logging = _log_to_stderr() if args.verbose else None
    try:
        command: Callable[[argparse.Namespace], int] = args.func  # set by each command's parser
        return command(args)
    except HubcacheError as error:
        _say(f"hubcache: error: {error}", err=True)
        return 1
    except KeyboardInterrupt:
        _say("hubcache: interrupted", err=True)
        return 130
    except BrokenPipeError:
        return 1
    finally:
        if restore_logging is not None:
            restore_logging()


def _log_to_stderr() -> Callable[[], None]:
    """``-v``: the ``hubcache`` logger's INFO lines on stderr; returns what undoes it.

    Only the ``hubcache`` logger is configured (not propagating, so a root handler an embedding
    program set up does not print each line twice); the root logger's level and handlers are
    the program's own. Undone after the command, so ``main()`` run twice in one process does
    not print every line twice.
    """
    logger = logging.getLogger("hubcache")
    handler = logging.StreamHandler()
    handler.setFormatter(_PrintableFormatter("hubcache: %(message)s"))
    saved = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

    def restore() -> None:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]

    return restore


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
