"""A TCP proxy for fault tests: forwards to a real server and cuts every connection after it has carried
`cut_after_bytes` from the server, mid-message or not, as a flaky network or a restarting load balancer does."""

from __future__ import annotations

import socket
import threading


class CuttingProxy:
    def __init__(self, target: str, cut_after_bytes: int | None = None):
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.cut_after_bytes = cut_after_bytes
        self.cuts = 0
        self._cuts_lock = threading.Lock()  # connections are cut from their own threads
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, self.cut_after_bytes), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, limit: int | None) -> None:
        carried = 0
        try:
            while True:
                chunk = source.recv(512 if limit else 65536)
                if not chunk:
                    break
                if limit is not None and carried + len(chunk) >= limit:
                    sink.sendall(chunk[: max(0, limit - carried)])
                    with self._cuts_lock:
                        self.cuts += 1
                    break
                sink.sendall(chunk)
                carried += len(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def close(self) -> None:
        self._closed = True
        self.listener.close()
