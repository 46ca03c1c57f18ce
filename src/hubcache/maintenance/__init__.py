"""The maintenance services behind ``hubcache ls/info/rm/prune/verify/prefetch``: apart from
the resolve path, which never imports them."""
