"""Real faults for tests: a TCP proxy that can close its port, a private redis-server, a held SQLite lock."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path


class TcpProxy:
    """Forwards 127.0.0.1:`port` to `target`. `down()` closes the port and resets every
    connection through it (to the client, the server is gone); `up()` opens it again."""

    def __init__(self, target: tuple[str, int], port: int = 0) -> None:
        self.target = target
        self.port = port
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    def up(self) -> TcpProxy:
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        ls.listen(128)
        self.port = ls.getsockname()[1]
        self._listener = ls
        threading.Thread(target=self._accept, args=(ls,), daemon=True).start()
        return self

    def down(self) -> None:
        # Only shutdown() here: it wakes the threads blocked on these sockets, and each thread
        # closes its own (a close() under a blocked thread could hand its fd to a new socket).
        ls, self._listener = self._listener, None
        if ls is not None:
            with contextlib.suppress(OSError):
                ls.shutdown(socket.SHUT_RDWR)
        with self._lock:
            conns, self._conns = self._conns, set()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)

    def _accept(self, ls: socket.socket) -> None:
        with ls:
            while True:
                try:
                    client, _ = ls.accept()
                except OSError:
                    return
                try:
                    server = socket.create_connection(self.target, timeout=5)
                    server.settimeout(None)
                except OSError:
                    client.close()
                    continue
                with self._lock:
                    if self._listener is not ls:  # went down meanwhile
                        client.close()
                        server.close()
                        return
                    self._conns.update((client, server))
                done = threading.Barrier(2, action=lambda c=client, s=server: self._close(c, s))
                for a, b in ((client, server), (server, client)):
                    threading.Thread(target=self._pump, args=(a, b, done), daemon=True).start()

    def _close(self, *socks: socket.socket) -> None:
        with self._lock:
            self._conns.difference_update(socks)
        for s in socks:
            s.close()

    def _pump(self, src: socket.socket, dst: socket.socket, done: threading.Barrier) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        done.wait()  # both directions ended: the last one closes both sockets


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A private redis-server on its own port, no persistence: `stop()` loses nothing that was
    not already in it, and `start()` brings back an empty server on the same port."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"

    @staticmethod
    def available() -> bool:
        return shutil.which("redis-server") is not None

    def start(self, timeout: float = 10.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "yes",
                "--dir",
                str(self.workdir),
                "--pidfile",
                str(self.workdir / f"redis-{self.port}.pid"),
                "--logfile",
                str(self.workdir / f"redis-{self.port}.log"),
            ],
            check=True,
            timeout=timeout,
        )
        deadline = time.monotonic() + timeout
        while not self.ping():
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.05)

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            subprocess.run(
                ["redis-cli", "-p", str(self.port), "shutdown", "nosave"],
                timeout=timeout,
                capture_output=True,
                check=False,
            )
        deadline = time.monotonic() + timeout
        while self.ping():
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not stop")
            time.sleep(0.05)


@contextlib.contextmanager
def private_redis(workdir: Path) -> Iterator[RedisServer]:
    server = RedisServer(workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()
