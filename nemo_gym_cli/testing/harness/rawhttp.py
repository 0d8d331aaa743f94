"""A raw-socket HTTP server for tests and benches: it answers each request with bytes the caller
chooses, valid HTTP or not, on a real port, in a background thread (so blocking code can use it too)."""

from __future__ import annotations

import socket
import socketserver
import threading
from typing import Callable

# (method, path, headers {lower name: value}, body) -> raw answer bytes, or None to close without one
Answer = Callable[[str, str, dict, bytes], "bytes | None"]


def response(status: int, body: bytes, *headers: str) -> bytes:
    head = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class RawServer:
    """`requests` lists (method, path, body) of every request it read, in order."""

    def __init__(self, answer: Answer):
        self.answer = answer
        self.requests: list[tuple[str, str, bytes]] = []
        self.raw_received: list[bytes] = []
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                sock: socket.socket = self.request
                buf = b""
                while True:
                    while b"\r\n\r\n" not in buf:
                        data = sock.recv(65536)
                        if not data:
                            return
                        buf += data
                        outer.raw_received.append(data)
                    head, _, buf = buf.partition(b"\r\n\r\n")
                    lines = head.decode("latin-1").split("\r\n")
                    method, path, _ = lines[0].split(" ", 2)
                    headers = {}
                    for line in lines[1:]:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                    length = int(headers.get("content-length", 0))
                    while len(buf) < length:
                        data = sock.recv(65536)
                        if not data:
                            return
                        buf += data
                    body, buf = buf[:length], buf[length:]
                    outer.requests.append((method, path, body))
                    out = outer.answer(method, path, headers, body)
                    if out is None:
                        return  # close without answering
                    try:
                        sock.sendall(out)
                    except (BrokenPipeError, ConnectionResetError):
                        return  # the client stopped reading (e.g. it refused an answer over its cap)
                    if b"connection: close" in out[:out.find(b"\r\n\r\n")].lower():
                        return

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
