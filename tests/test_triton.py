"""Triton: the PyTriton server (novic.serve.triton) and the exported model repository
(novic-export triton), both on Triton's own server binary from the nvidia-pytriton wheel, on
127.0.0.1 and free ports, called with tritonclient over HTTP and gRPC; answers equal
Classifier.classify."""
from __future__ import annotations

import io
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fixtures_runtime import classifier, runtime_bundle  # noqa: F401  (fixtures)

pytest.importorskip("pytriton")
http = pytest.importorskip("tritonclient.http")
grpc = pytest.importorskip("tritonclient.grpc")
skdata = pytest.importorskip("skimage.data")

from novic.serve.triton_env import STUB_ENV_VAR, TritonSetupError, numpy_major, stub_env_for  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
# bad images and the words of their errors; None: a truncated JPEG (made from a photo below)
BAD = [(b"not an image", "not an image file"), (b"", "empty data"), (None, "truncated or corrupt image data")]


@pytest.fixture(scope="module")
def stub_env():
    """The stub venv (scripts/triton-stub-venv.sh) where this environment has numpy 2."""
    if numpy_major() < 2:
        return None
    env = os.environ.get(STUB_ENV_VAR) or ROOT / ".triton-stub-venv"
    if not Path(env).is_dir():
        pytest.skip("numpy 2 here: create the Triton stub venv with bash scripts/triton-stub-venv.sh .triton-stub-venv")
    return stub_env_for(env)


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    out = []
    for name in PHOTOS:
        buffer = io.BytesIO()
        Image.fromarray(getattr(skdata, name)()).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def infer(client, module, images: list[bytes], topk: list[int] | None = None, model: str = "novic"):
    """One request with len(images) images -> (labels [[str]], probs [[float]], errors [str])."""
    inputs = [module.InferInput("image", [len(images), 1], "BYTES")]
    inputs[0].set_data_from_numpy(np.array(images, dtype=object).reshape(-1, 1))
    if topk is not None:
        inputs.append(module.InferInput("topk", [len(images), 1], "INT32"))
        inputs[1].set_data_from_numpy(np.array(topk, dtype=np.int32).reshape(-1, 1))
    result = client.infer(model, inputs)
    labels, probs = result.as_numpy("labels"), result.as_numpy("probs")
    errors = [e.decode() for e in result.as_numpy("error").reshape(-1)]
    return ([[t.decode() for t in row if t] for row in labels], [[float(p) for p in row] for row in probs], errors)


def expected(classifier, images, topk=5):  # noqa: F811
    return [([l.text for l in r.labels], [float(np.float32(l.prob)) for l in r.labels])
            for r in classifier.classify(images, topk=topk)]


def check_parity(client, module, classifier, photos):  # noqa: F811
    want = expected(classifier, photos)
    for photo, (texts, probs) in zip(photos, want):          # one image per request
        got_labels, got_probs, errors = infer(client, module, [photo])
        assert errors == [""]
        assert got_labels == [texts] and got_probs[0][:len(probs)] == probs
    got_labels, got_probs, errors = infer(client, module, photos, topk=[5, 3, 1, 5])   # one request, 4 images
    assert errors == [""] * 4
    assert got_labels == [want[0][0], want[1][0][:3], want[2][0][:1], want[3][0]]
    assert got_probs[1][:3] == want[1][1][:3] and got_probs[1][3:] == [0.0, 0.0]   # padding of a shorter row


