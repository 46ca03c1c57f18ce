"""The built-in backends, each a plugin registered through the ``hubcache`` entry-point group."""
