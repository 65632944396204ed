"""novic-serve on Ray Serve: status codes and labels under load from 16 clients, with a classifier
replica killed midway (every request answered, 200/4xx or 503; Serve replaces the replica)."""
from __future__ import annotations

import base64
import io
import json
import random
import socket
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from fixtures_ray import ray_cluster  # noqa: F401  (fixtures)
from fixtures_runtime import classifier, runtime_bundle  # noqa: F401  (fixtures)

pytestmark = pytest.mark.ray
pytest.importorskip("ray.serve")

from novic.serve.http_options import RequestError, request_options  # noqa: E402

REQUESTS, CLIENTS = 300, 16
KINGDOMS = "animal\nplant\nperson\nartifact\n"   # the server-side roll-up list "kingdoms"
MAX_BYTES = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service(ray_cluster, runtime_bundle, tmp_path_factory):  # noqa: F811
    from ray import serve as rserve

    from novic.serve.ray_serve import serve

    pets = tmp_path_factory.mktemp("vocab") / "pets.txt"
    pets.write_text("dog\ncat\nkitten\n")
    kingdoms = pets.parent / "kingdoms.txt"
    kingdoms.write_text(KINGDOMS)
    port = free_port()
    serve(runtime_bundle.bundle, port=port, replicas=2, cpus_per_replica=0.5, blocking=False, threads=1,
          max_batch=8, max_bytes=MAX_BYTES, request_timeout_s=30, vocabularies={"pets": str(pets)},
          rollups={"kingdoms": str(kingdoms)})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        rserve.shutdown()


