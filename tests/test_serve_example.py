"""examples/serve.py: the HTTP service around Batcher answers on 127.0.0.1 as its docstring says."""
from __future__ import annotations

import importlib.util
import io
import json
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from fixtures_runtime import classifier, runtime_bundle  # noqa: F401  (fixtures)
from novic.runtime.batching import Batcher

skdata = pytest.importorskip("skimage.data")


def load_example():
    path = Path(__file__).resolve().parents[1] / "examples" / "serve.py"
    spec = importlib.util.spec_from_file_location("novic_serve_example", path)
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
            status, body = call(f"{base}/classify", b"not an image")
            assert status == 422 and "not an image file" in body["error"]
            status, body = call(f"{base}/classify?topk=zero", jpeg)
            assert status == 400 and "invalid literal" in body["error"]
            status, body = call(f"{base}/classify?topk=0", jpeg)
            assert status == 400 and "topk" in body["error"]
            monkeypatch.setattr(serve, "MAX_BYTES", 100)
            status, body = call(f"{base}/classify", b"x" * 200)    # small: the client sends it all
            assert status == 413 and "exceeds" in body["error"]
            status, body = call(f"{base}/health")
            assert status == 200 and body["ok"] and "ort-cpu" in body["classifier"]
            assert call(f"{base}/other")[0] == 404
            request = urllib.request.Request(f"{base}/classify", data=b"", headers={"Content-Length": "x"})
            status, body = call(request)
            assert status == 400 and "invalid literal" in body["error"]
            monkeypatch.setattr(batcher, "classify_one", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("GPU lost")))
            status, body = call(f"{base}/classify", b"x" * 10)   # the service's fault, not the client's
            assert (status, body) == (503, {"error": "GPU lost"})
        finally:
            server.shutdown()
            server.server_close()
