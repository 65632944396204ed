"""The two Ray Serve deployments of novic-serve (imported only once Ray is known to be installed).

NovicHTTP (ingress): HTTP in, status codes out; never touches an image.
NovicClassifier (replicas): one Classifier each; checks the options, decodes the image in a thread,
then waits for its `@serve.batch` batch, which classifies requests with equal options together.
"""
from __future__ import annotations

import asyncio
from urllib.parse import parse_qs

import numpy as np
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from novic.errors import first_line
from novic.runtime.classifier import Classifier, ClassifierError, Result
from novic.runtime.images import describe
from novic.serve.http_options import RequestError, content_length, json_request, request_options, too_large
from novic.serve.ray_serve import ServeConfig

USAGE = "use POST /classify (image bytes, options in the query) or GET /healthz"


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(message.split())}, status_code=status)


def _options_key(options: dict) -> tuple:
    # Requests in one batch hold their Vocabulary, so its id cannot be reused meanwhile.
    return tuple((k, id(v) if k == "vocab" else v) for k, v in sorted(options.items()))


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
        try:
            topk, beam_width, temperature, alpha, vocabulary = self.clf.check_options(**options)
        except ClassifierError as exc:
            return 400, {"error": first_line(exc)}
        checked = dict(topk=topk, guided=vocabulary is not None, vocab=vocabulary, beam_width=beam_width,
                       temperature=temperature, alpha=alpha)
        pixels, (error,) = await asyncio.to_thread(self.clf.preprocessor.load_batch, [image])
        if error is not None:
            return 422, Result(describe(image), [], str(error)).to_json()
        result = await self._classify_batch((pixels[0], describe(image), checked))
        return 200, result.to_json()

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def _classify_batch(self, requests: list[tuple]) -> list[Result]:
        groups: dict[tuple, list[int]] = {}
        for i, (_, _, options) in enumerate(requests):
            groups.setdefault(_options_key(options), []).append(i)
        results: list = [None] * len(requests)
        for rows in groups.values():
            pixels = np.stack([requests[i][0] for i in rows])
            names = [requests[i][1] for i in rows]
            got = await asyncio.to_thread(self.clf.classify_pixels, pixels, names, **requests[rows[0]][2])
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
            options = {} if is_json else request_options(query, self.config.vocabularies, from_query=True)
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
                image, options = json_request(image, self.config.vocabularies)
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
