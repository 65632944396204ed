"""examples/serve.py: the HTTP service around Batcher answers on 127.0.0.1 as its docstring says."""
from __future__ import annotations

import importlib.util
import io
import json
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from fixtures_runtime import classifier, runtime_bundle  # noqa: F401  (fixtures)
from novic.runtime.batching import Batcher

skdata = pytest.importorskip("skimage.data")


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "serve.py"


def load_example():
    spec = importlib.util.spec_from_file_location("novic_serve_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def call(url, data=None):
    """-> (status, JSON body) of a GET (data None) or a POST; `url` may be a ready Request."""
    request = url if isinstance(url, urllib.request.Request) else urllib.request.Request(url, data=data)
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_http_service_classifies_and_says_what_is_wrong(classifier, monkeypatch):  # noqa: F811
    serve = load_example()
    buffer = io.BytesIO()
    Image.fromarray(skdata.chelsea()).save(buffer, "JPEG", quality=90)
    jpeg = buffer.getvalue()
    with Batcher(classifier, max_wait_ms=0) as batcher:
        server = serve.make_server(batcher, port=0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{server.server_port}"
        try:
            status, body = call(f"{base}/classify?topk=3", jpeg)
            assert status == 200 and body["error"] is None
            assert [l["text"] for l in body["labels"]] == [l.text for l in classifier.classify_one(jpeg, topk=3).labels]
            if classifier.bundle.has_hierarchy:
                status, body = call(f"{base}/classify?topk=3&granularity=coarse", jpeg)
                want = classifier.classify_one(jpeg, topk=3, granularity="coarse")
                assert status == 200 and [(l["text"], l["fine"], l["path"]) for l in body["labels"]] == \
                    [(l.text, l.fine, list(l.path)) for l in want.labels]
            status, body = call(f"{base}/classify?granularity=/etc/passwd", jpeg)
            assert (status, body) == (400, {"error": "granularity: '/etc/passwd' is not one of fine, basic, coarse"})
            status, body = call(f"{base}/classify", b"not an image")
            assert status == 422 and "not an image file" in body["error"]
            status, body = call(f"{base}/classify?topk=zero", jpeg)
            assert (status, body) == (400, {"error": "topk: 'zero' is not an integer"})
            status, body = call(f"{base}/classify?tokp=3", jpeg)   # a typo is refused, not ignored
            assert (status, body) == (400, {"error": "unknown option 'tokp'; use topk, beam_width, guided, "
                                                     "temperature, alpha, vocab, granularity"})
            status, body = call(f"{base}/classify?vocab=rocket,sky&beam_width=4&topk=2", jpeg)   # as novic-serve
            assert status == 200 and sorted(l["text"] for l in body["labels"]) == ["rocket", "sky"], body
            status, body = call(f"{base}/classify?topk=0", jpeg)
            assert status == 400 and "topk" in body["error"]
            monkeypatch.setattr(serve, "MAX_BYTES", 100)
            status, body = call(f"{base}/classify", b"x" * 200)    # small: the client sends it all
            assert status == 413 and "exceeds" in body["error"]
            for path in ("/healthz", "/health"):   # /healthz as novic-serve answers it; /health kept
                status, body = call(f"{base}{path}")
                assert status == 200 and body["ok"] and "ort-cpu" in body["classifier"]
            assert call(f"{base}/other")[0] == 404
            request = urllib.request.Request(f"{base}/classify", data=b"", headers={"Content-Length": "x"})
            status, body = call(request)
            assert (status, body) == (400, {"error": "Content-Length must be a number of bytes, got 'x'"})
            monkeypatch.setattr(batcher, "classify_one", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("GPU lost")))
            status, body = call(f"{base}/classify", b"x" * 10)   # the service's fault, not the client's
            assert (status, body) == (503, {"error": "GPU lost"})
        finally:
            server.shutdown()
            server.server_close()


def test_the_example_shares_novic_serve_s_request_rules_without_importing_ray():
    from novic.serve import http_options

    assert load_example().MAX_BYTES == http_options.MAX_BYTES
    code = textwrap.dedent(f"""
        import importlib.util, sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "ray":
                    raise ModuleNotFoundError(f"No module named {{name!r}} (blocked in this test)", name=name)
        sys.meta_path.insert(0, Block())
        spec = importlib.util.spec_from_file_location("example", {str(EXAMPLE)!r})
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


# ---- faults under load (each reproduced on 127.0.0.1 with small limits, each bounded in time) ----
@pytest.fixture
def service(classifier, monkeypatch):  # noqa: F811
    """-> start(**limits): the example serving `classifier` on a free port with the given module
    limits (READ_TIMEOUT=..., MAX_CONNECTIONS=...), as (module, batcher, port)."""
    serve = load_example()
    running = []

    def start(**limits):
        for name, value in limits.items():
            monkeypatch.setattr(serve, name, value)
        batcher = Batcher(classifier, max_wait_ms=0)
        server = serve.make_server(batcher, port=0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        running.append((server, batcher))
        return serve, batcher, server.server_port

    yield start
    for server, batcher in running:
        server.shutdown()
        server.server_close()
        batcher.close()


def raw_request(port, head: bytes, body: bytes = b"", timeout: float = 10.0) -> bytes:
    """Send `head` + `body` on a plain socket and read the reply until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head + body)
        return read_all(sock)


def read_all(sock) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def status_and_body(reply: bytes) -> tuple[int, dict]:
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def png_bytes(size=64) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(skdata.chelsea()).resize((size, size)).save(buffer, "PNG")
    return buffer.getvalue()


def test_a_body_shorter_than_its_content_length_gets_408_not_a_hang(service):
    serve, _, port = service(READ_TIMEOUT=0.5, BODY_SECONDS=2.0)
    reply = raw_request(port, b"POST /classify HTTP/1.0\r\nContent-Length: 1000\r\n\r\n", b"x" * 10)
    assert status_and_body(reply) == (408, {"error": "the body ended after 10 of the 1000 bytes that "
                                                     "Content-Length announced (or took longer than 2 s)"})


def test_a_client_that_leaves_leaves_no_traceback(service, capfd):
    serve, batcher, port = service()
    inside, classify_one = threading.Event(), batcher.classify_one

    def slow_classify(*args, **kwargs):
        inside.set()
        time.sleep(0.5)   # the client resets the connection meanwhile
        return classify_one(*args, **kwargs)

    batcher.classify_one = slow_classify
    data = png_bytes()
    for _ in range(3):
        inside.clear()
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"POST /classify HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
        assert inside.wait(10)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))   # close = reset
        sock.close()
    time.sleep(1.0)   # the server writes its replies into the reset connections
    batcher.classify_one = classify_one
    assert call(f"http://127.0.0.1:{port}/classify", data)[0] == 200   # still serving
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Error" not in err, err


