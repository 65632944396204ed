"""Triton requests -> one Classifier call -> one answer per request (numpy only, no Triton import).

Shared by the PyTriton server (novic.serve.triton) and the Python-backend model of an exported
repository (novic.serve.triton_model), so both speak the same protocol:

    inputs   image  BYTES [N, 1]   encoded image files (JPEG, PNG, ...), N images per request
             topk   INT32 [N, 1]   optional, labels per image (default: the server's topk)
    outputs  labels BYTES [N, K]   UTF-8 labels, best first (K = the largest topk of the request;
             probs  FP32  [N, K]   shorter rows are padded with b"" and 0)
             error  BYTES [N, 1]   b"" when the image was classified, else one line naming it and the fix

A bad image fails only its own row: a Triton model that errors fails every request of the batch
it was given, so the per-image error travels as an output. All images of all requests in one
dynamic batch are classified together (one encoder call and one beam search per `batch_size`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

INPUT_IMAGE, INPUT_TOPK = "image", "topk"
OUTPUT_LABELS, OUTPUT_PROBS, OUTPUT_ERROR = "labels", "probs", "error"


@dataclass
class _Row:
    request: int
    index: int             # position in its request (names the image in errors)
    image: object          # bytes, or None when the row failed before classification
    topk: int
    error: str | None = None


def _as_bytes(value) -> bytes | None:
    if isinstance(value, (bytes, bytearray, memoryview, np.bytes_)):
        return bytes(value)
    return None


def _rows(requests, default_topk: int, beam_width: int) -> list[_Row]:
    rows = []
    for r, request in enumerate(requests):
        images = np.asarray(request[INPUT_IMAGE], dtype=object).reshape(-1)
        topks = request[INPUT_TOPK] if INPUT_TOPK in request.keys() else None
        topks = np.full(len(images), default_topk) if topks is None else np.asarray(topks).reshape(-1)
        for j, image in enumerate(images):
            row = _Row(r, j, _as_bytes(image), default_topk)
            if row.image is None:
                row.error = f"image {j}: not bytes; send the encoded image file (JPEG, PNG, ...) as BYTES"
            elif len(topks) != len(images):
                row.error = f"image {j}: topk has {len(topks)} values for {len(images)} images; send one per image"
            elif not 1 <= int(topks[j]) <= beam_width:
                row.error = f"image {j}: topk {int(topks[j])} is out of range; use 1 to {beam_width}"
            else:
                row.topk = int(topks[j])
            rows.append(row)
    return rows


def classify_requests(classifier, requests, *, topk: int, beam_width: int, batch_size: int = 32) -> list[dict]:
    """`requests`: mappings input name -> array (PyTriton's Request, or dicts built from
    pb_utils requests). -> one dict of output arrays per request, in order."""
    rows = _rows(requests, topk, beam_width)
    todo = [i for i, row in enumerate(rows) if row.error is None]
    names = [f"image {rows[i].index}" for i in todo]
    # One search at full beam width: a smaller topk is a prefix of its ranking (Classifier.classify
    # cuts the same list), so requests with different topk share the batch.
    results = classifier.iter_classify([rows[i].image for i in todo], topk=beam_width, beam_width=beam_width,
                                       batch_size=batch_size, names=names)
    labels: dict[int, list] = {}
    for i, result in zip(todo, results):
        if result.error is not None:
            rows[i].error = f"image {rows[i].index}: {result.error}"
        else:
            labels[i] = result.labels[:rows[i].topk]
    by_request: list[list] = [[] for _ in requests]
    for i, row in enumerate(rows):
        by_request[row.request].append((i, row))
    return [_answer(numbered, labels) for numbered in by_request]


def _answer(numbered_rows, labels: dict[int, list]) -> dict:
    width = max([row.topk for _, row in numbered_rows] + [1])
    n = len(numbered_rows)
    out_labels = np.full((n, width), b"", dtype=object)
    out_probs = np.zeros((n, width), dtype=np.float32)
    out_error = np.full((n, 1), b"", dtype=object)
    for k, (i, row) in enumerate(numbered_rows):
        if row.error is not None:
            out_error[k, 0] = row.error.encode("utf-8")
            continue
        for c, label in enumerate(labels[i]):
            out_labels[k, c] = label.text.encode("utf-8")
            out_probs[k, c] = label.prob
    return {OUTPUT_LABELS: out_labels, OUTPUT_PROBS: out_probs, OUTPUT_ERROR: out_error}
