"""hubcache's core: handles, settings, hooks, plugins, locate, download and extraction, the cache
entry protocol. Nothing here knows any particular backend."""
