"""A TCP proxy in front of a real gateway that can fail like a real one: `freeze` (SIGSTOP: the
kernel still accepts connections, nothing is answered), `stop` (the port refuses connections)
and `start` again on the same port."""

from __future__ import annotations

import contextlib
import socket
import threading
from urllib.parse import urlsplit


class Proxy:
    def __init__(self, upstream_url: str):
        parts = urlsplit(upstream_url)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.frozen = threading.Event()
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.port = 0
        self.start()
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        """Refuse new connections and drop the open ones (a gateway killed)."""
        if self._listener is not None:
            self._close(self._listener)
            self._listener = None
        for sock in list(self._sockets):
            self._close(sock)

    def freeze(self) -> None:
        """Accept connections but answer nothing (a gateway stopped with SIGSTOP)."""
        self.frozen.set()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            self._sockets.append(client)
            if self.frozen.is_set():
                continue  # held open, never answered
            upstream = socket.create_connection(self.upstream)
            self._sockets.append(upstream)
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := source.recv(65536):
                if self.frozen.is_set():
                    return  # the bytes are swallowed; both ends stay open
                sink.sendall(chunk)
            sink.shutdown(socket.SHUT_WR)

    @staticmethod
    def _close(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
