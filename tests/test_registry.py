"""Model registry, downloads and the model cache, against a local HTTP server on 127.0.0.1.

The server supports HTTP Range, can drop the connection mid-file, serve corrupted bytes, or be
down. End to end: a synthetic release zip (original .train format, tiny decoder) and a synthetic
open_clip weights file (the tiny CLIP config) served locally -> ensure_bundle -> classify.
"""
from __future__ import annotations

import hashlib
import http.server
import io
import json
import re
import threading
import zipfile
from pathlib import Path

import pytest

from novic import registry
from novic.registry import DownloadError, NotFoundError, download

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


class FileServer:
    """Serves `files` {url path: bytes}; `drop_once` {path: byte count} closes the connection after
    that many bytes the first time the path is requested; records (path, Range header) per GET."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.drop_once: dict[str, int] = {}
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                data = server.files.get(self.path)
                if data is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = 0
                if rng:
                    m = re.match(r"bytes=(\d+)-$", rng)
                    start = int(m.group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                cut = server.drop_once.pop(self.path, None)
                if cut is not None:
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)   # drop mid-file
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FileServer()
    yield s
    s.stop()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("NOVIC_CACHE", str(root))
    return root


def payload(n=300_000, seed=0) -> bytes:
    import random
    return random.Random(seed).randbytes(n)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- download ----------------------------------------------------------------------------------------------
def test_download_with_progress_and_recorded_hash(server, cache):
    from rich.console import Console

    data = payload()
    server.files["/r/model.zip"] = data
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    dest = cache / "downloads" / "model.zip"
    got = download(server.url("/r/model.zip"), dest, what="test model", progress=True, console=console)
    assert got == dest and dest.read_bytes() == data
    assert not dest.with_name("model.zip.part").exists()
    text = out.getvalue()
    assert "test model" in text and "/s" in text          # rate column (and size/ETA columns)
    rec = json.loads((cache / "hashes.json").read_text())["model.zip"]
    assert rec["sha256"] == sha(data) and rec["size"] == len(data)
    # a second call finds the file (verified against the recorded hash): no request
    n = len(server.requests)
    download(server.url("/r/model.zip"), dest, progress=False)
    assert len(server.requests) == n


def test_truncated_download_resumes(server, cache):
    data = payload(500_000, seed=1)
    server.files["/r/a.zip"] = data
    server.drop_once["/r/a.zip"] = 123_456
    dest = cache / "downloads" / "a.zip"
    # no retries: the run fails, keeps the partial file and says how to go on
    with pytest.raises(DownloadError, match="run again to resume"):
        download(server.url("/r/a.zip"), dest, retries=0, progress=False)
    part = dest.with_name("a.zip.part")
    assert part.is_file() and 0 < part.stat().st_size < len(data)
    assert not dest.exists()
    # the next run resumes with a Range request and completes
    have = part.stat().st_size
    download(server.url("/r/a.zip"), dest, sha256=sha(data), progress=False)
    assert dest.read_bytes() == data
    assert server.requests[-1] == ("/r/a.zip", f"bytes={have}-")


def test_dropped_connection_is_retried_within_one_call(server, cache):
    data = payload(400_000, seed=2)
    server.files["/r/b.zip"] = data
    server.drop_once["/r/b.zip"] = 200_000
    dest = cache / "downloads" / "b.zip"
    download(server.url("/r/b.zip"), dest, sha256=sha(data), size=len(data), progress=False)
    assert dest.read_bytes() == data
    ranges = [r for p, r in server.requests if p == "/r/b.zip"]
    assert ranges[0] is None and ranges[1] is not None and int(ranges[1][6:-1]) > 0


def test_corrupted_download_is_detected(server, cache):
    data = payload(200_000, seed=3)
    bad = bytearray(data)
    bad[1000] ^= 0xFF
    server.files["/r/c.zip"] = bytes(bad)
    dest = cache / "downloads" / "c.zip"
    with pytest.raises(DownloadError, match="corrupted") as exc:
        download(server.url("/r/c.zip"), dest, sha256=sha(data), progress=False)
    assert "\n" not in str(exc.value)
    assert not dest.exists() and not dest.with_name("c.zip.part").exists()
    # wrong size announced by the server: refused before downloading
    with pytest.raises(DownloadError, match="expected"):
        download(server.url("/r/c.zip"), dest, size=len(data) + 1, progress=False)


def test_recorded_hash_catches_a_changed_file(server, cache):
    data = payload(100_000, seed=4)
    server.files["/r/d.zip"] = data
    dest = cache / "downloads" / "d.zip"
    download(server.url("/r/d.zip"), dest, progress=False)   # records size + sha256
    dest.unlink()
    server.files["/r/d.zip"] = data[:-1] + b"\x00"          # same size, different content
    with pytest.raises(DownloadError, match="corrupted"):
        download(server.url("/r/d.zip"), dest, progress=False)


def test_offline_and_missing_give_clear_errors(server, cache):
    url = server.url("/r/e.zip")
    with pytest.raises(NotFoundError, match="HTTP 404"):
        download(url, cache / "downloads" / "e.zip", progress=False)
    server.stop()
    with pytest.raises(DownloadError) as exc:
        download(url, cache / "downloads" / "e.zip", progress=False)
    msg = str(exc.value)
    assert "unreachable" in msg and "e.zip" in msg
    assert "--bundle" in msg and "novic-import" in msg and "\n" not in msg
    server.httpd = _Stopped()   # fixture teardown


class _Stopped:
    def shutdown(self):
        pass

    def server_close(self):
        pass


def test_ensure_bundle_offline_names_the_release(cache, monkeypatch):
    monkeypatch.setenv("NOVIC_RELEASE_BASE", "http://127.0.0.1:9/")   # discard port: nothing listens
    with pytest.raises(DownloadError) as exc:
        registry.ensure_bundle("ta4", progress=False)
    msg = str(exc.value)
    assert "vitb16_ft2_ta4_ovod_20240610_105233.zip" in msg and "--bundle" in msg and "novic-import" in msg


def test_offline_hint_commands_parse(tmp_path):
    """The commands the offline error suggests are accepted by novic-import and novic-export as written."""
    import shlex

    import typer

    from novic.cli import export as export_cli
    from novic.cli import importer as import_cli

    msg = registry.offline_hint("x", tmp_path / "x.zip")
    imp = shlex.split(re.search(r"(novic-import [^,;]*?) *, then", msg).group(1))
    exp = shlex.split(re.search(r"(novic-export onnx [^,;]*)", msg).group(1))
    typer.main.get_command(import_cli.app).make_context(imp[0], imp[1:])   # parses only: raises on a bad option
    params = typer.main.get_command(export_cli.app).commands["onnx"].make_context("onnx", exp[2:]).params
    assert params["checkpoint"] == Path(imp[imp.index("--out") + 1])


# --- registry -------------------------------------------------------------------------------------------
def test_registry_entries(monkeypatch):
    assert set(registry.MODELS) == {"ta4", "yb3", "ya2", "ye2"}
    ta4 = registry.get_model("ta4")
    assert ta4.url == ("https://github.com/pallgeuer/novic/releases/download/v1.0.0/"
                       "vitb16_ft2_ta4_ovod_20240610_105233.zip")
    assert (ta4.clip_hub, ta4.open_clip_name, ta4.embed_dim) == ("timm/ViT-B-16-SigLIP", "ViT-B-16-SigLIP", 768)
    assert registry.get_model("ye2").clip_hub == "apple/DFN5B-CLIP-ViT-H-14-378"
    assert registry.get_model("yb3").embed_dim == 1152
    monkeypatch.setenv("NOVIC_RELEASE_BASE", "http://mirror.example/novic")
    assert registry.get_model("ya2").url == "http://mirror.example/novic/dfn5bl_ft2_ya2_ovod_20240620_162925.zip"
    with pytest.raises(registry.RegistryError, match="ta4, yb3, ya2, ye2"):
        registry.get_model("xyz")


def test_cache_dir_override(monkeypatch, tmp_path):
    monkeypatch.setenv("NOVIC_CACHE", str(tmp_path / "c"))
    assert registry.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("NOVIC_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert registry.cache_dir() == Path.home() / ".cache" / "novic"


def test_registry_is_torch_free():
    import subprocess
    import sys

    code = ("import sys; import novic.registry, novic.cli.importer; "
            "assert 'torch' not in sys.modules and 'open_clip' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- end to end: synthetic release + CLIP weights -> bundle -> classification ------------------------------
@pytest.fixture(scope="module")
def synthetic_release(tmp_path_factory):
    """(zip bytes, nouns, CLIP weights bytes): a tiny original-format checkpoint for the tiny CLIP."""
    import open_clip
    import torch
    from safetensors.torch import save

    from novic.model import embedder as emb
    from test_importer import NOUNS, make_original

    tmp = tmp_path_factory.mktemp("release")
    path, _, _ = make_original(tmp, H=64, layers=2, heads=8, ffn=16, seed=7)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("vitb16_ft2_ta4_ovod_20240610_105233/README.md", "synthetic NOVIC release (test)")
        zf.write(path, "vitb16_ft2_ta4_ovod_20240610_105233/ovod_20240610_105233/" + path.name)
    emb._register_config("novic-tiny-clip.json")
    torch.manual_seed(123)
    clip = open_clip.create_model("novic-tiny-clip")
    weights = save({k: v.contiguous() for k, v in clip.state_dict().items()})
    return buf.getvalue(), NOUNS, weights


def test_ensure_bundle_end_to_end(server, cache, monkeypatch, synthetic_release, tmp_path):
    zip_bytes, nouns, weights = synthetic_release
    info = registry.get_model("ta4")
    server.files["/release/" + info.zip_name] = zip_bytes
    server.files["/hf/tiny-clip/open_clip_model.safetensors"] = weights
    server.drop_once["/release/" + info.zip_name] = len(zip_bytes) // 3     # resumed on the way
    monkeypatch.setenv("NOVIC_RELEASE_BASE", server.url("/release/"))
    monkeypatch.setenv("NOVIC_CLIP_WEIGHTS", server.url("/hf/tiny-clip/open_clip_model.safetensors"))

    bundle = registry.ensure_bundle("ta4", progress=False, engines=False)
    assert bundle == cache / "bundles" / "ta4" and (bundle / "manifest.json").is_file()
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["nouns"]["count"] == len(nouns)
    assert (cache / "downloads" / info.zip_name).read_bytes() == zip_bytes
    assert (cache / "checkpoints" / "ta4.safetensors").is_file()
    hashes = json.loads((cache / "hashes.json").read_text())
    assert hashes[info.zip_name]["sha256"] == sha(zip_bytes)
    assert any(r for p, r in server.requests if p.startswith("/release/") and r)   # a Range resume happened

    # later calls: the cache, without network
    server.stop()
    server.httpd = _Stopped()
    assert registry.ensure_bundle("ta4") == bundle
    rows = {r["id"]: r for r in registry.list_models()}
    assert rows["ta4"]["bundle"] == str(bundle) and rows["ta4"]["default"] and rows["yb3"]["bundle"] is None

    # the bundle classifies an image, torch-free runtime
    import numpy as np
    from PIL import Image

    from novic.runtime.classifier import Classifier

    img = Image.fromarray((np.random.default_rng(0).random((80, 96, 3)) * 255).astype("uint8"))
    clf = Classifier.load(bundle, backend="ort-cpu")
    try:
        [result] = clf.classify([img], topk=3)
    finally:
        clf.close()
    assert result.error is None and len(result.labels) == 3
    assert all(label.text in nouns for label in result.labels)

    # novic-run without --bundle uses the cached default model
    img_path = tmp_path / "photo.png"
    img.save(img_path)
    from typer.testing import CliRunner

    from novic.cli import run as run_cli

    res = CliRunner().invoke(run_cli.app, [str(img_path), "--json", "--quiet", "--backend", "ort-cpu", "-k", "3"])
    assert res.exit_code == 0, res.output
    line = json.loads([ln for ln in res.stdout.splitlines() if ln.startswith("{")][0])
    assert [lab["text"] for lab in line["labels"]] == [lab.text for lab in result.labels]


def test_models_cli_lists_registry_and_cache(cache, monkeypatch, capsys):
    from novic.cli import importer as cli

    (cache / "checkpoints").mkdir(parents=True)
    (cache / "checkpoints" / "ya2.safetensors").write_bytes(b"x")
    monkeypatch.setattr("sys.argv", ["novic-import", "models", "--json"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code in (0, None)
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["id"] for r in rows] == ["ta4", "yb3", "ya2", "ye2"]
    assert {r["id"]: r["checkpoint"] for r in rows} == {"ta4": False, "yb3": False, "ya2": True, "ye2": False}
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setattr("sys.argv", ["novic-import", "models"])
    with pytest.raises(SystemExit):
        cli.main()
    text = capsys.readouterr().out
    assert "timm/ViT-B-16-SigLIP" in text and "checkpoint" in text
