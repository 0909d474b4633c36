"""A worker's blob store when it shares no folder with the gateway: blobs come from the
gateway by sha256 (``GET /internal/blobs/{sha256}``, authenticated with the worker token) into
a local cache, and what the worker writes (shard outputs, artifacts, reports) goes to the
gateway (``PUT``) before the worker records it in the database.

Every byte that arrives is hashed on the way into the cache and kept only if the hash is the
blob's name, so a truncated or altered transfer is never used. The cache is bounded
(``max_cache_bytes``): past it, the blobs used longest ago are removed.

A gateway that does not answer (restarting, redeployed, a dropped connection, a 502/503/504
from a proxy in front of it) is waited for: each transfer is tried again with backoff for up to
``retry_s`` seconds (ROBUSTNESS_GATEWAY_RETRY_S), the finished output of a shard waiting in the
cache meanwhile. Past that, GatewayUnreachable, whose message names "the gateway" but not its
address (messages reach tenants); the worker's log has the address.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import httpx

from infra.blobs import CHUNK, BlobStore, LocalBlobStore, check_digest

log = logging.getLogger("robustness.gateway_blobs")

FIRST_BACKOFF_S, MAX_BACKOFF_S = 0.5, 10.0  # doubling from the first to the largest wait
START_CHECK_S = 3.5  # a worker starting checks the gateway this long, then says what is wrong


class GatewayUnreachable(OSError):
    pass


class GatewayBlobStore(BlobStore):
    def __init__(self, gateway_url: str, token: str, cache_root: Path, max_cache_bytes: int,
                 transport: httpx.BaseTransport | None = None, retry_s: float = 120):
        self.cache = LocalBlobStore(cache_root)
        self.max_cache_bytes = max_cache_bytes
        self.retry_s = retry_s
        self.http = httpx.Client(base_url=gateway_url.rstrip("/"), transport=transport,
                                 headers={"Authorization": f"Bearer {token}"},
                                 timeout=httpx.Timeout(120.0, connect=10.0))

    # ------------------------------------------------------------------ reads

    def local_path(self, sha256: str) -> Path:
        check_digest(sha256)
        if not self.cache.exists(sha256):
            self._fetch(sha256)
        path = self.cache.local_path(sha256)
        os.utime(path)  # most recently used: the last to be evicted
        return path

    def get_bytes(self, sha256: str) -> bytes:
        return self.local_path(sha256).read_bytes()

    def exists(self, sha256: str) -> bool:
        check_digest(sha256)
        if self.cache.exists(sha256):
            return True
        response = self._request("HEAD", sha256)
        return response.status_code == 200

    def _fetch(self, sha256: str) -> None:
        def download() -> None:
            with self.cache.temp_file() as (path, handle), \
                    self.http.stream("GET", f"/internal/blobs/{sha256}") as response:
                if response.status_code == 404:
                    raise FileNotFoundError(f"blob {sha256} is missing from the gateway's store")
                _raise_for_status(response)
                digest = hashlib.sha256()
                for chunk in response.iter_bytes(CHUNK):
                    digest.update(chunk)
                    handle.write(chunk)
                handle.close()
                if digest.hexdigest() != sha256:
                    raise GatewayUnreachable(f"blob {sha256} arrived altered or truncated")
                self._make_room()
                self.cache.put_file(path, sha256)

        self._retried(download)

    # ------------------------------------------------------------------ writes

    def put_bytes(self, data: bytes) -> str:
        sha256 = self.cache.put_bytes(data)
        self._send(sha256)
        return sha256

    def put_file(self, path: Path, sha256: str) -> None:
        self.cache.put_file(path, sha256)
        self._send(sha256)

    def _send(self, sha256: str) -> None:
        def upload() -> None:
            with self.cache.local_path(sha256).open("rb") as handle:
                response = self.http.put(f"/internal/blobs/{sha256}", content=_chunks(handle))
            _raise_for_status(response)

        self._retried(upload)
        self._make_room()

    def delete(self, sha256: str) -> None:
        self.cache.delete(sha256)  # the gateway's copy is the gateway's to delete

    def reachable(self) -> bool:
        try:
            return self._request("HEAD", "0" * 64, START_CHECK_S).status_code in (200, 404)
        except GatewayUnreachable:
            return False

    def check_token(self) -> str | None:
        """None when the gateway answers and accepts the token, else what is wrong."""
        try:
            status = self._request("HEAD", "0" * 64, START_CHECK_S).status_code
        except GatewayUnreachable as exc:
            return f"{exc} (ROBUSTNESS_GATEWAY_URL={self.http.base_url})"
        if status in (401, 403):
            return "the gateway refused the worker token (ROBUSTNESS_WORKER_TOKEN must equal the gateway's)"
        if status not in (200, 404):
            return f"the gateway answered {status} to a blob request; is ROBUSTNESS_GATEWAY_URL the gateway?"
        return None

    # ------------------------------------------------------------------ plumbing

    def _request(self, method: str, sha256: str, retry_s: float | None = None) -> httpx.Response:
        return self._retried(lambda: self.http.request(method, f"/internal/blobs/{sha256}"), retry_s)

    def _retried(self, call, retry_s: float | None = None):
        """``call()``, tried again while the gateway does not answer, for up to ``retry_s``
        seconds (default: the store's), waiting 0.5, 1, 2 ... up to MAX_BACKOFF_S in between."""
        window = self.retry_s if retry_s is None else retry_s
        deadline = time.monotonic() + window
        wait = FIRST_BACKOFF_S
        while True:
            try:
                return call()
            except (httpx.TransportError, GatewayUnreachable) as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.error("gateway.unreachable url=%s error=%s: giving up after %g s",
                              self.http.base_url, exc, window)
                    raise GatewayUnreachable(f"the gateway did not answer for {window:g} s: {exc}") from None
                log.warning("gateway.unreachable url=%s error=%s: trying again in %.1f s",
                            self.http.base_url, exc, min(wait, left))
                time.sleep(min(wait, left))
                wait = min(2 * wait, MAX_BACKOFF_S)

    def _make_room(self) -> None:
        """Remove the least recently used cached blobs while the cache is over its bound."""
        entries = []
        for folder in self.cache.root.iterdir():
            if len(folder.name) == 2 and folder.is_dir():
                for blob in folder.iterdir():
                    info = blob.stat()
                    entries.append((info.st_mtime, info.st_size, blob))
        total = sum(size for _, size, _ in entries)
        for _, size, blob in sorted(entries):
            if total <= self.max_cache_bytes:
                break
            blob.unlink(missing_ok=True)
            total -= size


def _chunks(handle):
    while chunk := handle.read(CHUNK):
        yield chunk


def _raise_for_status(response: httpx.Response) -> None:
    if response.status_code in (502, 503, 504):
        raise GatewayUnreachable(f"the gateway answered {response.status_code}")
    if response.is_error:
        response.read()
        raise OSError(f"the gateway refused a blob transfer: {response.status_code} {response.text[:300]}")


def blob_store_of_worker(settings) -> BlobStore:
    """The gateway's store over HTTP when the worker is given ROBUSTNESS_GATEWAY_URL, else the
    shared folder ``blob_dir``."""
    if settings.gateway_url:
        return GatewayBlobStore(settings.gateway_url, settings.worker_token or "", settings.blob_dir,
                                settings.blob_cache_mb << 20, retry_s=settings.gateway_retry_s)
    return LocalBlobStore(settings.blob_dir)