def test_half_sent_requests_hold_a_bounded_number_of_threads_for_a_bounded_time(service):
    serve, _, port = service(READ_TIMEOUT=1.0, MAX_CONNECTIONS=4)
    base = threading.active_count()
    held = []
    for _ in range(4):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"POST /classify HTTP/1.0\r\nContent-Le")   # and then nothing
        held.append(sock)
    deadline = time.monotonic() + 5
    while threading.active_count() < base + 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    for _ in range(20):   # over the cap: refused at once, no thread
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            status, body = status_and_body(read_all(sock))
            assert status == 503 and "too many connections" in body["error"]
        assert threading.active_count() <= base + 4
    t0 = time.monotonic()
    for sock in held:   # dropped by the server after READ_TIMEOUT
        assert read_all(sock) == b""
        sock.close()
    assert time.monotonic() - t0 < 5
    assert call(f"http://127.0.0.1:{port}/classify", png_bytes())[0] == 200   # the slots came back


def test_a_body_over_the_limit_is_answered_413_and_the_client_reads_it(service):
    serve, _, port = service(MAX_BYTES=1 << 10)
    size = 32 << 20   # far more than the socket buffers hold: the client is still sending at the 413
    reply = raw_request(port, b"POST /classify HTTP/1.0\r\nContent-Length: %d\r\n\r\n" % size, bytes(size))
    assert status_and_body(reply) == (413, {"error": f"body of {size} bytes exceeds the limit of 1024 bytes"})


def test_large_images_are_not_all_decoded_at_once(service, classifier):  # noqa: F811
    serve, _, port = service(DECODE_PIXELS=2 * 64 * 64)   # room for two 64x64 images at a time
    load_batch, lock, now, most = classifier.preprocessor.load_batch, threading.Lock(), [0], [0]

    def counting_load_batch(sources):
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
        time.sleep(0.2)
        try:
            return load_batch(sources)
        finally:
            with lock:
                now[0] -= 1

    classifier.preprocessor.load_batch = counting_load_batch
    try:
        data, statuses = png_bytes(64), []
        clients = [threading.Thread(target=lambda: statuses.append(call(f"http://127.0.0.1:{port}/classify", data)[0]))
                   for _ in range(6)]
        for c in clients:
            c.start()
        for c in clients:
            c.join(30)
    finally:
        del classifier.preprocessor.load_batch
    assert statuses == [200] * 6 and most[0] == 2


def test_a_missing_bundle_is_one_line():
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "examples" / "serve.py"
    out = subprocess.run([sys.executable, str(script), "/nonexistent/bundle", "--port", "0"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith("error: /nonexistent/bundle") and out.stderr.count("\n") == 1, out.stderr
