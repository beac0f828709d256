"""A TCP relay in front of a server that can be cut off and healed: what a store endpoint looks like from a job
when the network to it partitions, or when it is down.

- `cut()`: connections are still accepted (the kernel answers the handshake) but no byte goes through either
  way, so a client waits on its own deadlines, as it would behind a dead switch; when healed, bytes held back
  are delivered, as TCP retransmits them, to whoever is still listening.
- `cut(refuse=True)`: every connection, open or new, is closed as soon as it is used: calls fail at once, as
  against a server that is down.

    relay = PausableRelay(("127.0.0.1", 5000)).start()   # relay.url: http://127.0.0.1:<port>
    relay.cut(); ...; relay.heal(); relay.stop()
"""

from __future__ import annotations

import socket
import threading


class PausableRelay:
    def __init__(self, upstream: tuple[str, int], host: str = "127.0.0.1"):
        self.upstream = upstream
        self._listen = socket.create_server((host, 0))
        self.port = self._listen.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self._open = threading.Event()
        self._open.set()
        self._refuse = False
        self._stopped = threading.Event()

    def start(self) -> PausableRelay:
        threading.Thread(target=self._accept, name="relay-accept", daemon=True).start()
        return self

    def cut(self, refuse: bool = False) -> None:
        self._refuse = refuse
        if not refuse:
            self._open.clear()

    def heal(self) -> None:
        self._refuse = False
        self._open.set()

    @property
    def is_cut(self) -> bool:
        return self._refuse or not self._open.is_set()

    def stop(self) -> None:
        self._stopped.set()
        self._open.set()
        self._listen.close()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listen.accept()
            except OSError:
                return
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        self._open.wait()
        if self._refuse:
            client.close()
            return
        try:
            server = socket.create_connection(self.upstream, timeout=10)
            server.settimeout(None)
        except OSError:
            client.close()
            return
        for src, dst in ((client, server), (server, client)):
            threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                self._open.wait()  # held while cut, delivered when healed
                if not data or self._refuse:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
