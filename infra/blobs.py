"""Content-addressed blob storage: models, datasets, shard outputs and artifacts.

A blob's name is the sha256 of its bytes, so the same upload twice is stored once and a
rewritten shard output changes nothing. Paths are built only from validated hex digests:
nothing a user sends becomes part of a path. ``BlobStore`` is the small interface an
S3-compatible store can implement later.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from contextlib import contextmanager
from pathlib import Path

_DIGEST = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 1 << 20


class BlobTooLarge(Exception):
    def __init__(self, limit: int):
        super().__init__(f"larger than the limit of {limit} bytes")
        self.limit = limit


class BlobStore(ABC):
    @abstractmethod
    def put_bytes(self, data: bytes) -> str:
        """Store ``data``; return its sha256."""

    @abstractmethod
    def put_file(self, path: Path, sha256: str) -> None:
        """Move a local file whose sha256 the caller computed into the store."""

    @abstractmethod
    def get_bytes(self, sha256: str) -> bytes: ...

    @abstractmethod
    def local_path(self, sha256: str) -> Path:
        """A readable local file with the blob's bytes (a cache for remote stores)."""

    @abstractmethod
    def exists(self, sha256: str) -> bool: ...

    @abstractmethod
    def delete(self, sha256: str) -> None: ...

    @abstractmethod
    def reachable(self) -> bool: ...


def check_digest(sha256: str) -> str:
    if not _DIGEST.match(sha256):
        raise ValueError("not a sha256 hex digest")
    return sha256


class LocalBlobStore(BlobStore):
    """Blobs as files ``<root>/ab/cdef...`` on a local disk or a shared volume."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)

    def _path(self, sha256: str) -> Path:
        check_digest(sha256)
        return self.root / sha256[:2] / sha256[2:]

    def put_bytes(self, data: bytes) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        if not self.exists(sha256):
            with self.temp_file() as (path, handle):
                handle.write(data)
                handle.close()
                self.put_file(path, sha256)
        return sha256

    def put_file(self, path: Path, sha256: str) -> None:
        target = self._path(sha256)
        target.parent.mkdir(exist_ok=True)
        os.chmod(path, 0o444)
        os.replace(path, target)  # atomic: readers see the whole blob or none

    def get_bytes(self, sha256: str) -> bytes:
        return self._path(sha256).read_bytes()

    def local_path(self, sha256: str) -> Path:
        path = self._path(sha256)
        if not path.is_file():
            raise FileNotFoundError(f"blob {sha256} is missing from the store")
        return path

    def exists(self, sha256: str) -> bool:
        return self._path(sha256).is_file()

    def delete(self, sha256: str) -> None:
        self._path(sha256).unlink(missing_ok=True)

    def reachable(self) -> bool:
        try:
            with self.temp_file() as (_, handle):
                handle.write(b"ok")
            return True
        except OSError:
            return False

    @contextmanager
    def temp_file(self):
        """(path, open binary handle) in the store's tmp folder, removed unless moved in."""
        fd, name = tempfile.mkstemp(dir=self.tmp, prefix="upload-")
        path = Path(name)
        handle = os.fdopen(fd, "wb")
        try:
            yield path, handle
        finally:
            handle.close()
            path.unlink(missing_ok=True)


async def stream_to_file(chunks: AsyncIterator[bytes], handle, limit: int) -> tuple[str, int]:
    """Write an upload to ``handle`` chunk by chunk, hashing it; BlobTooLarge past ``limit``."""
    digest = hashlib.sha256()
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise BlobTooLarge(limit)
        digest.update(chunk)
        handle.write(chunk)
    handle.flush()
    return digest.hexdigest(), size


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
