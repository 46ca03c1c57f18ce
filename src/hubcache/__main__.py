"""``python -m hubcache``: the same as the ``hubcache`` command."""

from .cli import main

raise SystemExit(main())
