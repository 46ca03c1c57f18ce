"""Where an archive's bytes come from: http(s) with retries and resume, pinned object-store
reads, and tfhub.dev's uncompressed-model pointers."""
