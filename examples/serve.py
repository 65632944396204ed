"""A minimal HTTP service around novic (Python's standard library + novic, nothing else).

    python examples/serve.py BUNDLE [--port 8080] [--backend auto] [--fast-decode]
    curl --data-binary @photo.jpg 'http://127.0.0.1:8080/classify?topk=3'
    curl http://127.0.0.1:8080/healthz           # /health too

POST /classify takes the image file's bytes as the body and answers with the labels as JSON
(`Result.to_dict()`). Query options, as novic-serve takes them (novic.serve.http_options): topk
(labels per image), beam_width, guided, temperature, alpha, vocab ('dog,cat'), granularity (fine,
basic or coarse: labels rolled up the bundle's noun hierarchy, docs/labels.md); any other is a 400
that names the known ones. Each request is served in its own thread and the
requests are classified in batches (`novic.Batcher`), which is what makes a GPU worth it.
Statuses: 200 labels; 400 a bad query or Content-Length; 408 a request that did not arrive in
time; 413 a body over MAX_BYTES (novic-serve's default); 422 an image that cannot be read; 503 the service cannot classify
(closed, a backend error, or MAX_CONNECTIONS already open). The body says why in one line.

Bounds, so that slow or hostile clients cannot exhaust the machine: every read waits at most
READ_TIMEOUT (an idle or half-sent request is dropped) and a body must arrive within BODY_SECONDS;
at most MAX_CONNECTIONS connections are served at once (the next ones get 503 at once, not a
thread); images being decoded together hold at most DECODE_PIXELS pixels (a few huge images wait
for each other instead of all being decoded at once). A body over MAX_BYTES is answered 413 from
its Content-Length before it is read, and the rest is discarded for a moment so that the client
reads the 413 rather than a reset. A client that leaves early is not an error: nothing is logged.
A client trickling a byte per READ_TIMEOUT through its headers is bounded only by MAX_CONNECTIONS:
put a reverse proxy in front of a service on an open network.
"""
from __future__ import annotations

import argparse
import io
import json
import socket
import sys
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from novic import Batcher, Classifier
from novic.errors import NovicError
from novic.runtime.request_options import check_request
from novic.serve.http_options import MAX_BYTES, content_length, request_options, too_large

READ_TIMEOUT = 10.0           # seconds one read of the socket may wait (headers, body, idle)
BODY_SECONDS = 60.0           # seconds the whole body may take
DRAIN_SECONDS = 2.0           # after a 413: how long the unread body is discarded before closing
MAX_CONNECTIONS = 64          # connections served at once (one thread each)
DECODE_PIXELS = 180_000_000   # pixels decoded at once, all requests together (~0.5 GB as RGB);
                              # Pillow refuses single images over ~179 M pixels anyway


class PixelBudget:
    """Lets decodes run together while their pixels add up to at most `limit`; an image as large
    as the whole budget waits until it can be decoded alone."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self._changed = threading.Condition()

    @contextmanager
    def hold(self, pixels: int):
        pixels = min(pixels, self.limit)
        with self._changed:
            self._changed.wait_for(lambda: self.used + pixels <= self.limit)
            self.used += pixels
        try:
            yield
        finally:
            with self._changed:
                self.used -= pixels
                self._changed.notify_all()


def image_pixels(data: bytes) -> int:
    """Width x height from the image's header (nothing is decoded); 0 if it cannot be read (the
    classifier then says why)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.width * image.height
    except Exception:  # noqa: BLE001 - an unreadable image is answered 422 by the classifier
        return 0


class _Refused(Exception):
    """A request answered before its body was read: (status, one-line reason)."""


class BoundedServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with a cap on connections served at once, and no traceback for a
    client that left or was too slow."""

    def __init__(self, address, handler, max_connections: int):
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(max_connections)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):   # full: answer here, in the accepting thread
            body = json.dumps({"error": "too many connections; retry shortly"}).encode()
            try:
                request.settimeout(1.0)
                request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                                % (len(body), body))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:   # no thread started: give the slot back
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return   # the client left (reset, broken pipe) or stalled: nothing to report
        super().handle_error(request, client_address)


def make_server(batcher: Batcher, host: str = "127.0.0.1", port: int = 8080) -> ThreadingHTTPServer:
    """An HTTP server (not yet serving) that classifies with `batcher`; port 0 picks a free one."""
    budget = PixelBudget(DECODE_PIXELS)

    class Handler(BaseHTTPRequestHandler):
        timeout = READ_TIMEOUT   # socket timeout of every read and write on this connection

        def _reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if urlparse(self.path).path not in ("/healthz", "/health"):   # /healthz as novic-serve
                return self._reply(404, {"error": "use POST /classify or GET /healthz"})
            self._reply(200, {"ok": True, "classifier": batcher.classifier.describe()})

        def do_POST(self):
            url = urlparse(self.path)
            if url.path != "/classify":
                return self._reply(404, {"error": "use POST /classify or GET /healthz"})
            try:
                options, body = self._read_request(url)
            except _Refused as refused:
                self.close_connection = True   # the body stays unread
                status, reason = refused.args
                self._reply(status, {"error": reason})
                if status != 408:   # a body that was not read (408: the client stalled on it)
                    self._discard_body()
                return
            try:
                with budget.hold(image_pixels(body)):
                    result = batcher.classify_one(body, **options)
            except Exception as exc:  # noqa: BLE001 - closed, or a backend failure: not the client's
                return self._reply(503, {"error": " ".join(str(exc).split()) or type(exc).__name__})
            self._reply(200 if result.ok else 422, result.to_dict())

        def _read_request(self, url) -> tuple[dict, bytes]:
            """-> (options of Batcher.classify_one, body), or _Refused(status, reason) for the
            client's mistakes."""
            try:
                size = content_length(self.headers.get("Content-Length")) or 0
                # no server-side roll-up lists here: granularity is a level (a client never names a file)
                options = request_options(parse_qs(url.query, keep_blank_values=True), {}, from_query=True)
                if not batcher.classifier.closed:   # closed is the service's fault (503, below)
                    check_request(batcher.classifier, **options)
            except NovicError as exc:   # RequestError, and a bundle without a hierarchy too
                raise _Refused(400, str(exc)) from None
            if size > MAX_BYTES:
                raise _Refused(413, too_large(MAX_BYTES, size))
            return options, self._read_body(size)

        def _read_body(self, size: int) -> bytes:
            chunks, got, deadline = [], 0, time.monotonic() + BODY_SECONDS
            try:
                while got < size and time.monotonic() < deadline:
                    chunk = self.rfile.read1(min(size - got, 1 << 20))
                    if not chunk:
                        break   # the client closed its side early
                    chunks.append(chunk)
                    got += len(chunk)
            except TimeoutError:
                pass
            if got < size:
                raise _Refused(408, f"the body ended after {got} of the {size} bytes that Content-Length "
                                    f"announced (or took longer than {BODY_SECONDS:g} s)")
            return b"".join(chunks)

        def _discard_body(self) -> None:
            """After an early reply: read and drop what the client still sends, for a moment, so
            that closing does not reset the connection before the client has read the reply."""
            self.wfile.flush()
            try:
                self.connection.shutdown(socket.SHUT_WR)   # the reply is complete
                self.connection.settimeout(DRAIN_SECONDS)
                deadline = time.monotonic() + DRAIN_SECONDS
                while time.monotonic() < deadline and self.connection.recv(1 << 20):
                    pass
            except OSError:
                pass

        def log_message(self, *args):   # quiet: a service logs its own way
            pass

    return BoundedServer((host, port), Handler, MAX_CONNECTIONS)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--fast-decode", action="store_true")
    a = ap.parse_args()
    try:
        clf = Classifier.load(a.bundle, backend=a.backend, fast_decode=a.fast_decode, verbose=True)
    except (NovicError, OSError) as exc:   # a missing or damaged bundle, an unusable backend: one line
        sys.exit(f"error: {' '.join(str(exc).split())}")
    with clf, Batcher(clf) as batcher:
        try:
            server = make_server(batcher, a.host, a.port)
        except OSError as exc:   # e.g. the port is taken
            sys.exit(f"error: cannot listen on {a.host}:{a.port}: {exc.strerror or exc}; pick another --port")
        print(f"serving on http://{a.host}:{server.server_port}/classify (Ctrl-C stops)")
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()


if __name__ == "__main__":
    main()
