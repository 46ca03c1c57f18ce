"""The S3 store of hubcache-s3: hubcache's object-store protocol on S3.

Imported by :meth:`hubcache_s3.S3Backend.store_class` when an ``s3://`` cache is first used. Like
the plugin module, it imports only hubcache's stable plugin API (:mod:`hubcache.plugin`) and s3fs.
"""

from __future__ import annotations

import shutil
from typing import IO, Any

from hubcache.plugin import ObjectStore, PreconditionFailed


def _refused(error: BaseException) -> bool:
    """Whether an s3fs error is S3's answer to a failed precondition.

    s3fs turns botocore's ``ClientError`` into an ``OSError`` (``412 PreconditionFailed`` on an
    ``If-Match`` becomes ``OSError(EINVAL)``; on an ``If-None-Match``, ``FileExistsError``) and
    keeps the original as ``__cause__``: the code is read from there. ``409
    ConditionalRequestConflict`` is S3's answer when another conditional write of the key was in
    flight at the same time: someone else wrote it, so it is refused as well.
    """
    if isinstance(error, FileExistsError):
        return True
    response = getattr(error.__cause__, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("PreconditionFailed", "ConditionalRequestConflict", "412") or status == 412


class S3ObjectStore(ObjectStore):
    """hubcache's object-store protocol on S3: the conditional create, and the lease's rewrites
    conditional on the ETag (``If-Match``)."""


    def create_object(self, path: str, data: bytes) -> None:
        """Create ``path`` only if no object is there (the commit and the lease rest on this).

        s3fs sends the ``PUT`` that closes an ``"xb"`` file with ``If-None-Match: *``; S3 (since
        August 2024), MinIO and moto answer ``412`` when the key exists, which s3fs raises as
        :class:`FileExistsError`. A store that ignores the header makes the lease advisory only;
        the commit stays correct because racing writers upload identical objects. (s3fs also
        honours the base class's ``pipe_file(mode="create")``; ``"xb"`` is fsspec's spelling
        of an exclusive write that every filesystem with the feature implements, and it streams.)

        Raises:
            FileExistsError: if an object is already there.
        """
        if not data:
            # s3fs closes an empty "xb" file with an unconditional touch; pipe_file keeps the header.
            self.fs.pipe_file(path, data, mode="create")
            return
        with self.fs.open(path, "xb") as out:
            out.write(data)

    def read_versioned(self, path: str, limit: int | None = None) -> tuple[bytes, str] | None:
        """The object's bytes (at most ``limit + 1`` with ``limit``) and ETag, from one
        ``GetObject``."""
        from fsspec.asyn import sync

        bucket, key, _ = self.fs.split_path(path)

        async def get(**ranged: str) -> tuple[bytes, str]:
            response = await self.fs._call_s3("get_object", Bucket=bucket, Key=key, **ranged)
            try:
                return await response["Body"].read(), str(response["ETag"])
            finally:
                response["Body"].close()

        try:
            if limit is None:
                return sync(self.fs.loop, get)
            try:
                return sync(self.fs.loop, get, Range=f"bytes=0-{limit}")
            except FileNotFoundError:
                raise
            except OSError as error:  # 416 InvalidRange: a range on an empty object
                code = (getattr(error.__cause__, "response", None) or {}).get("Error", {}).get("Code")
                if code != "InvalidRange":
                    raise
                return sync(self.fs.loop, get)
        except FileNotFoundError:
            return None

    def replace_object(self, path: str, data: bytes, version: str) -> str:
        """``PutObject`` with ``If-Match: <ETag>`` (S3 since November 2024, MinIO, moto).

        An ETag is the MD5 of the bytes here, so two writes of identical bytes would share one;
        the lease's contents differ on every heartbeat (a beat counter and a time), so a version
        never comes back. A store that ignores ``If-Match`` makes this an unconditional write.

        Raises:
            PreconditionFailed: if the object's ETag is another, or the object is gone.
        """
        return self.put_versioned(path, data, version)

    def version_of(self, info: dict) -> str:
        """The ETag (the version ``If-Match`` takes), as s3fs lists it."""
        return str(info.get("ETag") or "")

    def stat_version(self, path: str) -> str | None:
        """The object's ETag, from one ``HeadObject``."""
        bucket, key, _ = self.fs.split_path(path)
        try:
            return str(self.fs.call_s3("head_object", Bucket=bucket, Key=key)["ETag"])
        except FileNotFoundError:
            return None

    def put_versioned(self, path: str, data: bytes | IO[bytes], expected: str) -> str:
        """``PutObject`` with ``If-None-Match: *`` (``expected == ""``) or ``If-Match: <ETag>``.

        A stream (a large file) is written through s3fs's ``"xb"`` mode, which sends the final
        request (``PutObject`` or ``CompleteMultipartUpload``) with ``If-None-Match: *``; to
        replace an object at ``expected`` it is first deleted with ``If-Match``, so a writer
        racing in between makes the create, and so this call, fail.

        Raises:
            PreconditionFailed: the object is not at ``expected``.
        """
        bucket, key, _ = self.fs.split_path(path)
        if isinstance(data, (bytes, bytearray)):
            condition = {"IfMatch": expected} if expected else {"IfNoneMatch": "*"}
            try:
                return str(self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=bytes(data),
                                           **condition)["ETag"])
            except FileNotFoundError:  # If-Match on a key that is gone: 404 NoSuchKey
                raise PreconditionFailed(path) from None
            except OSError as error:
                if _refused(error):
                    raise PreconditionFailed(path) from None
                raise
        if expected:
            self.delete_versioned(path, expected)
        try:
            with self.fs.open(path, "xb") as out:
                shutil.copyfileobj(data, out, 1 << 20)
        except OSError as error:
            if _refused(error):
                raise PreconditionFailed(path) from None
            raise
        return self.stat_version(path) or ""

    def delete_versioned(self, path: str, version: str) -> None:
        """``DeleteObject`` with ``If-Match: <ETag>`` (gone already is fine).

        moto enforces it; a service that ignores the header deletes unconditionally (the lease's
        release, which checked the lease was its own just before, only a heartbeat earlier).
        """
        bucket, key, _ = self.fs.split_path(path)
        try:
            self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=version)
        except FileNotFoundError:
            return
        except OSError as error:
            if _refused(error):
                raise PreconditionFailed(path) from None
            raise