def wait_ready(client, model: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if client.is_model_ready(model):
                return
        except Exception:  # noqa: BLE001 - not listening yet
            pass
        time.sleep(0.5)
    raise TimeoutError(f"Triton model {model} not ready in {seconds} s")


# ---- PyTriton ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pytriton_server(runtime_bundle, stub_env, tmp_path_factory):  # noqa: F811
    from novic.serve.triton import start

    http_port, grpc_port, metrics_port = free_ports(3)
    log = tmp_path_factory.mktemp("pytriton") / "tritonserver.log"
    with start(runtime_bundle.bundle, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
               backend="ort-cpu", threads=2, stub_env=stub_env, max_batch=16, max_wait_ms=2,
               log_file=log) as server:
        yield server


def test_pytriton_http_and_grpc_answer_like_the_classifier(pytriton_server, classifier, photos):  # noqa: F811
    with http.InferenceServerClient(pytriton_server.http_url) as client:
        check_parity(client, http, classifier, photos)
        config = client.get_model_config("novic")
        assert config["max_batch_size"] == 16 and config["dynamic_batching"]["max_queue_delay_microseconds"] == 2000
    with grpc.InferenceServerClient(pytriton_server.grpc_url) as client:
        check_parity(client, grpc, classifier, photos)


def test_pytriton_200_concurrent_requests_with_bad_images(pytriton_server, classifier, photos):  # noqa: F811
    bad = [(b if b is not None else photos[1][: len(photos[1]) // 3], words) for b, words in BAD]
    is_bad = lambda i: i % 25 == 7                                   # noqa: E731 - 8 of 200
    jobs = [bad[i // 25 % len(bad)][0] if is_bad(i) else photos[i % len(photos)] for i in range(200)]
    want = expected(classifier, photos)
    grpc_client = grpc.InferenceServerClient(pytriton_server.grpc_url)   # thread-safe, one channel

    def one(i):
        # tritonclient's HTTP client is one connection: a client per call keeps the requests concurrent
        if i % 2:
            with http.InferenceServerClient(pytriton_server.http_url) as client:
                return infer(client, http, [jobs[i]])
        return infer(grpc_client, grpc, [jobs[i]])

    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(one, range(200)))
    grpc_client.close()
    for i, (labels, probs, errors) in enumerate(answers):
        if is_bad(i):
            words = bad[i // 25 % len(bad)][1]
            assert errors[0].startswith("image 0: ") and words in errors[0] and "\n" not in errors[0], errors[0]
            assert labels == [[]] and probs[0] == [0.0] * 5
        else:
            assert errors == [""] and labels == [want[i % len(photos)][0]]
    assert sum(map(is_bad, range(200))) == 8


def test_pytriton_topk_out_of_range_is_an_error_of_that_image(pytriton_server, photos):
    with http.InferenceServerClient(pytriton_server.http_url) as client:
        labels, _, errors = infer(client, http, photos[:2], topk=[0, 2])
    assert errors[0] == "image 0: topk 0 is out of range; use 1 to 10" and errors[1] == ""
    assert labels[0] == [] and len(labels[1]) == 2


def test_stub_environment_errors_say_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.delenv(STUB_ENV_VAR, raising=False)
    if numpy_major() >= 2:
        with pytest.raises(TritonSetupError, match="numpy 2.*triton-stub-venv.sh"):
            stub_env_for(None)
    with pytest.raises(TritonSetupError, match="no bin/python3 in this stub environment"):
        stub_env_for(tmp_path)


def test_a_busy_port_is_one_line_at_once(runtime_bundle, stub_env):  # noqa: F811
    from novic.serve.triton import start

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(TritonSetupError, match=f"gRPC port {port} on 127.0.0.1 is not free"):
            with start(runtime_bundle.bundle, http_port=free_ports(1)[0], grpc_port=port, stub_env=stub_env):
                pass


# ---- the exported repository ---------------------------------------------------------------------
def parse_config(path: Path):
    """config.pbtxt through Triton's own schema (the ModelConfig protobuf tritonclient ships)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_repository_configs_parse_with_tritons_schema(runtime_bundle, tmp_path):  # noqa: F811
    from tritonclient.grpc import model_config_pb2 as pb

    from novic.serve.triton_repo import export_triton_repo

    out = export_triton_repo(runtime_bundle.bundle, tmp_path / "repo", target="gpu", max_batch=8, instances=2)
    repo = Path(out["path"])
    enc = parse_config(repo / "novic_image_encoder" / "config.pbtxt")
    assert (enc.backend, enc.max_batch_size, enc.dynamic_batching.max_queue_delay_microseconds) == ("onnxruntime", 8, 2000)
    assert [(g.count, g.kind) for g in enc.instance_group] == [(2, pb.ModelInstanceGroup.KIND_GPU)]
    assert list(enc.input[0].dims) == [3, 64, 64] and list(enc.output[0].dims) == [32]
    novic = parse_config(repo / "novic" / "config.pbtxt")
    assert novic.backend == "python" and novic.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU
    assert [(t.name, t.data_type) for t in novic.output] == [
        ("labels", pb.TYPE_STRING), ("probs", pb.TYPE_FP32), ("error", pb.TYPE_STRING)]
    assert novic.input[1].optional and novic.parameters["decoder_provider"].string_value == "cuda"
    # the tiny bundle has fp32 graphs only: a GPU repository falls back to them
    assert novic.parameters["decoder_precision"].string_value == "fp32"
    assert (repo / "novic" / "1" / "bundle" / "manifest.json").is_file()


@pytest.fixture(scope="module")
def repo_server(runtime_bundle, stub_env, tmp_path_factory):  # noqa: F811
    """The bundled tritonserver on two repositories: the default one and --encoder-backend python."""
    from novic.serve.triton_env import bundled_tritonserver
    from novic.serve.triton_repo import export_triton_repo

    root = tmp_path_factory.mktemp("triton_repo")
    for name, backend in (("ort", "onnxruntime"), ("py", "python")):
        export_triton_repo(runtime_bundle.bundle, root / name, encoder_backend=backend)
    # one server, two repositories: models must have distinct names, so the python-encoder
    # repository is served by a second server
    servers = {}
    try:
        for name in ("ort", "py"):
            ports = free_ports(3)
            with open(root / f"{name}.log", "wb") as log:
                proc = bundled_tritonserver(root / name, root / f"work-{name}", stub_env=stub_env,
                                            http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2],
                                            extra_args=("--exit-on-error=false",), log=log)
            servers[name] = (proc, f"127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[1]}")
        for name, (_, url, _) in servers.items():
            with http.InferenceServerClient(url) as client:
                wait_ready(client, "novic")
        yield servers
    finally:
        for proc, _, _ in servers.values():
            proc.terminate()
        for proc, _, _ in servers.values():
            try:
                proc.wait(30)
            except Exception:  # noqa: BLE001
                proc.kill()


def test_repository_loads_in_triton_except_for_the_missing_onnxruntime_backend(repo_server):
    # The wheel's server ships only the Python backend: the encoder's config is read and accepted,
    # then its backend library is not found; the novic model itself loads.
    with http.InferenceServerClient(repo_server["ort"][1]) as client:
        index = {m["name"]: m for m in client.get_model_repository_index()}
    assert index["novic"]["state"] == "READY"
    assert index["novic_image_encoder"]["state"] == "UNAVAILABLE"
    assert "unable to find backend library for backend 'onnxruntime'" in index["novic_image_encoder"]["reason"]


def test_repository_with_python_encoder_answers_like_the_classifier(repo_server, classifier, photos):  # noqa: F811
    _, http_url, grpc_url = repo_server["py"]
    with http.InferenceServerClient(http_url) as client:
        check_parity(client, http, classifier, photos)
        labels, _, errors = infer(client, http, [b"not an image", photos[0]])
        assert errors[0].startswith("image 0: ") and "not an image file" in errors[0] and errors[1] == ""
        assert labels[0] == [] and labels[1] == expected(classifier, photos[:1])[0][0]
    with grpc.InferenceServerClient(grpc_url) as client:
        check_parity(client, grpc, classifier, photos)


def test_export_refuses_to_overwrite(runtime_bundle, tmp_path):  # noqa: F811
    from novic.serve.triton_repo import TritonRepoError, export_triton_repo

    export_triton_repo(runtime_bundle.bundle, tmp_path / "repo")
    with pytest.raises(TritonRepoError, match="pass --force to replace it"):
        export_triton_repo(runtime_bundle.bundle, tmp_path / "repo")
    export_triton_repo(runtime_bundle.bundle, tmp_path / "repo", force=True, topk=3)
    assert 'key: "topk" value: { string_value: "3" }' in (tmp_path / "repo" / "novic" / "config.pbtxt").read_text()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(TritonRepoError, match="not a novic Triton repository"):
        export_triton_repo(runtime_bundle.bundle, tmp_path / "other", force=True)
    with pytest.raises(TritonRepoError, match="exceeds the bundle's beam width 10"):
        export_triton_repo(runtime_bundle.bundle, tmp_path / "x", topk=11)
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".*partial*"))


def test_export_and_serve_modules_need_no_torch(runtime_bundle, tmp_path):  # noqa: F811
    from test_torch_free import run_without_torch

    result = run_without_torch(f"""
        import sys
        import novic.serve.triton, novic.serve.triton_requests
        from novic.cli.export import app
        from typer.testing import CliRunner
        r = CliRunner().invoke(app, ["triton", {str(runtime_bundle.bundle)!r}, "--out", {str(tmp_path / 'repo')!r}])
        assert r.exit_code == 0, r.output
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "open_clip", "onnx"))
        assert not leaked, leaked
        print("ok")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")
    assert (tmp_path / "repo" / "novic_image_encoder" / "1" / "model.onnx").is_file()
