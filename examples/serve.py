"""A minimal HTTP service around novic (Python's standard library + novic, nothing else).

    python examples/serve.py BUNDLE [--port 8080] [--backend auto] [--fast-decode]
    curl --data-binary @photo.jpg 'http://127.0.0.1:8080/classify?topk=3'
    curl http://127.0.0.1:8080/health

POST /classify takes the image file's bytes as the body and answers with the labels as JSON
(`Result.to_dict()`); `?topk=N` sets how many. Each request is served in its own thread and the
requests are classified in batches (`novic.Batcher`), which is what makes a GPU worth it.
Statuses: 200 labels; 400 a bad query or Content-Length; 413 a body over MAX_BYTES; 422 an image
that cannot be read; 503 the service cannot classify (closed, or a backend error). The body says
why in one line.
"""
from __future__ import annotations

import argparse
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from novic import Batcher, Classifier
from novic.runtime.classifier import ClassifierError

MAX_BYTES = 64 << 20   # 64 MiB: larger bodies are refused before they are read


def make_server(batcher: Batcher, host: str = "127.0.0.1", port: int = 8080) -> ThreadingHTTPServer:
    """An HTTP server (not yet serving) that classifies with `batcher`; port 0 picks a free one."""

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if urlparse(self.path).path != "/health":
                return self._reply(404, {"error": "use POST /classify or GET /health"})
            self._reply(200, {"ok": True, "classifier": batcher.classifier.describe()})

        def do_POST(self):
            url = urlparse(self.path)
            if url.path != "/classify":
                return self._reply(404, {"error": "use POST /classify or GET /health"})
            try:   # the client's mistakes: 400
                size = int(self.headers.get("Content-Length") or 0)
                if size < 0:
                    raise ValueError(f"Content-Length {size} is negative")
                topk = int(parse_qs(url.query).get("topk", ["5"])[0])
                if not batcher.classifier.closed:   # closed is the service's fault (below)
                    batcher.classifier.check_options(topk=topk)
            except (ValueError, ClassifierError) as exc:
                self.close_connection = True   # the body stays unread
                return self._reply(400, {"error": str(exc)})
            if size > MAX_BYTES:
                self.close_connection = True
                return self._reply(413, {"error": f"body of {size} bytes exceeds {MAX_BYTES}"})
            try:
                result = batcher.classify_one(self.rfile.read(size), topk=topk)
            except Exception as exc:  # noqa: BLE001 - closed, or a backend failure: not the client's
                return self._reply(503, {"error": " ".join(str(exc).split()) or type(exc).__name__})
            self._reply(200 if result.ok else 422, result.to_dict())

        def log_message(self, *args):   # quiet: a service logs its own way
            pass

    return ThreadingHTTPServer((host, port), Handler)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--fast-decode", action="store_true")
    a = ap.parse_args()
    with Classifier.load(a.bundle, backend=a.backend, fast_decode=a.fast_decode, verbose=True) as clf, \
            Batcher(clf) as batcher:
        server = make_server(batcher, a.host, a.port)
        print(f"serving on http://{a.host}:{server.server_port}/classify (Ctrl-C stops)")
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()


if __name__ == "__main__":
    main()
