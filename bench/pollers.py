"""Many keep-alive HTTP/1.1 pollers, cheap enough that the server is what gets measured.

Each poller holds one connection (raw asyncio streams, no HTTP library) and sends
``GET <path>`` with its tenant's key every ``interval`` seconds (the next poll ``interval``
after the previous one started, or at once when a poll took longer), as a CI job waiting for
its evaluation does. Run as a script it reads its job from stdin and prints its figures:

    echo '{"url": "http://127.0.0.1:8000", "targets": [["/v1/evaluations/ev_..", "rk_.."]],
           "pollers": 1000, "interval": 1.0, "seconds": 30}' | python bench/pollers.py
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from urllib.parse import urlsplit


async def _poller(host: str, port: int, path: str, key: str | None, interval: float, until: float,
                  latencies: list[float], errors: list[str]) -> None:
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n"
    if key:
        request += f"Authorization: Bearer {key}\r\n"
    request_bytes = (request + "\r\n").encode()
    reader = writer = None
    await asyncio.sleep(random.random() * interval)  # the fleet's polls spread over the interval
    while time.perf_counter() < until:
        started = time.perf_counter()
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            assert reader is not None
            writer.write(request_bytes)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
            status = int(head.split(b" ", 2)[1])
            length, close = 0, False
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection" and value.strip().lower() == b"close":
                    close = True
            await reader.readexactly(length)
            if status != 200:
                errors.append(str(status))
            if close:
                writer.close()
                reader = writer = None
        except Exception as exc:  # noqa: BLE001 - every failure is counted by its kind
            errors.append(type(exc).__name__)
            if writer is not None:
                writer.close()
            reader = writer = None
        latencies.append(time.perf_counter() - started)
        left = interval - (time.perf_counter() - started)
        if left > 0:
            await asyncio.sleep(left)
    if writer is not None:
        writer.close()


async def _fleet(url: str, targets: list[tuple[str, str | None]], pollers: int, interval: float,
                 seconds: float) -> tuple[list[float], list[str]]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    latencies: list[float] = []
    errors: list[str] = []
    until = time.perf_counter() + seconds
    await asyncio.gather(*[
        _poller(host, port, *targets[k % len(targets)], interval, until, latencies, errors)
        for k in range(pollers)
    ])
    return latencies, errors


def run(url: str, targets: list[tuple[str, str | None]], pollers: int, interval: float,
        seconds: float) -> dict:
    """Poller k polls targets[k % len(targets)] (path, key) for ``seconds``."""
    latencies, errors = asyncio.run(_fleet(url, targets, pollers, interval, seconds))
    latencies.sort()

    def pick(q: float) -> float:
        return round(1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1)

    return {
        "pollers": pollers,
        "interval_s": interval,
        "seconds": seconds,
        "requests": len(latencies),
        "requests_per_s": round(len(latencies) / seconds, 1),
        "p50_ms": pick(0.50),
        "p99_ms": pick(0.99),
        "max_ms": pick(1.0),
        "errors": len(errors),
        "error_kinds": sorted(set(errors)),
    }


if __name__ == "__main__":
    job = json.load(sys.stdin)
    print(json.dumps(run(job["url"], [tuple(t) for t in job["targets"]], job["pollers"], job["interval"],
                         job["seconds"])))
