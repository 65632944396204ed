"""The options of an HTTP classify request and the body-size limit, in one place for the HTTP
services: novic-serve (novic.serve.ray_serve) and examples/serve.py. Standard library and the
runtime only: importing this never imports Ray.

Options come as query parameters (name -> list of texts, as `urllib.parse.parse_qs` gives them) or
as the fields of a JSON request ({"image": base64, options...}); each bad one is a RequestError,
one line naming it, which the services answer with 400.
"""
from __future__ import annotations

import base64
import binascii
from typing import Any, Mapping

from novic.runtime.classifier import ClassifierError, split_nouns
from novic.runtime.hierarchy import GRANULARITIES

MAX_BYTES = 64 << 20   # 64 MiB: larger bodies are refused before they are read

# The search options a request may set, and how a query string's text becomes each.
_INT, _FLOAT, _BOOL = "an integer", "a number", "true or false"
OPTIONS = {"topk": _INT, "beam_width": _INT, "guided": _BOOL, "temperature": _FLOAT, "alpha": _FLOAT}


class RequestError(ClassifierError):
    """The client's mistake in a request (400), one line naming the option."""


def content_length(header: str | None) -> int | None:
    """The Content-Length header as a byte count; None when there is none (a chunked body)."""
    if header is None:
        return None
    if not header.strip().isdigit():
        raise RequestError(f"Content-Length must be a number of bytes, got {header!r}")
    return int(header)


def too_large(limit: int, size: int | None = None) -> str:
    """The 413 line for a body over `limit` bytes (`size`: what Content-Length announced)."""
    return f"body of {size} bytes exceeds the limit of {limit} bytes" if size is not None else \
        f"body exceeds the limit of {limit} bytes"


def _parse(name: str, kind: str, value: Any) -> Any:
    """A query's text (or a JSON value) as the option's type; Classifier.check_options checks the rest."""
    if isinstance(value, str):
        text = value.strip().lower()
        try:
            if kind == _INT:
                return int(text)
            if kind == _FLOAT:
                return float(text)
        except ValueError:
            raise RequestError(f"{name}: {value!r} is not {kind}") from None
        if text in ("true", "1", "yes"):
            return True
        if text in ("false", "0", "no"):
            return False
        raise RequestError(f"{name}: {value!r} is not {kind}")
    ok = {_INT: isinstance(value, int) and not isinstance(value, bool),
          _FLOAT: isinstance(value, (int, float)) and not isinstance(value, bool),
          _BOOL: isinstance(value, bool)}[kind]
    if not ok:
        raise RequestError(f"{name}: {value!r} is not {kind}")
    return value


def request_options(fields: Mapping[str, Any], vocabularies: Mapping[str, str], *, from_query: bool,
                    rollups: Mapping[str, str] | None = None) -> dict:
    """Query parameters (name -> list of texts) or JSON fields -> keyword arguments of
    `Classifier.classify`, with a server-side vocabulary or roll-up name replaced by its file."""
    unknown = sorted(set(fields) - set(OPTIONS) - {"vocab", "granularity"})
    if unknown:
        raise RequestError(f"unknown option {unknown[0]!r}; use {', '.join([*OPTIONS, 'vocab', 'granularity'])}")
    options = {}
    for name, kind in OPTIONS.items():
        if name in fields:
            options[name] = _parse(name, kind, _once(name, fields[name], from_query))
    if "vocab" in fields:
        options["vocab"] = _vocab(fields["vocab"], vocabularies, from_query)
    if "granularity" in fields:
        options["granularity"] = _granularity(_once("granularity", fields["granularity"], from_query), rollups)
    return options


def _once(name: str, value: Any, from_query: bool) -> Any:
    """A query parameter's one value (parse_qs gives a list); a JSON field as it is."""
    if not from_query:
        return value
    if len(value) != 1:
        raise RequestError(f"{name}: give it once, got {len(value)} values")
    return value[0]


def _granularity(value: Any, rollups: Mapping[str, str] | None) -> str:
    """A level (fine, basic, coarse) as is, a server-side roll-up name as its file (`rollups`:
    None for a service that takes levels only). Clients never name files themselves: the server
    reads only the lists it was started with."""
    if isinstance(value, str):
        if value in GRANULARITIES:
            return value
        if rollups and value in rollups:
            return rollups[value]
    if rollups is None:
        named = ""
    elif rollups:
        named = f", or a server-side roll-up ({', '.join(sorted(rollups))})"
    else:
        named = " (a list of your own: start novic-serve with --roll-up NAME=FILE)"
    raise RequestError(f"granularity: {value!r} is not one of {', '.join(GRANULARITIES)}{named}")


def _vocab(value: Any, vocabularies: Mapping[str, str], from_query: bool):
    if from_query and len(value) == 1:
        # one query value is a vocabulary name or a comma list ("dog,cat", as novic-run --vocab):
        # a lone unknown word is far more likely a mistyped name than a one-noun vocabulary
        value = value[0]
        if "," in value and value not in vocabularies:
            nouns = split_nouns(value)
            if not nouns:
                raise RequestError(f"vocab: {value!r} holds no nouns; give NAME or 'dog,cat'")
            return nouns
    elif from_query or (isinstance(value, list) and value):
        if not all(isinstance(v, str) for v in value):
            raise RequestError("vocab: a list of nouns must hold strings")
        return list(value)
    if isinstance(value, str):
        if value in vocabularies:
            return vocabularies[value]
        known = ", ".join(sorted(vocabularies)) or "none; a server names them at start, novic-serve --vocab NAME=FILE"
        raise RequestError(f"vocab: no server-side vocabulary named {value!r} (known: {known}); "
                           f"or pass the nouns as a list")
    raise RequestError(f"vocab: give a vocabulary name or a non-empty list of nouns, got {value!r}")


def json_request(body: bytes, vocabularies: Mapping[str, str],
                 rollups: Mapping[str, str] | None = None) -> tuple[bytes, dict]:
    """A JSON request {"image": base64, options...} -> (image bytes, options)."""
    import json

    try:
        fields = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise RequestError(f"body: not valid JSON ({exc}); send the image bytes, or JSON with \"image\" "
                           f"holding them in base64") from None
    if not isinstance(fields, dict) or not isinstance(fields.get("image"), str):
        raise RequestError('image: a JSON request needs "image": the image file in base64')
    fields = dict(fields)
    try:
        image = base64.b64decode(fields.pop("image"), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(f"image: not valid base64 ({exc})") from None
    return image, request_options(fields, vocabularies, from_query=False, rollups=rollups)
