"""The object-store protocol on GCS: the lease's rewrites conditional on the object's generation.

Imported by the ``gcs`` backend when it builds its store (not when plugins load).
"""

from __future__ import annotations

import json
from urllib.parse import quote

from hubcache.core.objectstore import ObjectStore, PreconditionFailed


class GcsObjectStore(ObjectStore):
    """The object-store protocol on GCS, with the lease's rewrites conditional on the generation.

    gcsfs has no call for an upload or a delete conditional on a given generation (only
    ``mode="create"``, i.e. ``ifGenerationMatch=0``), so these send the JSON API requests through
    gcsfs's authenticated session themselves. A multipart upload is used because it is the one
    upload type whose preconditions fake-gcs-server enforces as well as GCS does.
    """


    def _split(self, path: str) -> tuple[str, str]:
        bucket, key, _ = self.fs.split_path(path)
        return bucket, key

    def read_versioned(self, path: str) -> tuple[bytes, str] | None:
        """The object's bytes and generation, from one media download."""
        bucket, key = self._split(path)
        try:
            headers, data = self.fs.call("GET", "b/{}/o/{}", bucket, key, alt="media")
        except FileNotFoundError:
            return None
        generation = headers.get("X-Goog-Generation") or headers.get("x-goog-generation")
        if not generation:  # pragma: no cover - GCS and its emulators always send it
            raise OSError(f"no generation in the response for gs://{path}")
        return bytes(data), str(generation)

    def replace_object(self, path: str, data: bytes, version: str) -> str:
        """Upload ``data`` with ``ifGenerationMatch=version``; return the new generation."""
        bucket, key = self._split(path)
        boundary = "==hubcache=="
        body = (f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n"
                f"{json.dumps({'name': key})}\r\n--{boundary}\r\n"
                "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--".encode()
        try:
            out = self.fs.call("POST", f"{self.fs._location}/upload/storage/v1/b/{quote(bucket)}/o",
                               uploadType="multipart", ifGenerationMatch=str(version), data=body,
                               headers={"Content-Type": f'multipart/related; boundary="{boundary}"'},
                               json_out=True)
        except (FileExistsError, FileNotFoundError):  # gcsfs raises FileExistsError for a 412
            raise PreconditionFailed(path) from None
        return str(out["generation"])

    def delete_versioned(self, path: str, version: str) -> None:
        """Delete with ``ifGenerationMatch=version``.

        GCS enforces that precondition; fake-gcs-server ignores it on deletes, so the generation
        is read first as well (a refusal there costs one request, and a lease is released once).
        """
        bucket, key = self._split(path)
        try:
            current = self.fs.call("GET", "b/{}/o/{}", bucket, key, json_out=True).get("generation")
            if str(current) != str(version):
                raise PreconditionFailed(path)
            self.fs.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=str(version))
        except FileNotFoundError:
            return
        except FileExistsError:  # a 412 from GCS
            raise PreconditionFailed(path) from None
