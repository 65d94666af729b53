"""A fault-injecting HTTP/1.1 proxy for S3 tests: sits on 127.0.0.1 in front of moto's server and, on a seeded
schedule, answers a request with 503 SlowDown or 500 InternalError, resets the connection part-way through the
request body or the response body, answers slowly, or stalls mid-body past the client's read timeout.

Each request's fate is drawn from ``random.Random`` seeded with (seed, request identity, how often that request
was seen), so a schedule does not depend on the order in which concurrent clients (Ray workers) arrive, and a
request fails at most ``max_faults`` times in a row: with ``max_faults`` below the client's attempts, a run
through the proxy must succeed, and its output must equal a clean run's. ``always=`` makes every request fail
one way (a permanently broken endpoint).

Bounded: one request per connection (answers carry ``Connection: close``), every socket has a timeout, the
serving thread stops by itself after ``lifetime_s``; loopback addresses only.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import http.client
import random
import socket
import socketserver
import struct
import threading
import time
from urllib.parse import parse_qsl, urlsplit

KINDS = ("slowdown", "internal", "reset_request", "reset_response", "delay", "stall")
_ERRORS = {"slowdown": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
           "internal": (500, "Internal Server Error", "InternalError",
                        "We encountered an internal error. Please try again.")}
_HOP_HEADERS = {"connection", "keep-alive", "expect", "proxy-connection", "transfer-encoding", "te", "upgrade"}


@dataclasses.dataclass
class Schedule:
    """Probability of each fault per request (the rest pass), and how the slow ones behave."""

    slowdown: float = 0.0  # 503 SlowDown with S3's XML error body
    internal: float = 0.0  # 500 InternalError
    reset_request: float = 0.0  # RST after a random number of request-body bytes (nothing reaches S3)
    reset_response: float = 0.0  # forwarded to S3, then RST after a random number of response-body bytes
    delay: float = 0.0  # the answer comes after delay_s (slower than usual, faster than the read timeout)
    stall: float = 0.0  # part of the response body, then silence for stall_s (past the read timeout), then RST
    delay_s: float = 0.3
    stall_s: float = 2.0
    max_faults: int = 3  # a request identity fails at most this many times in a row, then passes


def _identity(method: str, target: str, headers: dict[str, str]) -> str:
    """What makes two requests "the same" for the schedule: method, path, query (sorted) and byte range.

    The bucket (random per test) and multipart upload ids (random per upload) are left out, so a seed gives
    the same faults on every run."""
    parts = urlsplit(target)
    query = sorted((k, "" if k == "uploadId" else v) for k, v in parse_qsl(parts.query, keep_blank_values=True))
    key = parts.path.lstrip("/").partition("/")[2]  # path-style addressing: /bucket/key
    return f"{method} /{key} {query} {headers.get('range', '')}"


class FaultProxy:
    """``with FaultProxy(upstream, Schedule(...), seed=0) as proxy: ... proxy.url ...``; ``proxy.faults`` counts
    the faults injected by kind, ``proxy.requests`` the requests seen."""

    def __init__(self, upstream: str, schedule: Schedule | None = None, *, seed: int = 0,
                 always: str | None = None, lifetime_s: float = 300.0):
        parts = urlsplit(upstream)
        if parts.hostname not in ("127.0.0.1", "localhost") or parts.scheme != "http":
            raise ValueError(f"the fault proxy forwards to loopback http only, not {upstream!r}")
        if always is not None and always not in KINDS:
            raise ValueError(f"always={always!r}: not one of {KINDS}")
        self.upstream = (parts.hostname, parts.port)
        self.schedule, self.seed, self.always, self.lifetime_s = schedule or Schedule(), seed, always, lifetime_s
        self.faults: collections.Counter = collections.Counter()
        self.requests = 0
        self._seen: collections.Counter = collections.Counter()
        self._streak: collections.Counter = collections.Counter()
        self._lock = threading.Lock()
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                proxy._handle(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True, name="faultproxy")

    def _serve(self):
        timer = threading.Timer(self.lifetime_s, self._server.shutdown)  # stops by itself
        timer.daemon = True
        timer.start()
        try:
            self._server.serve_forever(poll_interval=0.1)
        finally:
            timer.cancel()

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    # -- one request ------------------------------------------------------------------------------------------

    def _decide(self, identity: str) -> tuple[str | None, random.Random]:
        with self._lock:
            self.requests += 1
            seen = self._seen[identity]
            self._seen[identity] += 1
            digest = hashlib.sha256(f"{self.seed}\0{identity}\0{seen}".encode()).digest()
            rng = random.Random(int.from_bytes(digest[:8], "little"))
            kind = self.always
            if kind is None and self._streak[identity] < self.schedule.max_faults:
                draw, edge = rng.random(), 0.0
                for name in KINDS:
                    edge += getattr(self.schedule, name)
                    if draw < edge:
                        kind = name
                        break
            self._streak[identity] = self._streak[identity] + 1 if kind else 0
            if kind:
                self.faults[kind] += 1
            return kind, rng

    def _handle(self, sock: socket.socket) -> None:
        sock.settimeout(30)
        rfile = sock.makefile("rb")
        try:
            request_line = rfile.readline(65536).decode("latin-1").rstrip("\r\n")
            if not request_line:
                return
            method, target, _ = request_line.split(" ", 2)
            raw_headers = []
            while (line := rfile.readline(65536)) not in (b"\r\n", b"\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                raw_headers.append((name.strip(), value.strip()))
            headers = {k.lower(): v for k, v in raw_headers}
            kind, rng = self._decide(_identity(method, target, headers))
            if headers.get("expect", "").lower() == "100-continue":
                sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            chunked = "chunked" in headers.get("transfer-encoding", "").lower()
            length = int(headers.get("content-length", "0") or 0)
            if kind == "reset_request":
                rfile.read(rng.randrange(length) if length > 0 else 0)
                _reset(sock)
                return
            body = _read_chunked(rfile) if chunked else rfile.read(length)
            if kind in _ERRORS:
                status, reason, code, message = _ERRORS[kind]
                xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}'
                       f'</Message><RequestId>faultproxy</RequestId></Error>').encode()
                payload = b"" if method == "HEAD" else xml
                sock.sendall(f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\nContent-Length: "
                             f"{len(xml) if method != 'HEAD' else 0}\r\nConnection: close\r\n\r\n".encode() + payload)
                return
            head, payload = self._forward(method, target, raw_headers, body, chunked)
            if kind == "delay":
                time.sleep(self.schedule.delay_s)
            if kind in ("reset_response", "stall"):
                if payload:
                    sock.sendall(head + payload[: rng.randrange(len(payload))])
                if kind == "stall":
                    time.sleep(self.schedule.stall_s)
                _reset(sock)
                return
            sock.sendall(head + payload)
        except (OSError, ValueError):
            return  # the client went away (its own timeout or retry): nothing to answer
        finally:
            rfile.close()

    def _forward(self, method, target, raw_headers, body, chunked) -> tuple[bytes, bytes]:
        conn = http.client.HTTPConnection(*self.upstream, timeout=30)
        try:
            conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
            for name, value in raw_headers:
                if name.lower() not in _HOP_HEADERS:
                    conn.putheader(name, value)
            if chunked:
                conn.putheader("Transfer-Encoding", "chunked")
            conn.putheader("Connection", "close")
            conn.endheaders(body if body else None)
            response = conn.getresponse()
            payload = response.read()
            lines = [f"HTTP/1.1 {response.status} {response.reason}"]
            for name, value in response.getheaders():
                if name.lower() not in _HOP_HEADERS and name.lower() != "content-length":
                    lines.append(f"{name}: {value}")
            if method == "HEAD":
                lines.append(f"Content-Length: {response.getheader('Content-Length', '0')}")
            else:
                lines.append(f"Content-Length: {len(payload)}")
            lines.append("Connection: close")
            return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"), payload
        finally:
            conn.close()


def _read_chunked(rfile) -> bytes:
    """A chunked request body, kept chunked (it is forwarded as it came)."""
    out = bytearray()
    while True:
        size_line = rfile.readline(65536)
        out += size_line
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            while (trailer := rfile.readline(65536)) not in (b"\r\n", b"\n", b""):
                out += trailer
            out += b"\r\n"
            return bytes(out)
        out += rfile.read(size + 2)


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a dropped connection looks to the client."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
