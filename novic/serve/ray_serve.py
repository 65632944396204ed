"""`novic-serve BUNDLE`: the classifier as a Ray Serve application (`pip install 'novic[ray]'`).

    from novic.serve.ray_serve import serve
    serve("bundle/", replicas=2, port=8000)          # blocks until Ctrl-C (novic-serve does this)

    curl --data-binary @photo.jpg 'http://127.0.0.1:8000/classify?topk=3'
    curl -H 'Content-Type: application/json' -d '{"image": "<base64>", "vocab": ["dog", "cat"]}' \\
         http://127.0.0.1:8000/classify
    curl http://127.0.0.1:8000/healthz

Two deployments (novic.serve._ray_deployments): `NovicHTTP`, the ingress, owns HTTP (option
parsing, size limit, status codes) and calls `NovicClassifier`, the replicas: one `Classifier` each,
requests batched with Serve's `@serve.batch`. The split is what keeps the promise "a request in
flight on a replica that dies is answered 503": Serve's own proxy would answer 500 for it, the
ingress sees the replica's death as an exception and answers 503 itself.

Options (parsed by novic.serve.http_options, as examples/serve.py parses them), as query parameters
or JSON fields (`{"image": base64, ...}` with Content-Type application/json): topk, beam_width,
guided, temperature, alpha, vocab, granularity. `vocab` is the name of a server-side vocabulary
(`vocabularies={"name": "nouns.txt"}`, `novic-serve --vocab name=nouns.txt`) or inline nouns (a JSON
list; in a query, `vocab=dog,cat` or `vocab=dog&vocab=cat`; a single query value must name a
server-side vocabulary or hold a comma, else 400). `granularity` is fine (default), basic, coarse,
or the name of a server-side roll-up list (`rollups={"name": "targets.txt"}`, `novic-serve
--roll-up name=targets.txt`); with one other than fine each label also carries "fine" and "path",
as in novic-run --json (docs/labels.md).

Answers: 200 and 422 carry the record `novic-run --json` writes ({"source", "labels", "error"});
400 a bad option (checked before any image work; the message names it), 413 a body over
`max_bytes`, 503 no replica could answer (dead, starting, or over `request_timeout_s`), each with
{"error": "one line"}. GET /healthz: 200 while a replica answers, else 503.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from novic.runtime.classifier import ClassifierError
from novic.serve.http_options import MAX_BYTES


@dataclass(frozen=True)
class ServeConfig:
    """Everything a deployment needs; plain data so that Ray can ship it to the replicas."""

    bundle: str
    backend: str = "auto"
    precision: str | None = None
    threads: int | None = None
    fast_decode: bool = False
    max_batch: int = 32
    batch_wait_s: float = 0.002
    max_bytes: int = MAX_BYTES
    request_timeout_s: float = 60.0
    vocabularies: Mapping[str, str] = field(default_factory=dict)   # name -> noun file on every node
    rollups: Mapping[str, str] = field(default_factory=dict)        # name -> roll-up list on every node

    def __post_init__(self):
        # replicas may run in another working directory: paths are made absolute on the driver
        object.__setattr__(self, "bundle", os.path.abspath(os.fspath(self.bundle)))
        for named in ("vocabularies", "rollups"):
            object.__setattr__(self, named, {name: os.path.abspath(os.fspath(path))
                                             for name, path in getattr(self, named).items()})


def check_config(config: ServeConfig) -> ServeConfig:
    """Fail early, on the driver, with one line: a bundle that is not there, a vocabulary file
    that is not there, a roll-up list this bundle cannot use, limits that make no sense."""
    from novic.runtime.bundle import Bundle
    from novic.runtime.hierarchy import GRANULARITIES, rollup_for

    bundle = Bundle.open(config.bundle, verify=False)
    for name, path in config.vocabularies.items():
        if not name or not os.path.isfile(path):
            raise ClassifierError(f"--vocab {name}={path}: no such file; give NAME=FILE with one noun per line")
    for name, path in config.rollups.items():
        if not name or name in GRANULARITIES:
            raise ClassifierError(f"--roll-up {name}={path}: name the list (NAME=FILE) with a name other than "
                                  f"{', '.join(GRANULARITIES)}")
        if not os.path.isfile(path):
            raise ClassifierError(f"--roll-up {name}={path}: no such file; give NAME=FILE with one target "
                                  f"label per line")
        rollup_for(bundle, path)   # read and placed once here: a bad list or bundle is one line now
    if config.max_batch < 1 or not (math.isfinite(config.batch_wait_s) and config.batch_wait_s >= 0):
        raise ClassifierError("max_batch must be >= 1 and batch_wait_s a number >= 0")
    if config.max_bytes < 1 or not config.request_timeout_s > 0:
        raise ClassifierError("max_bytes and request_timeout_s must be positive")
    return config


def build_app(config: ServeConfig, *, replicas: int = 1, gpus_per_replica: float = 0,
              cpus_per_replica: float = 1, autoscaling: Mapping[str, Any] | None = None):
    """The Ray Serve application (not yet running): `ray.serve.run(build_app(...))`.
    `autoscaling` is Serve's autoscaling_config (min_replicas, max_replicas, ...); it replaces
    `replicas`."""
    from novic.serve._ray import require

    require("ray.serve")
    from novic.serve._ray_deployments import NovicClassifier, NovicHTTP

    check_config(config)
    scale = {"autoscaling_config": dict(autoscaling)} if autoscaling else {"num_replicas": replicas}
    classifier = NovicClassifier.options(
        ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
        # a full batch must be able to wait on one replica at once, or Serve never fills it
        max_ongoing_requests=max(2 * config.max_batch, 8), **scale,
    ).bind(config)
    return NovicHTTP.bind(classifier, config)


def serve(bundle, *, address: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          replicas: int = 1, gpus_per_replica: float = 0, cpus_per_replica: float = 1,
          autoscaling: Mapping[str, Any] | None = None, num_cpus: int | None = None,
          blocking: bool = True, **options):
    """Deploy `bundle` on Ray Serve at http://HOST:PORT/classify; `address` joins a cluster (default:
    start a local one). `options`: the fields of `ServeConfig`. Blocks until interrupted unless
    `blocking=False` (then returns the ingress' DeploymentHandle)."""
    from novic.serve._ray import connect, require

    config = check_config(ServeConfig(bundle=bundle, **options))
    connect(address, num_cpus=num_cpus)
    rserve = require("ray.serve")
    rserve.start(http_options={"host": host, "port": port})
    app = build_app(config, replicas=replicas, gpus_per_replica=gpus_per_replica,
                    cpus_per_replica=cpus_per_replica, autoscaling=autoscaling)
    handle = rserve.run(app, name="novic", route_prefix="/")
    if not blocking:
        return handle
    import time

    print(f"novic-serve: http://{host}:{port}/classify on Ray Serve (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        rserve.shutdown()
