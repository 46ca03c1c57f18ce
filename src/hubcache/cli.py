"""The ``hubcache`` command."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Sequence

from ._version import __version__
from .core.errors import HubcacheError

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
  hubcache config

settings (environment beats absl flags, which beat defaults):
  HUBCACHE_BACKEND         backend name: tmp (default), home, gcs, remote, or a plugin's
  TFHUB_CACHE_DIR          cache root (--tfhub_cache_dir); gs://bucket/prefix selects gcs
  TFHUB_MODEL_LOAD_FORMAT  COMPRESSED | UNCOMPRESSED | AUTO (--tfhub_model_load_format)
  HUBCACHE_OFFLINE=1       use only what is cached; never the network
  HUBCACHE_NO_PROGRESS=1   no progress bar (TFHUB_DOWNLOAD_PROGRESS=1 forces one)
  see `hubcache config` for every setting and where its value came from.
"""


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
                print(f"hubcache: error: {error}", file=sys.stderr)
            continue
        results.append({"handle": handle, "path": path})
        if not args.json:
            print(path, flush=True)
    if args.json:
        _print_json(results)
    return 1 if failed else 0


def cmd_config(args: argparse.Namespace) -> int:
    from .core.config import load_config
    from .core.plugins import get_registry
    from .core.resolver import select_backend_name

    config = load_config()
    name, why = select_backend_name(config)
    registry = get_registry()
    backend = registry.backend_class(name)(config)
    details = backend.describe()
    rows = [{"name": "backend (selected)", "value": name, "source": why}]
    for key, value in details.items():
        if key not in ("name", "description"):
            rows.append({"name": f"backend.{key}", "value": value, "source": "backend"})
    for setting in config.settings.values():
        source = setting.source + (f" ({setting.origin})" if setting.origin else "")
        rows.append({"name": setting.name, "value": setting.value, "source": source, "help": setting.help})
    if args.json:
        _print_json({"backend": name, "reason": why, "backend_details": details,
                     "settings": {s.name: {"value": s.value, "source": s.source, "origin": s.origin}
                                  for s in config.settings.values()},
                     "installed_backends": sorted(registry.backends)})
        return 0
    width = max(len(r["name"]) for r in rows)
    for row in rows:
        value = "-" if row["value"] is None else row["value"]
        print(f"{row['name']:<{width}}  {value}  [{row['source']}]")
    print(f"{'installed backends':<{width}}  {', '.join(sorted(registry.backends))}")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from .core.plugins import get_registry

    registry = get_registry()
    plugins = [p for p in registry.plugins.values() if args.all or not p.builtin]
    rows = [{"name": p.name, "distribution": p.distribution, "version": p.version, "module": p.value,
             "builtin": p.builtin, "backends": p.backends, "hooks": p.hooks,
             "status": "disabled" if p.disabled else ("failed" if p.error else "loaded"), "error": p.error}
            for p in plugins]
    if args.json:
        _print_json(rows)
        return 0
    if not rows:
        print("no third-party plugins installed (`hubcache plugins --all` shows the built-in ones)")
        return 0
    for row in rows:
        origin = f"{row['distribution']} {row['version']}".strip() or row["module"]
        print(f"{row['name']}  ({origin}{', built-in' if row['builtin'] else ''})  {row['status']}")
        if row["backends"]:
            print(f"    backends: {', '.join(row['backends'])}")
        if row["hooks"]:
            print(f"    hooks:    {', '.join(row['hooks'])}")
        if row["error"]:
            print(f"    error:    {row['error']}")
    return 0


Command = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hubcache", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"hubcache {__version__}")
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except HubcacheError as error:
        print(f"hubcache: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("hubcache: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
