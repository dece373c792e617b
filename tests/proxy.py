"""A TCP proxy on 127.0.0.1 that the fault tests put between the runner and PostgreSQL.

One selector thread forwards bytes both ways. On command it cuts one connection
or all of them (both sides closed, as a reset network would), or goes half-open:
it keeps every socket open but stops forwarding, so neither peer sees an error,
as when a NAT or firewall silently drops a flow. New connections made after
`half_open()` are forwarded normally unless `refuse_new` is set.
"""

from __future__ import annotations

import selectors
import socket
import threading
from dataclasses import dataclass, field


@dataclass
class Link:
    """One proxied connection: the client side, the server side, and whether it forwards."""

    number: int
    client: socket.socket
    server: socket.socket
    frozen: bool = False
    closed: bool = False
    buffered: dict = field(default_factory=dict)  # socket -> bytes waiting to be written to it

    def peer(self, sock: socket.socket) -> socket.socket:
        return self.server if sock is self.client else self.client


class Proxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(512)
        self._listener.setblocking(False)
        self.host, self.port = self._listener.getsockname()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._mutex = threading.Lock()
        self._commands: list = []
        self.links: list[Link] = []
        self.refuse_new = False
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="proxy", daemon=True)

    # -- control (any thread) ------------------------------------------------
    def start(self) -> "Proxy":
        self._thread.start()
        return self

    def url(self, url: str) -> str:
        """The same URL, pointed at the proxy instead of the server."""
        host, port = self.target
        return url.replace(f"@{host}:{port}/", f"@{self.host}:{self.port}/")

    def open_links(self) -> list[Link]:
        with self._mutex:
            return [link for link in self.links if not link.closed]

    def cut(self, link: Link) -> None:
        """Close both sides of one connection."""
        self._command(("cut", link))

    def cut_all(self) -> None:
        self._command(("cut_all", None))

    def half_open(self, link: Link | None = None) -> None:
        """Stop forwarding on one connection, or on all open ones, without closing anything."""
        self._command(("freeze", link))

    def stop(self) -> None:
        """Close everything and end the thread."""
        if not self._thread.is_alive():
            return
        self._stopping.set()
        self._command(("stop", None))
        self._thread.join(10)

    def __enter__(self) -> "Proxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _command(self, command) -> None:
        done = threading.Event()
        with self._mutex:
            self._commands.append((command, done))
        try:
            self._wake_w.send(b"x")
        except OSError:
            return
        done.wait(10)

    # -- the loop (proxy thread) ------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                for key, events in self._selector.select(0.5):
                    if key.data is None:
                        self._accept()
                    elif key.data == "wake":
                        self._wake_r.recv(4096)
                        if self._run_commands():
                            return
                    else:
                        link = key.data
                        if not link.closed:
                            self._pump(link, key.fileobj, events)
        finally:
            for link in list(self.links):
                self._close(link)
            self._selector.close()
            self._listener.close()
            self._wake_r.close()
            self._wake_w.close()
            with self._mutex:
                for _, done in self._commands:
                    done.set()

    def _run_commands(self) -> bool:
        with self._mutex:
            commands, self._commands = self._commands, []
        stop = False
        for (verb, link), done in commands:
            if verb == "cut":
                self._close(link)
            elif verb == "cut_all":
                for each in list(self.links):
                    self._close(each)
            elif verb == "freeze":
                for each in ([link] if link else list(self.links)):
                    if not each.closed:
                        each.frozen = True
                        for sock in (each.client, each.server):
                            self._selector.unregister(sock)
            elif verb == "stop":
                stop = True
            done.set()
        return stop

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        if self.refuse_new:
            client.close()
            return
        try:
            server = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        for sock in (client, server):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._mutex:
            link = Link(len(self.links), client, server)
            self.links.append(link)
        self._selector.register(client, selectors.EVENT_READ, link)
        self._selector.register(server, selectors.EVENT_READ, link)

    def _pump(self, link: Link, sock: socket.socket, events: int) -> None:
        if events & selectors.EVENT_WRITE:
            self._flush(link, sock)
        if not events & selectors.EVENT_READ or link.closed:
            return
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(link)
            return
        peer = link.peer(sock)
        link.buffered[peer] = link.buffered.get(peer, b"") + data
        self._flush(link, peer)

    def _flush(self, link: Link, sock: socket.socket) -> None:
        pending = link.buffered.get(sock, b"")
        try:
            sent = sock.send(pending) if pending else 0
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(link)
            return
        link.buffered[sock] = pending[sent:]
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if link.buffered[sock] else 0)
        self._selector.modify(sock, events, link)

    def _close(self, link: Link) -> None:
        if link.closed:
            return
        link.closed = True
        for sock in (link.client, link.server):
            if not link.frozen:
                try:
                    self._selector.unregister(sock)
                except (KeyError, ValueError):
                    pass
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


class TlsTerminator:
    """PostgreSQL's TLS handshake on 127.0.0.1, forwarding the decrypted protocol to a plain server.

    The embedded server is built without SSL; the client side of `sslmode=verify-full`
    (what the runner controls) sees a real certificate all the same: this answers
    the SSLRequest with 'S', does the TLS handshake with the given certificate, and
    forwards the rest. A GSSENCRequest is declined ('N'), as a server without GSSAPI does.
    """

    SSL_REQUEST, GSSENC_REQUEST = 80877103, 80877104

    def __init__(self, target_host: str, target_port: int, certfile: str, keyfile: str) -> None:
        import ssl

        self.target = (target_host, target_port)
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(certfile, keyfile)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.host, self.port = self._listener.getsockname()
        self._stopping = threading.Event()
        self._sockets: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)

    def __enter__(self) -> "TlsTerminator":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stopping.set()
        try:
            socket.create_connection((self.host, self.port), timeout=1).close()
        except OSError:
            pass
        self._thread.join(5)
        self._listener.close()
        for sock in self._sockets:
            try:
                sock.close()
            except OSError:
                pass

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            client, _ = self._listener.accept()
            if self._stopping.is_set():
                client.close()
                return
            self._sockets.append(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        import ssl
        import struct

        try:
            while True:
                header = self._read(client, 8)
                length, code = struct.unpack("!II", header)
                if code == self.GSSENC_REQUEST:
                    client.sendall(b"N")
                    continue
                break
            server = socket.create_connection(self.target, timeout=5)
            server.settimeout(None)
            self._sockets.append(server)
            if code == self.SSL_REQUEST:
                client.sendall(b"S")
                client = self._context.wrap_socket(client, server_side=True)
                self._sockets.append(client)
            else:
                server.sendall(header + self._read(client, length - 8))
        except (OSError, ssl.SSLError, struct.error):
            client.close()
            return
        threading.Thread(target=self._pipe, args=(server, client), daemon=True).start()
        self._pipe(client, server)

    @staticmethod
    def _read(sock: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise OSError("closed")
            data += chunk
        return data

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.close()
                except OSError:
                    pass
