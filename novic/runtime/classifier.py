"""`Classifier`: images in, fine-grained noun labels out, from a bundle, without torch.

    from novic import Classifier
    clf = Classifier.load("bundle/", backend="auto")      # say which backend and why: clf.backend_reason
    for r in clf.classify(["cat.jpg", pil_image, jpeg_bytes, array], topk=5):
        print(r.source, r.error or [(l.text, round(l.prob, 3)) for l in r.labels])

Pipeline per batch of `batch_size` inputs: load + preprocess in a bounded thread pool
(novic.runtime.preprocess; the next batch is prepared while the current one is encoded and decoded),
encode all good images in one encoder call, decode all of them together (B images x K beams per
decoder call, novic.runtime.search). A bad input yields a `Result` with `error` set (one line) and
never stops the others.

Guided decoding (default) restricts the labels to a noun vocabulary: the bundle's nouns, or your
own (`vocab=[...]` or a text file with one noun per line). Your nouns are tokenised with the
bundle's own tokenizer assets (CLIP BPE merges or sentencepiece model, torch-free); nouns that this
decoder cannot produce (a token it was never trained on, or longer than its `max_tokens`) are
reported once (logged warning + `Vocabulary.skipped`) and left out. The token trie of each
vocabulary is built once and cached.

Thread safety: one `Classifier` may be shared by many threads. Image loading/preprocessing runs
concurrently; the image encoder and the decoder session are each guarded by a lock (a decoder
session holds the KV cache of the batch being decoded, and GPU backends keep per-session buffers),
so encoder and decoder calls of different threads are serialised, while one thread's encoding
overlaps another's decoding. Every call batches its own images, so answers never depend on what
other threads do (tested: N threads give the same results as serial calls). For more parallel
throughput give each worker process its own Classifier.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from novic.errors import NovicError, option, printable
from novic.runtime.bundle import PRECISIONS
from novic.runtime.images import describe

log = logging.getLogger("novic")

__all__ = ["Classifier", "ClassifierError", "Label", "Result", "Vocabulary"]


class ClassifierError(NovicError, ValueError):
    """A bad argument or vocabulary; the message is one line with the fix."""


@dataclass(frozen=True)
class Label:
    text: str
    logprob: float          # beam score: sum of token log-probs
    prob: float             # exp(logprob); not normalised across labels
    fine: str | None = None             # with a granularity: the fine label that was rolled up
    path: tuple[str, ...] | None = None  # with a granularity: fine label ... rolled-up label

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.fine is None:
            del d["fine"], d["path"]
        else:
            d["path"] = list(self.path or ())
        return d


@dataclass
class Result:
    source: str                              # a printable name of the input
    labels: list[Label] = field(default_factory=list)
    error: str | None = None                 # one line when this input failed, else None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def top(self) -> Label | None:
        return self.labels[0] if self.labels else None

    def to_dict(self) -> dict:
        return {"source": self.source, "labels": [l.to_dict() for l in self.labels], "error": self.error}

    def to_json(self) -> dict:
        """What `novic-run --json` writes and the HTTP services answer: `to_dict` with the source
        and the error made printable (file names may hold control characters or non-UTF-8 bytes)."""
        record = self.to_dict()
        record["source"] = printable(record["source"])
        if record["error"]:
            record["error"] = printable(record["error"])
        return record


# ---- vocabularies ---------------------------------------------------------------------------
@dataclass
class Vocabulary:
    """Nouns usable for guided decoding with one bundle: their compact token sequences (no EOS),
    the trie over them, and the nouns that were skipped with the reason."""

    name: str
    nouns: list[str]
    sequences: list[tuple[int, ...]]
    skipped: list[tuple[str, str]]
    trie: Any                                    # novic.runtime.trie.TokenTrie
    text_of: dict[tuple[int, ...], str]          # token sequence -> noun (first spelling wins)

    def __len__(self) -> int:
        return len(self.nouns)

    def skipped_summary(self, limit: int = 5) -> str | None:
        if not self.skipped:
            return None
        shown = "; ".join(f"{n!r} ({why})" for n, why in self.skipped[:limit])
        more = f"; and {len(self.skipped) - limit} more" if len(self.skipped) > limit else ""
        return (f"{len(self.skipped)} of {len(self.skipped) + len(self.nouns)} nouns in {self.name} "
                f"cannot be produced by this model and are skipped: {shown}{more}")


def read_vocab_file(path: str | os.PathLike) -> list[str]:
    """One noun per line; blank lines and lines starting with '#' are ignored; duplicates dropped."""
    p = Path(path)
    if p.is_dir():
        raise ClassifierError(f"{p}: is a directory; pass a text file with one noun per line")
    if not p.is_file():
        raise ClassifierError(f"{p}: vocabulary file not found; pass a text file with one noun per line")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ClassifierError(f"{p}: cannot read vocabulary ({exc}); save it as UTF-8 text, one noun per line") from None
    nouns = _dedupe(line.strip() for line in text.splitlines())
    if not nouns:
        raise ClassifierError(f"{p}: vocabulary file has no nouns; put one noun per line")
    return nouns


def split_nouns(text: str) -> list[str]:
    """'cat, dog,' -> ['cat', 'dog']: nouns written inline, as novic-run --vocab and novic-serve's
    vocab option take them."""
    return [noun.strip() for noun in text.split(",") if noun.strip()]


def _dedupe(items: Iterable[str]) -> list[str]:
    seen, out = set(), []
    for s in items:
        if s and not s.startswith("#") and s not in seen:
            seen.add(s)
            out.append(s)
    return out


# ---- the classifier ---------------------------------------------------------------------------
class Classifier:
    """Loads a bundle on one backend; `classify` is safe to call from several threads."""

    VOCAB_CACHE_SIZE = 8

    def __init__(self, bundle, encoder, decoder, *, backend: str, reason: str, precision: str,
                 threads: int | None = None, load_seconds: float | None = None, fast_decode: bool = False,
                 jpeg_decoder=None, variant: str = "plain"):
        from novic.runtime.preprocess import Preprocessor

        self.bundle = bundle
        self.encoder = encoder                  # callable: pixels [B,3,H,W] -> embeddings [B,F]
        self.decoder = decoder                  # DecoderSession (owns the KV cache)
        self.backend = backend
        self.backend_reason = reason
        self.precision = precision
        self.variant = variant                  # "fused" / "fused encoder" / "fused decoder" / "plain"
        self.load_seconds = load_seconds
        # An encoder that normalises in its graph (novic.export.u8) gets the uint8 crops as they are.
        self.preprocessor = Preprocessor(bundle.preprocess_config, threads=threads, fast_decode=fast_decode,
                                         jpeg_decoder=jpeg_decoder, uint8=getattr(encoder, "takes_uint8", False))
        self.config = bundle.decoder_config
        self.token_table = bundle.token_table
        self._encode_lock = threading.Lock()
        self._decode_lock = threading.Lock()
        self._vocab_lock = threading.Lock()
        self._vocabs: OrderedDict = OrderedDict()
        self._closing = False                   # set first thing in close(): see _load_batch
        self._text_encoder = None
        self._token_index: dict[int, int] | None = None

    # ---- loading ----------------------------------------------------------------------------
    @classmethod
    def load(cls, bundle, backend: str = "auto", precision: str | None = None, *,
             verify: bool | str = True, threads: int | None = None, device_id: int = 0,
             fast_decode: bool = False, jpeg_decoder: str = "auto", verbose: bool = False,
             fused: bool | None = None, u8: bool | None = None) -> "Classifier":
        """Open `bundle` (a directory or a `Bundle`) on `backend` ('auto', 'ort-cpu', 'ort-cuda',
        'trt'). `precision` ('fp32'/'fp16'/'int8'/'fp8') overrides the backend's choice of graphs (ORT
        backends; TensorRT uses the precision its engines were built with). `threads`: intra-op
        threads for onnxruntime on the CPU and the size of the image-loading pool. `fast_decode`:
        decode JPEG files/bytes at a reduced scale (several times faster for camera photos; pixels
        differ slightly from open_clip's, see `novic.runtime.preprocess.Preprocessor`). `jpeg_decoder`:
        'pillow', 'nvimgcodec' (JPEGs decoded in batches by nvImageCodec, `novic.runtime.nvjpeg`) or
        'auto' (nvImageCodec on the GPU backends when it is installed and its GPU decoder opens,
        else Pillow; a decoder that does not open is logged once with the reason). The choice
        and its reason are in `.backend` / `.backend_reason` (printed to stderr with verbose=True).
        `fused` (ORT backends): None = the backend's choice (ort-cuda takes the bundle's fused graphs
        when it has them), True = the fused graphs (an error if the bundle has none), False = plain.
        `u8` (ORT backends): None = the backend's choice (ort-cuda takes the encoder that takes uint8
        pixels and normalises in its graph, when the bundle has one for the encoder it loads), True
        = that encoder (an error if the bundle has none), False = the float encoder."""
        from novic.runtime.backends.select import select_for_bundle
        from novic.runtime.bundle import Bundle
        from novic.runtime.nvjpeg import JpegDecoderError
        from novic.runtime.nvjpeg import jpeg_decoder as make_jpeg_decoder
        from novic.runtime.opening import open_ort, open_trt

        t0 = time.perf_counter()
        if not isinstance(bundle, (Bundle, str, os.PathLike)):
            raise ClassifierError(f"bundle must be a directory path or a Bundle, got {type(bundle).__name__}; "
                                  "export one with novic-export onnx")
        if not isinstance(bundle, Bundle):
            bundle = Bundle.open(bundle, verify=verify)
        choice = select_for_bundle(bundle, backend)
        if isinstance(precision, str):
            precision = precision.lower()   # "FP16" as well as "fp16", in every caller
        if precision is not None and precision not in PRECISIONS:
            raise ClassifierError(f"precision {precision!r} is not one of {PRECISIONS}")
        if fused and choice.backend == "trt":
            raise ClassifierError("fused=True: fused graphs are onnxruntime's (ort-cpu, ort-cuda); TensorRT "
                                  "fuses its engines itself: drop fused=True or pick an ort backend")
        if u8 and choice.backend == "trt":
            raise ClassifierError("u8=True: uint8-input encoders are onnxruntime graphs (ort-cpu, ort-cuda); "
                                  "drop u8=True or pick an ort backend")
        # What is open when a later step fails is closed before its error goes up: a caller that
        # retries (a server, a notebook) must not pile up GPU memory of half-loaded classifiers.
        with ExitStack() as opened:
            try:
                jpeg = make_jpeg_decoder(jpeg_decoder, "cpu" if choice.backend == "ort-cpu" else "cuda", device_id)
            except JpegDecoderError as exc:
                raise ClassifierError(str(exc)) from None
            opened.callback(close_quietly, jpeg)
            variant, reason = "plain", choice.reason
            if choice.backend == "trt":
                encoder, decoder, used = open_trt(bundle, choice, device_id, opened)
            else:
                encoder, decoder, used, variant = open_ort(bundle, choice, precision, threads, device_id, fused,
                                                           u8, opened)
                reason += f"; {variant} {used} graphs" if variant != "plain" else ""
                reason += "; uint8 pixels into the encoder" if getattr(encoder, "takes_uint8", False) else ""
            bundle.check_encoder(encoder.image_size, encoder.embed_dim)   # the decoder checks its own graphs
            clf = cls(bundle, encoder, decoder, backend=choice.backend, reason=reason,
                      precision=used, threads=threads, load_seconds=time.perf_counter() - t0,
                      fast_decode=fast_decode, jpeg_decoder=jpeg, variant=variant)
            opened.pop_all()   # loaded: clf.close() closes them from now on
        log.info("novic: %s", clf.describe())
        if verbose:
            print(f"novic: {clf.describe()}", file=sys.stderr)
        return clf

    @property
    def closed(self) -> bool:
        return isinstance(self.decoder, _Closed)

    def describe(self) -> str:
        took = f", loaded in {self.load_seconds:.2f} s" if self.load_seconds is not None else ""
        fused = f" {self.variant}" if self.variant != "plain" else ""
        return f"backend {self.backend} ({self.precision}{fused}{took}): {self.backend_reason}"

    def __repr__(self) -> str:
        return f"Classifier({str(self.bundle.path)!r}, backend={self.backend!r}, precision={self.precision!r})"

    def close(self) -> None:
        """Stop the loading pool and release backend resources (sessions, GPU buffers, the JPEG
        decoder); idempotent. Waits for a batch that another thread is encoding or decoding (its
        buffers must not go under it)."""
        self._closing = True
        self.preprocessor.close()
        with self._encode_lock, self._decode_lock:
            if self.closed:
                return
            for part in (self.preprocessor.jpeg_decoder, self.encoder, self.decoder):
                close_quietly(part)   # the JPEG decoder waits for a batch it is decoding
            self.encoder = self.decoder = _Closed()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- vocabularies -----------------------------------------------------------------------
    def vocabulary(self, vocab: Any = None) -> Vocabulary:
        """The (cached) guided-decoding vocabulary: None = the bundle's nouns; a list of nouns;
        a path to a text file (one noun per line); or a `Vocabulary`."""
        if isinstance(vocab, Vocabulary):
            return vocab
        if vocab is None:
            key = ("bundle",)
        elif isinstance(vocab, (str, os.PathLike)):
            p = Path(vocab)
            try:
                st = p.stat()
            except OSError:
                raise ClassifierError(f"{p}: vocabulary file not found; pass a text file with one noun "
                                      f"per line, or {option('a list of nouns', 'nouns separated by commas')}") from None
            if p.is_dir():
                raise ClassifierError(f"{p}: is a directory; pass a text file with one noun per line")
            key = ("file", str(p.resolve()), st.st_mtime_ns, st.st_size)
        else:
            if isinstance(vocab, (bytes, bytearray)):
                raise ClassifierError("vocab must be a list of nouns or a path, not bytes")
            vocab = list(vocab)
            odd = [v for v in vocab if not isinstance(v, str)]
            if odd:
                raise ClassifierError(f"vocab must hold nouns as strings; got {odd[0]!r} ({type(odd[0]).__name__})")
            nouns = [v.strip() for v in vocab]
            key = ("list", tuple(nouns))
        with self._vocab_lock:
            hit = self._vocabs.get(key)
            if hit is not None:
                self._vocabs.move_to_end(key)
                return hit
            built = self._build_vocab(vocab, key)
            self._vocabs[key] = built
            while len(self._vocabs) > self.VOCAB_CACHE_SIZE:
                self._vocabs.popitem(last=False)
        if built.skipped:
            log.warning("novic: %s", built.skipped_summary())
        return built

    def _build_vocab(self, vocab, key) -> Vocabulary:
        from novic.runtime.trie import TokenTrie

        b_nouns, b_tokens = self.bundle.nouns, self.bundle.noun_tokens
        known = {}
        if b_nouns and b_tokens:
            for noun, toks in zip(b_nouns, b_tokens):
                if noun:  # '' placeholders of the original vocabulary
                    known.setdefault(noun, tuple(int(t) for t in toks))
        if key[0] == "bundle":
            if not known:
                raise ClassifierError(f"{self.bundle.path}: the bundle has no noun vocabulary for guided "
                                      f"decoding; pass {option('vocab=[...]', '--vocab FILE')}, or use "
                                      f"{option('guided=False', '--free')}")
            nouns, name = list(known), "the bundle's vocabulary"
        elif key[0] == "file":
            nouns, name = read_vocab_file(vocab), str(vocab)
        else:
            nouns, name = _dedupe(key[1]), f"the list of {len(key[1])} nouns"
            if not nouns:
                raise ClassifierError("vocab is empty; pass at least one noun")

        limit = self.config.max_new_tokens
        V = self.config.vocab_size
        usable, seqs, skipped, text_of = [], [], [], {}
        for noun in nouns:
            toks = known.get(noun)
            why = None
            if toks is None:
                toks, why = self._tokenize(noun)
            if why is None:
                if not toks:
                    why = "no tokens after text cleaning"
                elif len(toks) > limit:
                    why = f"{len(toks)} tokens, this decoder emits at most {limit}"
                elif max(toks) >= V or min(toks) < 1:
                    why = "token ids outside the decoder vocabulary"
            if why is not None:
                skipped.append((noun, why))
                continue
            usable.append(noun)
            seqs.append(toks)
            text_of.setdefault(toks, noun)
        if not usable:
            first = f" (e.g. {skipped[0][0]!r}: {skipped[0][1]})" if skipped else ""
            raise ClassifierError(f"none of the nouns in {name} can be produced by this model{first}; "
                                  f"use nouns from the model's vocabulary or {option('guided=False', '--free')}")
        return Vocabulary(name, usable, seqs, skipped, TokenTrie(seqs), text_of)

    def _tokenize(self, noun: str) -> tuple[tuple[int, ...], str | None]:
        enc = self._encoder_for_text()
        ids = [int(i) for i in enc.encode(noun)]
        if not ids:
            return (), "no tokens after text cleaning"
        index = self._token_index
        if index is None:
            index = self._token_index = {t: c for c, t in enumerate(self.token_table.tokenizer_ids) if c > 0}
        missing = [i for i in ids if i not in index]
        if missing:
            unseen = list(dict.fromkeys(missing))
            pieces = ", ".join(repr(enc.piece(i)) for i in unseen)
            return (), (f"token {pieces} is" if len(unseen) == 1 else f"tokens {pieces} are") + \
                " not in the decoder's vocabulary"
        return tuple(index[i] for i in ids), None

    def _encoder_for_text(self):
        if self._text_encoder is None:
            from novic.bpe import ClipBpeEncoder, SentencePieceEncoder

            path = self.bundle.tokenizer_file
            if path is None:
                raise ClassifierError(f"{self.bundle.path}: the bundle carries no tokenizer file, so new "
                                      f"nouns cannot be tokenised; use nouns of the bundle's vocabulary or "
                                      f"re-export the bundle with novic-export onnx")
            kind = self.bundle.tokenizer_kind or self.token_table.kind
            clean = self.token_table.clean
            if kind == "clip_bpe":
                self._text_encoder = ClipBpeEncoder(path, clean=clean)
            elif kind == "sentencepiece":
                self._text_encoder = SentencePieceEncoder(path, clean=clean)
            else:
                raise ClassifierError(f"{self.bundle.path}: unknown tokenizer kind {kind!r}; re-export the bundle")
        return self._text_encoder

    # ---- classification ---------------------------------------------------------------------
    def classify(self, images, topk: int = 5, guided: bool = True, vocab: Any = None,
                 beam_width: int = 10, temperature: float = 1.0, alpha: float = 0.0,
                 batch_size: int = 32, granularity: Any = None) -> list[Result]:
        """Classify images (a list of paths / bytes / file objects / PIL images / arrays, or one of
        them). -> one `Result` per input, in order. At most `beam_width` labels per image (beam
        search keeps that many hypotheses); `beam_width=1` is greedy decoding. `granularity`:
        'fine' (None, the decoder's labels), 'basic', 'coarse', a file of target labels or a list
        of them: all beam labels roll up through the bundle's noun hierarchy and labels reaching
        the same target are merged (novic.runtime.hierarchy)."""
        return list(self.iter_classify(images, topk=topk, guided=guided, vocab=vocab,
                                       beam_width=beam_width, temperature=temperature, alpha=alpha,
                                       batch_size=batch_size, granularity=granularity))

    def classify_one(self, image, **kwargs) -> Result:
        return self.classify([image], **kwargs)[0]

    def iter_classify(self, images, topk: int = 5, guided: bool = True, vocab: Any = None,
                      beam_width: int = 10, temperature: float = 1.0, alpha: float = 0.0,
                      batch_size: int = 32, names: Sequence[str] | None = None,
                      granularity: Any = None) -> Iterator[Result]:
        """Like `classify`, yielding results in input order as each batch finishes. Arguments are
        checked (and the vocabulary built) at once; `names` overrides the printed source names."""
        from novic.runtime.hierarchy import roll_up_results, rollup_for

        rollup = rollup_for(self.bundle, granularity)
        sources = _as_list(images)
        batch_size = _positive_int(batch_size, "batch_size")
        if names is not None and len(names) != len(sources):
            raise ClassifierError("names must have one entry per image")
        topk, beam_width, temperature, alpha, vocabulary = self.check_options(topk, guided, vocab, beam_width,
                                                                              temperature, alpha)
        labels = [describe(s) for s in sources] if names is None else [str(n) for n in names]
        if rollup is None:
            return self._iterate(sources, labels, vocabulary, topk, beam_width, temperature, alpha, batch_size)
        results = self._iterate(sources, labels, vocabulary, beam_width, beam_width, temperature, alpha, batch_size)
        return roll_up_results(results, rollup, topk)   # every beam label rolls up, then the top k

    def classify_pixels(self, pixels: np.ndarray, names: Sequence[str], topk: int = 5, guided: bool = True,
                        vocab: Any = None, beam_width: int = 10, temperature: float = 1.0,
                        alpha: float = 0.0, granularity: Any = None) -> list[Result]:
        """Images already preprocessed: uint8 [N, H, W, 3] (resized and cropped) or, for a float
        encoder, float32 [N, 3, H, W] (`self.preprocessor` makes the one this encoder takes), one name per
        row -> one `Result` per row (for callers that load images themselves, e.g. `Batcher`).
        `granularity` as in `classify`. With N = 0 it only checks the arguments."""
        from novic.runtime.hierarchy import roll_up_results, rollup_for

        if len(names) != len(pixels):
            raise ClassifierError("names must have one entry per row of pixels")
        rollup = rollup_for(self.bundle, granularity)
        topk, beam_width, temperature, alpha, vocabulary = self.check_options(topk, guided, vocab, beam_width,
                                                                              temperature, alpha)
        if not len(pixels):
            return []
        results = self._run_batch(self._encoder_pixels(pixels), [None] * len(pixels), [str(n) for n in names],
                                  vocabulary, beam_width if rollup else topk, beam_width, temperature, alpha)
        return results if rollup is None else list(roll_up_results(results, rollup, topk))

    def check_options(self, topk: int = 5, guided: bool = True, vocab: Any = None, beam_width: int = 10,
                      temperature: float = 1.0, alpha: float = 0.0):
        """The search options of `classify` checked (one ClassifierError line each, before any
        image is read; the vocabulary is built and cached) -> (topk, beam_width, temperature,
        alpha, vocabulary or None for free decoding)."""
        if self.closed:
            raise ClassifierError("this Classifier was closed; load it again with Classifier.load(bundle)")
        topk, beam_width = _positive_int(topk, "topk"), _positive_int(beam_width, "beam_width")
        if topk > beam_width:
            width = option("beam_width", "--beam-width")
            raise ClassifierError(f"{option('topk', '--topk')} {topk} exceeds {width} {beam_width}: beam search "
                                  f"keeps {width} hypotheses; raise {width} to at least {topk}")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ClassifierError(f"temperature must be a positive number, got {temperature!r}")
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha)):
            raise ClassifierError(f"alpha must be a finite number, got {alpha!r}")
        if not isinstance(guided, (bool, np.bool_)):
            raise ClassifierError(f"guided must be True or False, got {guided!r}")
        if guided:
            vocabulary = self.vocabulary(vocab)
        else:
            if vocab is not None:
                raise ClassifierError("vocab= restricts guided decoding; drop it or use guided=True")
            if beam_width > self.decoder.topk:
                raise ClassifierError(f"free decoding with beam width {beam_width} needs decoder graphs "
                                      f"with top-k >= {beam_width}, this bundle's have {self.decoder.topk}: use "
                                      f"{option('beam_width', '--beam-width')} <= {self.decoder.topk}, or re-export the "
                                      f"bundle with novic-export onnx --topk {beam_width}")
            vocabulary = None
        return topk, beam_width, float(temperature), float(alpha), vocabulary

    def _iterate(self, sources, labels, vocabulary, topk, beam_width, temperature, alpha, batch_size):
        chunks = [range(i, min(i + batch_size, len(sources))) for i in range(0, len(sources), batch_size)]
        if not chunks:
            return
        pending = self._prefetch([sources[i] for i in chunks[0]])
        for n, chunk in enumerate(chunks):
            pixels, errors = pending.result()
            if n + 1 < len(chunks):
                pending = self._prefetch([sources[i] for i in chunks[n + 1]])
            yield from self._run_batch(pixels, errors, [labels[i] for i in chunk], vocabulary,
                                       topk, beam_width, temperature, alpha)

    def _prefetch(self, sources) -> Future:
        """`_load_batch(sources)` in a thread of its own that ends with it: an iteration that is
        abandoned (or outlives close()) leaves no idle loader thread behind, as a pool would."""
        future: Future = Future()

        def load():
            try:
                future.set_result(self._load_batch(sources))
            except BaseException as exc:  # noqa: BLE001 - handed to the iterating thread
                future.set_exception(exc)

        threading.Thread(target=load, name="novic-prefetch", daemon=True).start()
        return future

    def _load_batch(self, sources):
        """preprocessor.load_batch; if close() shut its pool down before or under this call
        (another thread closed the Classifier), the closed error instead of the pool's RuntimeError."""
        from novic.runtime.preprocess import PreprocessorClosed

        try:
            return self.preprocessor.load_batch(sources)
        except PreprocessorClosed:
            raise ClassifierError(CLOSED) from None
        except RuntimeError:
            if self._closing:
                raise ClassifierError(CLOSED) from None
            raise

    def _encoder_pixels(self, pixels) -> np.ndarray:
        """Preprocessed pixels in the form this encoder takes: a uint8 batch [N,H,W,3] is normalised
        here for a float encoder; a float batch cannot be given to a uint8 encoder (one line why)."""
        pixels = np.asarray(pixels)
        takes_uint8 = getattr(self.encoder, "takes_uint8", False)
        if pixels.dtype == np.uint8 and pixels.ndim == 4 and pixels.shape[-1] == 3:
            return pixels if takes_uint8 else self.preprocessor.normalize_batch(pixels)
        if takes_uint8:
            raise ClassifierError(f"this Classifier's image encoder takes uint8 pixels [N, H, W, 3] (resized and "
                                  f"cropped, normalised in the graph), got {pixels.dtype} {list(pixels.shape)}: pass "
                                  f"the batch of clf.preprocessor, or load with u8=False")
        return np.asarray(pixels, dtype=np.float32)

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """Preprocessed pixels (see `classify_pixels`) -> unit embeddings [B,F] (serialised on the
        encoder lock)."""
        pixels = self._encoder_pixels(pixels)
        with self._encode_lock:
            return np.asarray(self.encoder(pixels), dtype=np.float32)

    def decode(self, embeds: np.ndarray, vocabulary: Vocabulary | None, beam_width: int,
               temperature: float, alpha: float):
        """Beam search over the decoder session (serialised on the decoder lock)."""
        from novic.runtime.search import beam_search

        trie = vocabulary.trie if vocabulary is not None else None
        with self._decode_lock:
            return beam_search(self.decoder, embeds, beam_width, temperature, alpha, trie)

    def _run_batch(self, pixels, errors, names, vocabulary, topk, beam_width, temperature, alpha):
        results = [Result(name, [], str(err) if err is not None else None) for name, err in zip(names, errors)]
        good = [i for i, r in enumerate(results) if r.error is None]
        if good:
            batch = pixels[good] if len(good) < len(results) else pixels
            embeds = self._embed_on_device(batch)
            on_device = embeds is not None
            if on_device:   # checked after decoding, so that the prefill reads them without a round trip
                keep = list(range(len(good)))
            else:
                embeds = self.embed(batch)
                bad = _bad_embeddings(embeds)
                keep = [j for j in range(len(good)) if j not in bad]
                embeds = embeds[keep] if len(keep) < len(good) else embeds
            hyps = self.decode(embeds, vocabulary, beam_width, temperature, alpha) if keep else []
            bad = _bad_embeddings(embeds.numpy()) if on_device else set(range(len(good))) - set(keep)
            for j, h in zip(keep, hyps):
                if j in bad:
                    continue
                # every beam dead (a NaN sorts after -inf) or a non-finite score: never an empty or NaN answer
                if not h or not all(math.isfinite(hyp.logprob) for hyp in h[:topk]):
                    results[good[j]].error = (f"{names[good[j]]}: the decoder returned non-finite scores; "
                                              f"the bundle's weights are damaged or from a diverged "
                                              f"training run: export it again from a good checkpoint")
                    continue
                results[good[j]].labels = [Label(self._text(hyp.tokens, vocabulary), float(hyp.logprob),
                                                 float(hyp.prob)) for hyp in h[:topk]]
            if bad:
                fp32 = option("precision='fp32'", "--precision fp32")
                for j in sorted(bad):
                    results[good[j]].error = (f"{names[good[j]]}: the image encoder returned a non-finite or "
                                              f"zero embedding; try {fp32}")
        return results

    def _embed_on_device(self, pixels):
        """The embeddings left on the device for a decoder that reads them there (ort-cuda without a
        CUDA graph for this batch: no host round trip between encoder and prefill), else None."""
        on_device = getattr(self.encoder, "embed_on_device", None)
        if on_device is None or not getattr(self.decoder, "reads_device_embeddings", False):
            return None
        with self._encode_lock:
            return on_device(pixels)

    def _text(self, tokens: tuple[int, ...], vocabulary: Vocabulary | None) -> str:
        if vocabulary is not None:
            text = vocabulary.text_of.get(tuple(tokens))
            if text is not None:
                return text
        return self.token_table.decode(tokens)


# ---- helpers ------------------------------------------------------------------------------------
CLOSED = "this Classifier was closed; load it again with Classifier.load(bundle)"


class _Closed:
    """Stands in for the backend after close(): any use says so in one line."""

    def __getattr__(self, name):
        raise ClassifierError(CLOSED)

    def __call__(self, *args, **kwargs):
        raise ClassifierError(CLOSED)


def close_quietly(part) -> None:
    """`part.close()` where it has one (None and objects without one are skipped); a failure is
    logged, never raised: closing is best effort and must not hide the error that led to it."""
    try:
        close = getattr(part, "close", None)
        if callable(close):
            close()
    except Exception:  # noqa: BLE001 - best effort at shutdown
        log.debug("novic: closing %r failed", part, exc_info=True)


def _bad_embeddings(embeds: np.ndarray) -> set[int]:
    """Rows of the encoder's unit embeddings that are not finite or all zero (an fp16 overflow, or a
    tower output of zeros that the graph's L2 normalisation leaves at zero)."""
    good = np.isfinite(embeds).all(axis=1) & (np.abs(embeds).sum(axis=1) > 0)
    return {int(j) for j in np.flatnonzero(~good)}


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ClassifierError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _as_list(images) -> list:
    from PIL import Image

    single = (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)
    if isinstance(images, single) or (isinstance(images, np.ndarray) and images.ndim in (2, 3)) \
            or hasattr(images, "read"):
        return [images]
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    try:
        return list(images)
    except TypeError:
        return [images]