def call(url, data=None, headers=None, timeout=60):
    """-> (status, JSON body); raises only if no answer came (a hang is a failure, not a status)."""
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def png(seed: int) -> bytes:
    pixels = (np.random.default_rng(seed).random((11, 13, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def labels(body) -> list[str]:
    return [l["text"] for l in body["labels"]]


def test_statuses_and_answers(service, classifier):  # noqa: F811
    image = png(1)
    want = classifier.classify_one(image, topk=3)
    status, body = call(f"{service}/classify?topk=3", image)
    assert (status, body) == (200, want.to_json())                      # what novic-run --json writes
    status, body = call(f"{service}/classify?vocab=pets&topk=2", image)   # a server-side vocabulary
    assert status == 200 and labels(body) == [l.text for l in classifier.classify_one(
        image, topk=2, vocab=["dog", "cat", "kitten"]).labels]
    inline = {"image": base64.b64encode(image).decode(), "topk": 2, "vocab": ["rocket", "coffee", "sky"]}
    status, body = call(f"{service}/classify", json.dumps(inline).encode(), {"Content-Type": "application/json"})
    assert status == 200 and labels(body) == [l.text for l in classifier.classify_one(
        image, topk=2, vocab=["rocket", "coffee", "sky"]).labels]
    for query, message in [("topk=0", "topk must be a positive integer"), ("topk=x", "topk: 'x' is not an integer"),
                           ("topk=12", "topk 12 exceeds beam_width 10"), ("colour=red", "unknown option 'colour'"),
                           ("guided=false&beam_width=50", "free decoding with beam width 50")]:
        status, body = call(f"{service}/classify?{query}", image)
        assert status == 400 and message in body["error"], (query, body)
    status, body = call(f"{service}/classify", json.dumps({**inline, "vocab": "nope"}).encode(),
                        {"Content-Type": "application/json"})
    assert status == 400 and "no server-side vocabulary named 'nope'" in body["error"]
    status, body = call(f"{service}/classify", b"not an image")
    assert status == 422 and "not an image file" in body["error"] and body["labels"] == []
    status, body = call(f"{service}/classify", b"x" * (MAX_BYTES + 1))
    assert status == 413 and "exceeds" in body["error"]
    status, body = call(f"{service}/healthz")
    assert status == 200 and "ort-cpu" in body["classifier"]
    assert call(f"{service}/other")[0] == 404


def test_granularity(service, classifier, runtime_bundle, tmp_path):  # noqa: F811
    """granularity=basic|coarse|a server-side list answers what Classifier.classify does (the record
    of novic-run --json, with fine and path), also when requests at different levels arrive together
    (the replicas batch them), a bad value is 400 with one line."""
    if not classifier.bundle.has_hierarchy:
        pytest.skip("the test bundle has no noun hierarchy (wordnet-base not installed)")
    (tmp_path / "kingdoms.txt").write_text(KINGDOMS)
    levels = [("basic", "basic"), ("coarse", "coarse"), ("kingdoms", str(tmp_path / "kingdoms.txt")),
              ("fine", "fine")] * 3
    images = [png(40 + i) for i in range(len(levels))]
    want = [classifier.classify_one(image, topk=3, granularity=level).to_json()
            for image, (_, level) in zip(images, levels)]
    with ThreadPoolExecutor(len(levels)) as pool:   # together: the replicas batch mixed levels
        got = list(pool.map(lambda i: call(f"{service}/classify?topk=3&granularity={levels[i][0]}", images[i]),
                            range(len(levels))))
    for (status, body), expected, (name, _) in zip(got, want, levels):
        assert status == 200, body
        assert [(l["text"], l.get("fine"), l.get("path")) for l in body["labels"]] == \
            [(l["text"], l.get("fine"), l.get("path")) for l in expected["labels"]], name
        assert [l["prob"] for l in body["labels"]] == pytest.approx([l["prob"] for l in expected["labels"]], rel=1e-4)
        assert body.keys() == expected.keys()
        assert all(("fine" in l) == (name != "fine") for l in body["labels"])
    assert any(l["text"] != l["fine"] for status, body in got for l in body["labels"] if "fine" in l)
    inline = {"image": base64.b64encode(images[0]).decode(), "topk": 3, "granularity": "coarse"}
    status, body = call(f"{service}/classify", json.dumps(inline).encode(), {"Content-Type": "application/json"})
    coarse = classifier.classify_one(images[0], topk=3, granularity="coarse")
    assert status == 200 and [(l["text"], l["fine"]) for l in body["labels"]] == \
        [(l.text, l.fine) for l in coarse.labels]
    for query, message in [("granularity=medium", "granularity: 'medium' is not one of fine, basic, coarse, "
                                                  "or a server-side roll-up (kingdoms)"),
                           ("granularity=/etc/passwd", "granularity: '/etc/passwd' is not one of"),
                           ("granularity=basic&granularity=coarse", "granularity: give it once")]:
        status, body = call(f"{service}/classify?{query}", images[0])
        assert status == 400 and message in body["error"] and "\n" not in body["error"], (query, body)
    status, body = call(f"{service}/classify", json.dumps({**inline, "granularity": ["dog"]}).encode(),
                        {"Content-Type": "application/json"})
    assert status == 400 and "granularity: ['dog'] is not one of" in body["error"]


def test_load_from_16_clients_with_a_replica_killed(service, classifier):  # noqa: F811
    import ray
    from ray import serve as rserve

    images = [png(seed) for seed in range(8)]
    serial = {i: labels({"labels": [l.to_dict() for l in classifier.classify_one(im, topk=2).labels]})
              for i, im in enumerate(images)}
    # (kind, url suffix, body) -> the statuses a healthy service gives; 503 is allowed for any request
    # in flight on the replica that is killed
    kinds = [("good", "?topk=2", None, 200), ("garbage", "", b"\x89PNG garbage", 422),
             ("empty", "", b"", 422), ("bad-option", "?topk=0", None, 400),
             ("bad-option", "?beam_width=many", None, 400)]
    rng = random.Random(0)
    plan = [(rng.choice(kinds), rng.randrange(len(images))) for _ in range(REQUESTS)]
    done = []

    def one(item):
        (kind, suffix, body, expected), index = item
        status, answer = call(f"{service}/classify{suffix}", images[index] if body is None else body, timeout=90)
        done.append(1)
        return kind, index, expected, status, answer

    replicas = [name["name"] for name in ray.util.list_named_actors(all_namespaces=True)
                if name["name"].startswith("SERVE_REPLICA::novic#NovicClassifier")]
    assert len(replicas) == 2
    with ThreadPoolExecutor(CLIENTS) as pool:
        futures = [pool.submit(one, item) for item in plan]
        deadline = time.monotonic() + 60
        while len(done) < REQUESTS // 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        ray.kill(ray.get_actor(replicas[0], namespace="serve"), no_restart=True)
        killed_at = len(done)
        results = [f.result(timeout=120) for f in futures]      # every request answered, none hangs
    unavailable = 0
    for kind, index, expected, status, answer in results:
        if status == 503:
            unavailable += 1
            assert "no classifier replica could answer" in answer["error"]
            continue
        assert status == expected, (kind, status, answer)
        if kind == "good":
            assert labels(answer) == serial[index]
    assert killed_at < REQUESTS - CLIENTS, "the replica was not killed during the load"
    assert unavailable <= CLIENTS      # at most the requests in flight when the replica died
    print(f"replica killed after {killed_at} answers; {unavailable} answered 503")
    # Serve replaces the dead replica: two running again, and the service answers
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        status = rserve.status().applications["novic"].deployments["NovicClassifier"]
        if status.replica_states.get("RUNNING", 0) == 2:
            break
        time.sleep(0.5)
    assert status.replica_states.get("RUNNING", 0) == 2, status
    assert call(f"{service}/classify?topk=2", images[0])[1]["labels"][0]["text"] == serial[0][0]


def test_request_options_parsing():
    vocabularies = {"pets": "/srv/pets.txt"}
    assert request_options({"topk": ["3"], "guided": ["false"], "alpha": ["0.5"]}, vocabularies, from_query=True) == \
        {"topk": 3, "guided": False, "alpha": 0.5}
    assert request_options({"vocab": ["pets"]}, vocabularies, from_query=True) == {"vocab": "/srv/pets.txt"}
    assert request_options({"vocab": ["dog", "cat"]}, vocabularies, from_query=True) == {"vocab": ["dog", "cat"]}
    assert request_options({"vocab": ["dog, cat,"]}, vocabularies, from_query=True) == {"vocab": ["dog", "cat"]}
    assert request_options({"vocab": ["dog"], "topk": 2}, vocabularies, from_query=False) == {"vocab": ["dog"], "topk": 2}
    for fields, from_query, message in [({"topk": ["1", "2"]}, True, "give it once"),
                                        ({"topk": True}, False, "topk: True is not an integer"),
                                        ({"guided": ["maybe"]}, True, "guided: 'maybe' is not true or false"),
                                        ({"vocab": "cats"}, False, "no server-side vocabulary named 'cats'"),
                                        # one query word is a name, not a one-noun vocabulary
                                        ({"vocab": ["pet"]}, True, "no server-side vocabulary named 'pet'"),
                                        ({"vocab": [" , "]}, True, "holds no nouns"),
                                        ({"vocab": [1]}, False, "must hold strings"),
                                        ({"image": ["x"]}, True, "unknown option 'image'"),
                                        ({"granularity": ["Basic"]}, True, "'Basic' is not one of fine, basic"),
                                        ({"granularity": "/srv/mine.txt"}, False, "is not one of"),
                                        ({"granularity": ["mine"]}, True, "start novic-serve with --roll-up")]:
        with pytest.raises(RequestError, match=message):
            request_options(fields, vocabularies, from_query=from_query, rollups={})   # novic-serve, none named
    rollups = {"kingdoms": "/srv/kingdoms.txt"}
    assert request_options({"granularity": ["coarse"]}, vocabularies, from_query=True) == {"granularity": "coarse"}
    assert request_options({"granularity": "kingdoms"}, vocabularies, from_query=False, rollups=rollups) == \
        {"granularity": "/srv/kingdoms.txt"}


def test_serve_config_paths_are_absolute(monkeypatch, tmp_path):
    """Replicas may start in another directory: a relative bundle or vocabulary path is made absolute."""
    from novic.serve.ray_serve import ServeConfig

    monkeypatch.chdir(tmp_path)
    config = ServeConfig("bundle", vocabularies={"pets": "pets.txt"}, rollups={"mine": "mine.txt"})
    assert config.bundle == str(tmp_path / "bundle") and config.vocabularies == {"pets": str(tmp_path / "pets.txt")}
    assert config.rollups == {"mine": str(tmp_path / "mine.txt")}


def test_server_side_roll_ups_are_checked_at_start(runtime_bundle, tmp_path):  # noqa: F811
    from novic.errors import NovicError
    from novic.runtime.bundle import Bundle
    from novic.serve.ray_serve import ServeConfig, check_config

    if not Bundle.open(runtime_bundle.bundle, verify=False).has_hierarchy:
        pytest.skip("the test bundle has no noun hierarchy (wordnet-base not installed)")
    (tmp_path / "good.txt").write_text("animal\nplant\n")
    (tmp_path / "none.txt").write_text("zzqq\n")
    check_config(ServeConfig(runtime_bundle.bundle, rollups={"good": str(tmp_path / "good.txt")}))
    for rollups, message in [({"basic": str(tmp_path / "good.txt")}, "with a name other than fine, basic, coarse"),
                             ({"gone": str(tmp_path / "gone.txt")}, "--roll-up gone=.*: no such file"),
                             ({"none": str(tmp_path / "none.txt")}, "none of the labels .* is in this bundle")]:
        with pytest.raises(NovicError, match=message) as info:
            check_config(ServeConfig(runtime_bundle.bundle, rollups=rollups))
        assert "\n" not in str(info.value)


def test_cli_engines(monkeypatch, capsys, tmp_path):
    """--engine triton hands the options to novic.serve.triton.serve; a bad engine is one line."""
    import types

    from novic.cli.serve import main

    seen = {}
    fake = types.ModuleType("novic.serve.triton")
    fake.serve = lambda bundle, **options: seen.update(bundle=bundle, **options)
    monkeypatch.setitem(sys.modules, "novic.serve.triton", fake)
    for argv, code in [(["novic-serve", str(tmp_path), "--engine", "triton", "--port", "9000", "--max-batch", "4"], 0),
                       (["novic-serve", str(tmp_path), "--engine", "tensorflow"], 2)]:
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as exit_:
            main()
        assert exit_.value.code == code
    assert seen == dict(bundle=str(tmp_path), host="127.0.0.1", http_port=9000, max_batch=4,
                        max_wait_ms=2.0, backend="auto", precision=None, threads=None, stub_env=None)
    assert "'tensorflow'" in capsys.readouterr().err   # typer's own usage error for a bad choice
    monkeypatch.setattr(sys, "argv", ["novic-serve", str(tmp_path), "--engine", "triton", "--topk", "3",
                                      "--grpc-port", "9001"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 0 and seen["topk"] == 3 and seen["grpc_port"] == 9001

    import novic.serve.ray_serve as ray_serve

    monkeypatch.setattr(ray_serve, "serve", lambda bundle, **options: seen.update(ray=(bundle, options)))
    pets = tmp_path / "pets.txt"
    monkeypatch.setattr(sys, "argv", ["novic-serve", str(tmp_path), "--replicas", "3", "--max-wait-ms", "5",
                                      "--vocab", f"pets={pets}", "--autoscaling", '{"max_replicas": 4}'])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 0
    bundle, options = seen["ray"]
    assert bundle == tmp_path and options["replicas"] == 3 and options["batch_wait_s"] == 0.005
    assert options["autoscaling"] == {"max_replicas": 4} and options["vocabularies"] == {"pets": str(pets)}
    monkeypatch.setattr(sys, "argv", ["novic-serve", str(tmp_path), "--roll-up", f"mine={pets}"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 0 and seen["ray"][1]["rollups"] == {"mine": str(pets)}
    for bad, message in [(["--autoscaling", "{max"], "--autoscaling: not JSON"),
                         (["--vocab", "pets"], "--vocab 'pets': give NAME=FILE"),
                         (["--roll-up", "mine"], "--roll-up 'mine': give NAME=FILE (a text file with one target"),
                         (["--engine", "triton", "--roll-up", f"mine={pets}"], "--roll-up is a Ray Serve option")]:
        monkeypatch.setattr(sys, "argv", ["novic-serve", str(tmp_path), *bad])
        with pytest.raises(SystemExit) as exit_:
            main()
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    # an option of the other engine is a usage error, not silently dropped
    seen.clear()
    for engine, flag, value, message in [
            ("triton", "--replicas", "2", "--replicas is a Ray Serve option; drop it or use --engine ray"),
            ("triton", "--fast-decode", None, "--fast-decode is a Ray Serve option"),
            ("triton", "--vocab", f"pets={pets}", "--vocab is a Ray Serve option"),
            ("triton", "--max-bytes", "10", "--max-bytes is a Ray Serve option"),
            ("triton", "--address", "auto", "--address is a Ray Serve option"),
            ("ray", "--topk", "3", "--topk is a Triton option; drop it or use --engine triton"),
            ("ray", "--grpc-port", "9001", "--grpc-port is a Triton option"),
            ("ray", "--stub-env", str(tmp_path), "--stub-env is a Triton option")]:
        monkeypatch.setattr(sys, "argv", ["novic-serve", str(tmp_path), "--engine", engine, flag,
                                          *([value] if value else [])])
        with pytest.raises(SystemExit) as exit_:
            main()
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert seen == {}   # neither engine started
    # options left out are not passed: the engine's own defaults apply
    monkeypatch.setattr(sys, "argv", ["novic-serve", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 0
    assert not {"replicas", "fast_decode", "max_bytes", "request_timeout_s"} & set(seen["ray"][1])


class _Response:
    """A stand-in DeploymentResponse: awaiting it raises `error`, or never ends (error None)."""

    def __init__(self, error):
        self.error, self.cancelled = error, False

    def __await__(self):
        return self._wait().__await__()

    async def _wait(self):
        import asyncio

        if self.error is None:
            await asyncio.sleep(3600)
        raise self.error

    def cancel(self):
        self.cancelled = True


def test_ingress_answers_503_when_no_replica_can(runtime_bundle):  # noqa: F811
    """The ingress maps a replica's death (in flight) and a replica that never answers to 503."""
    import asyncio
    import types

    from ray.exceptions import ActorDiedError
    from starlette.requests import Request

    from novic.serve._ray_deployments import NovicHTTP
    from novic.serve.ray_serve import ServeConfig

    async def ask(error, timeout):
        response = _Response(error)
        handle = types.SimpleNamespace(classify=types.SimpleNamespace(remote=lambda *a: response))
        ingress = NovicHTTP.func_or_class(handle, ServeConfig(str(runtime_bundle.bundle), request_timeout_s=timeout))
        body = [{"type": "http.request", "body": png(3), "more_body": False}]
        scope = {"type": "http", "method": "POST", "path": "/classify", "query_string": b"topk=2",
                 "headers": [], "scheme": "http", "server": ("127.0.0.1", 80), "root_path": ""}
        reply = await ingress(Request(scope, receive=lambda: asyncio.sleep(0, body.pop(0))))
        return reply.status_code, json.loads(reply.body), response.cancelled

    status, body, _ = asyncio.run(ask(ActorDiedError(), 30))
    assert status == 503 and "no classifier replica could answer (ActorDiedError" in body["error"]
    status, body, cancelled = asyncio.run(ask(None, 0.2))
    assert status == 503 and "no answer within 0.2 s" in body["error"] and cancelled
