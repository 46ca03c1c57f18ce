"""The plugin machinery: the hook markers and specifications, the registry that loads plugins
(built-ins by module name, then the ``hubcache`` entry points), and the built-in plugins' list."""
