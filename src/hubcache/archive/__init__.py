"""Bytes in, files out: archive formats, the decode and digest stages, and safe extraction."""
