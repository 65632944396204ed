"""The two Ray Serve deployments of novic-serve (imported only once Ray is known to be installed).

NovicHTTP (ingress): HTTP in, status codes out; never touches an image.
NovicClassifier (replicas): one Classifier each; checks the options, decodes the image in a thread,
then waits for its `@serve.batch` batch, which decodes requests with equal decoding options together
and gives each its own top k and granularity (novic.runtime.request_options).
"""
from __future__ import annotations

import asyncio
from urllib.parse import parse_qs

import numpy as np
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from novic.errors import NovicError, first_line
from novic.runtime.classifier import Classifier, Result
from novic.runtime.images import describe
from novic.runtime.request_options import check_request, classify_together, decode_groups
from novic.serve.http_options import RequestError, content_length, json_request, request_options, too_large
from novic.serve.ray_serve import ServeConfig

USAGE = "use POST /classify (image bytes, options in the query) or GET /healthz"


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(message.split())}, status_code=status)


@serve.deployment
class NovicClassifier:
    def __init__(self, config: ServeConfig):
        self.clf = Classifier.load(config.bundle, backend=config.backend, precision=config.precision,
                                   threads=config.threads, fast_decode=config.fast_decode, verify="cached")
        self._classify_batch.set_max_batch_size(config.max_batch)
        self._classify_batch.set_batch_wait_timeout_s(config.batch_wait_s)

    def describe(self) -> str:
        return self.clf.describe()

    async def classify(self, image: bytes, options: dict) -> tuple[int, dict]:
        """-> (HTTP status, body): 400 a bad option (before the image is looked at), 422 an image
        that cannot be read, 200 the labels. A failure of the classifier itself raises."""
        try:   # a search option, the vocabulary, or a granularity this bundle has no hierarchy for
            checked = check_request(self.clf, **options)
        except NovicError as exc:
            return 400, {"error": first_line(exc)}
        pixels, (error,) = await asyncio.to_thread(self.clf.preprocessor.load_batch, [image])
        if error is not None:
            return 422, Result(describe(image), [], str(error)).to_json()
        result = await self._classify_batch((pixels[0], describe(image), checked))
        return 200, result.to_json()

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def _classify_batch(self, requests: list[tuple]) -> list[Result]:
        results: list = [None] * len(requests)
        for rows in decode_groups([options for _, _, options in requests]):
            pixels = np.stack([requests[i][0] for i in rows])
            names = [requests[i][1] for i in rows]
            got = await asyncio.to_thread(classify_together, self.clf, pixels, names, [requests[i][2] for i in rows])
            for i, result in zip(rows, got):
                results[i] = result
        return results


@serve.deployment(max_ongoing_requests=256)
class NovicHTTP:
    def __init__(self, classifier, config: ServeConfig):
        self.classifier = classifier          # DeploymentHandle of NovicClassifier
        self.config = config

    async def __call__(self, request: Request) -> JSONResponse:
        path = request.url.path.rstrip("/") or "/"
        if path == "/healthz" and request.method == "GET":
            return await self._health()
        if path != "/classify":
            return _error(404, USAGE)
        if request.method != "POST":
            return _error(405, USAGE)
        try:   # the client's mistakes, before the body is read: 400, then 413
            size = content_length(request.headers.get("content-length"))
            is_json = request.headers.get("content-type", "").split(";")[0].strip() == "application/json"
            query = parse_qs(request.url.query, keep_blank_values=True)
            options = {} if is_json else request_options(query, self.config.vocabularies, from_query=True,
                                                         rollups=self.config.rollups)
        except RequestError as exc:
            return _error(400, str(exc))
        if size is not None and size > self.config.max_bytes:
            return _error(413, too_large(self.config.max_bytes, size))
        body = bytearray()
        async for chunk in request.stream():   # a chunked body has no Content-Length to check first
            body += chunk
            if len(body) > self.config.max_bytes:
                return _error(413, too_large(self.config.max_bytes))
        image = bytes(body)
        if is_json:
            if query:
                return _error(400, "options go in the JSON body of a JSON request, not in the query")
            try:
                image, options = json_request(image, self.config.vocabularies, self.config.rollups)
            except RequestError as exc:
                return _error(400, str(exc))
        try:
            status, answer = await self._ask(self.classifier.classify.remote(image, options))
        except Exception as exc:  # noqa: BLE001 - a dead, busy or failing replica: the service's fault
            return _error(503, f"no classifier replica could answer ({type(exc).__name__}: {first_line(exc)})")
        return JSONResponse(answer, status_code=status)

    async def _ask(self, response):
        """Await a DeploymentResponse; past request_timeout_s it is cancelled (TimeoutError)."""
        async def wait():
            return await response

        try:
            return await asyncio.wait_for(wait(), self.config.request_timeout_s)
        except asyncio.TimeoutError:
            response.cancel()
            raise TimeoutError(f"no answer within {self.config.request_timeout_s:g} s") from None

    async def _health(self) -> JSONResponse:
        try:
            described = await self._ask(self.classifier.describe.remote())
        except Exception as exc:  # noqa: BLE001 - not ready (starting, dead): that is what 503 says
            return _error(503, f"no classifier replica ready ({type(exc).__name__}: {first_line(exc)})")
        return JSONResponse({"ok": True, "classifier": described})
