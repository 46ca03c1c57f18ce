"""Hosts whose handles are fetched from somewhere other than the handle's own URL.

tensorflow_hub's compressed resolver (``compressed_module_resolver.py``) downloads a handle that
starts with ``https://hub.tensorflow.google.cn/`` straight from the China mirror's bucket: the rest
of the handle, as written, becomes ``https://gcs.tensorflow.google.cn/tfhub-modules/<rest>.tar.gz``
(no ``?tf-hub-format=compressed`` round trip). hubcache does the same, so such handles get the
same bytes; their cache key stays ``sha1(handle)``, as tensorflow_hub's does. The uncompressed
format has no such rule in tensorflow_hub, and has none here.

Kaggle Models needs no rule: ``https://www.kaggle.com/models/...`` handles, and the tfhub.dev
handles that now redirect there, speak the compressed protocol (``?tf-hub-format=compressed``,
answered by redirects to a signed storage URL) like any model server.
"""

from __future__ import annotations

#: The China mirror's handle prefix, and where its archives are (as tensorflow_hub has them).
CHINA_HUB = "https://hub.tensorflow.google.cn/"
CHINA_ARCHIVE = "https://gcs.tensorflow.google.cn/tfhub-modules/{}.tar.gz"


def mirrored_archive(url: str) -> str | None:
    """The archive URL a handle's host stands for, or ``None`` when it is fetched as it is.

    Args:
        url: the handle's URL (without its pin).
    """
    if url.startswith(CHINA_HUB):
        return CHINA_ARCHIVE.format(url[len(CHINA_HUB):])
    return None
