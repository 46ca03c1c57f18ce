"""The object-store protocol on GCS: the lease's rewrites conditional on the object's generation.

Imported by the ``gcs`` backend when it builds its store (not when plugins load).
"""

from __future__ import annotations

import json
import os
from typing import IO, Any, AsyncIterator, cast
from urllib.parse import quote

from ..stores.objectstore import ObjectStore, PreconditionFailed


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

    def read_versioned(self, path: str, limit: int | None = None) -> tuple[bytes, str] | None:
        """The object's bytes (at most ``limit + 1`` with ``limit``) and generation, from one
        media download."""
        bucket, key = self._split(path)
        ranged = {"headers": {"Range": f"bytes=0-{limit}"}} if limit is not None else {}
        try:
            try:
                headers, data = self.fs.call("GET", "b/{}/o/{}", bucket, key, alt="media", **ranged)
            except FileNotFoundError:
                raise
            except Exception as error:
                if not ranged or getattr(error, "code", None) != 416:
                    raise
                # GCS answers a range on an empty object with 416.
                headers, data = self.fs.call("GET", "b/{}/o/{}", bucket, key, alt="media")
        except FileNotFoundError:
            return None
        generation = headers.get("X-Goog-Generation") or headers.get("x-goog-generation")
        if not generation:  # pragma: no cover - GCS and its emulators always send it
            raise OSError(f"no generation in the response for gs://{path}")
        return bytes(data), str(generation)

    def version_of(self, info: dict[str, Any]) -> str:
        """The generation (gcsfs puts it in every listing's and ``info``'s record)."""
        return str(info.get("generation") or "")

    def stat_version(self, path: str) -> str | None:
        """The object's generation, from one fresh metadata read."""
        bucket, key = self._split(path)
        try:
            return str(self.fs.call("GET", "b/{}/o/{}", bucket, key, json_out=True)["generation"])
        except FileNotFoundError:
            return None

    def replace_object(self, path: str, data: bytes, version: str) -> str:
        """Upload ``data`` with ``ifGenerationMatch=version``; return the new generation."""
        return self.put_versioned(path, data, version)

    async def _put(self, path: str, data: bytes | IO[bytes], expected: str) -> str:
        bucket, key = self._split(path)
        body = _MultipartBody(key, data)
        try:
            out = await self.fs._call(
                "POST", f"{self.fs._location}/upload/storage/v1/b/{quote(bucket)}/o",
                uploadType="multipart", ifGenerationMatch=expected or "0", data=body,
                headers={"Content-Type": f'multipart/related; boundary="{_BOUNDARY}"',
                         "Content-Length": str(body.size)},
                json_out=True)
        except (FileExistsError, FileNotFoundError):  # gcsfs raises FileExistsError for a 412
            raise PreconditionFailed(path) from None
        return str(out["generation"])

    def put_versioned(self, path: str, data: bytes | IO[bytes], expected: str) -> str:
        """One multipart upload with ``ifGenerationMatch`` (``0`` to create only), its body
        streamed from ``data``: the upload type whose preconditions GCS and fake-gcs-server
        both enforce (a resumable upload's are ignored by the emulator)."""
        from fsspec.asyn import sync

        return cast(str, sync(self.fs.loop, self._put, path, data, expected))  # fsspec is untyped

    def put_batch_versioned(self, batch: dict[str, tuple[bytes, str]]) -> dict[str, str | None]:
        """The batch's conditional uploads sent concurrently on gcsfs's event loop."""
        import asyncio

        from fsspec.asyn import sync

        async def one(path: str, data: bytes, expected: str) -> str | None:
            try:
                return await self._put(path, data, expected)
            except PreconditionFailed:
                return None

        async def every() -> list[str | None]:
            return await asyncio.gather(*(one(p, d, e) for p, (d, e) in batch.items()))

        return dict(zip(batch, sync(self.fs.loop, every)))

    def copy_versioned(self, source: str, target: str, expected: str) -> str:
        """A server-side rewrite with ``ifGenerationMatch`` on the target (``0``: create only).

        GCS enforces the precondition; fake-gcs-server ignores it on rewrites, so the target's
        generation is compared first as well (one metadata read; links are rare in models)."""
        if (self.stat_version(target) or "") != expected:
            raise PreconditionFailed(target)
        src_bucket, src_key = self._split(source)
        bucket, key = self._split(target)
        params: dict[str, str] = {"ifGenerationMatch": expected or "0"}
        try:
            while True:
                out = self.fs.call("POST", "b/{}/o/{}/rewriteTo/b/{}/o/{}", src_bucket, src_key, bucket, key,
                                   json_out=True, **params)
                if out.get("done", True):
                    return str(out["resource"]["generation"])
                params["rewriteToken"] = out["rewriteToken"]  # a large object takes several calls
        except FileExistsError:  # a 412
            raise PreconditionFailed(target) from None

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


_BOUNDARY = "==hubcache=="


class _MultipartBody:
    """A multipart upload's body: the metadata part, then ``data`` (bytes, or a seekable local
    file read in 1 MiB chunks, so a large object is streamed, not held in memory).

    An async iterable for aiohttp, with ``size`` for the Content-Length and ``seek(0)``, which
    gcsfs calls before each retry of a request: the body is then produced again from the start.
    """

    def __init__(self, key: str, data: bytes | IO[bytes]):
        self.head = (f"--{_BOUNDARY}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n"
                     f"{json.dumps({'name': key})}\r\n--{_BOUNDARY}\r\n"
                     "Content-Type: application/octet-stream\r\n\r\n").encode()
        self.tail = f"\r\n--{_BOUNDARY}--".encode()
        self.data = data
        if isinstance(data, (bytes, bytearray)):
            length = len(data)
        else:
            self.start = data.tell()
            length = os.fstat(data.fileno()).st_size - self.start
        self.size = len(self.head) + length + len(self.tail)

    def seek(self, offset: int, whence: int = 0) -> int:
        if not isinstance(self.data, (bytes, bytearray)):
            self.data.seek(self.start)
        return 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.head
        if isinstance(self.data, (bytes, bytearray)):
            yield bytes(self.data)
        else:
            self.data.seek(self.start)
            while chunk := self.data.read(1 << 20):  # a local temp file: a short blocking read
                yield chunk
        yield self.tail
