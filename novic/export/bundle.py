"""Bundle writer: checkpoint + CLIP image tower -> a bundle directory (``novic-export onnx``).

``export_bundle`` runs the exporters (image encoder, decoder prefill/step, fp16 variants) into a
staging directory next to the target, copies the tokenizer file, hashes every artifact, writes
``manifest.json`` (layout: novic.runtime.bundle), fsyncs everything and renames the staging
directory into place. A failure or interrupt at any point leaves the target as it was (no half
bundle); replacing an existing bundle needs ``overwrite=True`` (``--force``) and is an atomic
exchange of the two directories where the OS offers it (Linux renameat2), two renames otherwise.

``check_bundle`` (``novic-export check``) compares a bundle's graphs with the PyTorch oracle.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import time
import uuid
from pathlib import Path

from novic.atomic import fsync_dir, fsync_file, named, write_json_atomic
from novic.errors import NovicError
from novic.runtime.bundle import (FORMAT_NAME, FORMAT_VERSION, MANIFEST, Bundle, BundleError,
                                  sha256_file)

TOKENIZER_DIR = "tokenizer"
DEFAULT_BEAM_WIDTH = 10


class BundleExistsError(NovicError):
    """The output directory exists and overwriting was not asked for."""


class ExportError(NovicError):
    """An export that cannot proceed (mismatched models, bad arguments)."""


# --- atomic file system helpers ----------------------------------------------------------------
def dumps_manifest(obj, indent: int = 1, _level: int = 0) -> str:
    """JSON with objects indented but lists of scalars (token ids, pieces, shapes) on one line,
    so that a manifest with 40k nouns stays readable and small."""
    pad, inner = " " * (indent * _level), " " * (indent * (_level + 1))
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{inner}{json.dumps(str(k), ensure_ascii=False)}: {dumps_manifest(v, indent, _level + 1)}"
                 for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, (list, tuple)):
        if all(not isinstance(v, (dict, list, tuple)) for v in obj):
            return json.dumps(list(obj), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        if all(isinstance(v, (list, tuple)) and all(not isinstance(x, (dict, list, tuple)) for x in v) for v in obj):
            return json.dumps(list(obj), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        items = [inner + dumps_manifest(v, indent, _level + 1) for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    return json.dumps(obj, ensure_ascii=False, allow_nan=False)


def write_manifest(path, data: dict) -> None:
    write_json_atomic(path, data, dumps=dumps_manifest)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fsync_file(os.path.join(dirpath, name))
        fsync_dir(dirpath)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False if unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StagedBundle:
    """Context manager: build a bundle in ``<parent>/.<name>.partial-<pid>-<id>``, then ``commit``.

    Leaving the block without commit (an exception, Ctrl-C) removes the staging directory."""

    def __init__(self, out_dir, overwrite: bool = False):
        self.target = Path(out_dir).absolute()
        self.overwrite = overwrite
        self.tmp: Path | None = None
        self.committed = False

    def _check_target(self):
        t = self.target
        if t.exists() and not t.is_dir():
            raise BundleExistsError(f"{t} exists and is a file; choose another --out")
        if t.is_dir() and any(t.iterdir()):
            if not (t / MANIFEST).is_file():
                raise BundleExistsError(f"{t} exists and is not a bundle (no {MANIFEST}); refusing to "
                                        "replace it, choose another --out")
            if not self.overwrite:
                raise BundleExistsError(f"{t} already holds a bundle; pass --force to replace it")

    def __enter__(self) -> "StagedBundle":
        self._check_target()
        parent = self.target.parent
        parent.mkdir(parents=True, exist_ok=True)
        prefix = f".{self.target.name}.partial-"
        for stale in parent.glob(prefix + "*"):  # left by a killed export
            try:
                pid = int(stale.name[len(prefix):].split("-")[0])
            except ValueError:
                continue
            if pid != os.getpid() and not _pid_alive(pid):
                shutil.rmtree(stale, ignore_errors=True)
        self.tmp = parent / f"{prefix}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            self.tmp.mkdir()
        except OSError as exc:   # name the --out the user gave, not the hidden staging directory
            raise named(exc, self.target) from None
        return self

    def commit(self, manifest: dict) -> Path:
        """Write the manifest, fsync, and move the staged bundle into place."""
        self._check_target()  # may have changed while we worked
        write_manifest(self.tmp / MANIFEST, manifest)
        _fsync_tree(self.tmp)
        t = self.target
        if t.is_dir() and not any(t.iterdir()):
            t.rmdir()
        if t.exists():
            if _exchange(self.tmp, t):          # tmp now holds the old bundle
                shutil.rmtree(self.tmp, ignore_errors=True)
            else:
                old = t.with_name(f".{t.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
                os.rename(t, old)
                os.rename(self.tmp, t)
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.tmp, t)
        fsync_dir(t.parent)
        self.committed = True
        return t

    def __exit__(self, exc_type, exc, tb):
        if not self.committed and self.tmp is not None and self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)
        return False


# --- manifest entries ---------------------------------------------------------------------------
def file_entry(root: Path, path) -> dict:
    path = Path(path)
    return {"file": path.relative_to(root).as_posix(), "sha256": sha256_file(path), "size": path.stat().st_size}


def artifact_entry(root: Path, export: dict, role: str, precision: str, variant: str = "plain",
                   pixels: str | None = None) -> dict:
    """Manifest entry of an exported graph (``export``: the exporters' result dict). A fused
    variant (novic.export.fused) carries ``"variant": "fused"`` and its gate numbers; an encoder
    that takes uint8 pixels (novic.export.u8) ``"pixels": "uint8-nhwc"``."""
    graph = Path(export["path"])
    entry = {**file_entry(root, graph), "role": role, "precision": precision}
    if variant != "plain":
        entry["variant"] = variant
    if pixels is not None:
        entry["pixels"] = pixels
    entry["inputs"] = export["io"]["inputs"]
    entry["outputs"] = export["io"]["outputs"]
    extra = [Path(f) for f in export.get("files", []) if Path(f).resolve() != graph.resolve()]
    if extra:
        entry["external_data"] = [file_entry(root, f) for f in extra]
    if "opset" in export:
        entry["opset"] = export["opset"]
    if "gate" in export:
        entry["gate"] = export["gate"]
    return entry


def tokenizer_file(embedder, table) -> Path | None:
    """The file a torch-free runtime needs to tokenise new nouns: CLIP's BPE merges (shipped with
    open_clip) or the sentencepiece model of an HF tokenizer, if it can be found."""
    tok = getattr(embedder, "tokenizer", None)
    if table.kind == "clip_bpe":
        try:
            import open_clip
            from open_clip.tokenizer import default_bpe
        except ImportError:
            return None
        try:   # a custom BPE vocabulary (not CLIP's) is one we cannot locate
            text_cfg = (open_clip.get_model_config(embedder.name) or {}).get("text_cfg", {})
        except Exception:  # noqa: BLE001 - an 'hf-hub:' name: its config is the hub's
            text_cfg = {}
        if text_cfg.get("vocab_size", 49408) != 49408:
            return None
        path = Path(default_bpe())
        return path if path.is_file() else None
    hf = getattr(tok, "tokenizer", None)
    for attr in ("vocab_file", "sp_model_file"):
        path = getattr(hf, attr, None)
        if path and Path(path).is_file() and str(path).endswith(".model"):
            return Path(path)
    return None


def _given_tokenizer(path, table) -> Path:
    """A tokenizer file passed by the user (offline export): it must exist and fit the table."""
    from novic.bpe import ClipBpeEncoder, EncoderError, SentencePieceEncoder

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"tokenizer file {path} does not exist")
    want_sp = table.kind == "sentencepiece"
    if want_sp != (path.suffix == ".model"):
        need = "a sentencepiece model (spiece.model)" if want_sp else "CLIP's BPE merges (bpe_simple_vocab_16e6.txt.gz)"
        raise ExportError(f"tokenizer file {path}: this checkpoint's tokens are {table.kind}, which needs {need}")
    try:
        SentencePieceEncoder(path, clean=table.clean) if want_sp else ClipBpeEncoder(path)
    except EncoderError as exc:
        raise ExportError(f"tokenizer file {path}: {exc}") from None
    return path


def _load_embedder(spec, console, text: bool = True):
    """Embedder.load, but export does not need the text tokenizer: if only that fails (e.g. an HF
    tokenizer with the hub unreachable), build the model alone and go on without it."""
    from novic.model import embedder as emb_mod

    if not text:
        return emb_mod.Embedder.load(spec, text=False), None
    try:
        return emb_mod.Embedder.load(spec), None
    except emb_mod.EmbedderError as exc:
        if "tokenizer" not in str(exc):
            raise
        warning = str(exc)
    embedder = emb_mod.Embedder.load(spec, text=False)
    console.print(f"[yellow]note:[/] the text tokenizer is unavailable ({warning}); the bundle is "
                  "exported without a tokenizer file (guided decoding over the bundle's own nouns still "
                  "works; a user noun list needs the tokenizer)", highlight=False)
    return embedder, warning


def _guided_widths(sequences) -> tuple[int, int]:
    """(widest candidate row of a guided *step* = max over non-root trie nodes of children plus
    EOS, candidates at the root = the prefill's). The TensorRT step engine is sized for the first."""
    from novic.runtime.trie import TokenTrie

    trie = TokenTrie(sequences)
    root = len(trie.children(0)[0])
    step = max((len(trie.children(n)[0]) + trie.is_terminal(n) for n in range(1, trie.num_nodes)), default=1)
    return max(int(step), 1), int(root)


def _hierarchy_entry(root: Path, nouns, wordnet_dir, console) -> dict | None:
    """hierarchy.json for the bundle's nouns + its manifest entry, or None (no nouns, or no WordNet:
    one warning line)."""
    from novic.export.hierarchy import write_hierarchy
    from novic.wordnet import WORDNET_DIR

    def warn(line):
        console.print(f"[yellow]warning:[/] {line}", highlight=False, soft_wrap=True)

    entry = write_hierarchy(root, nouns, wordnet_dir or WORDNET_DIR, warn=warn)
    return None if entry is None else {**file_entry(root, root / entry["file"]), **entry}


def _novic_version() -> str:
    try:
        from importlib.metadata import version
        return version("novic")
    except Exception:  # noqa: BLE001
        return "0+unknown"


# --- the orchestrator ---------------------------------------------------------------------------
def export_bundle(checkpoint_path, out_dir, *, clip: str | None = None, pretrained: str | None = None,
                  tokenizer: str | Path | None = None, fp16: bool = True, fused: bool = True, u8: bool = True,
                  topk: int = 10,
                  beam_width: int = DEFAULT_BEAM_WIDTH, overwrite: bool = False, console=None,
                  fail_after: str | None = None, wordnet_dir=None) -> dict:
    """Export `checkpoint_path` (+ its CLIP model, or `clip`/`pretrained` instead) to a bundle.
    `tokenizer`: the text tokenizer file to copy into the bundle (spiece.model of a SigLIP model),
    instead of the one open_clip would load (from the Hugging Face hub, for SigLIP).

    fused: also write onnxruntime's fused variants (novic.export.fused), each kept only if it
    passes its gate against the fp32 graphs.
    u8: also write uint8-input twins of the encoder graphs ort-cuda loads (novic.export.u8: the
    fused one of each precision, else the plain one), each kept only if it passes its gate.
    Returns {"path", "seconds", "timings": {step: seconds}, "artifacts": [(file, size)] (graphs and
    weight files, each once), "manifest": {...}}.
    `fail_after` (tests): raise after the named step to exercise the no-half-bundle guarantee.
    `wordnet_dir`: the WordNet database for the noun hierarchy (default /usr/share/wordnet)."""
    import onnx
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from novic.export.decoder_onnx import export_decoder
    from novic.export.encoder_onnx import export_encoder, tower_image_size
    from novic.model.checkpoint import load_checkpoint
    from novic.model.embedder import with_weights_file

    console = console or Console(stderr=True)
    start = time.perf_counter()
    timings: dict[str, float] = {}
    if not 1 <= beam_width <= topk:
        raise ExportError(f"beam width {beam_width} must be in [1, topk={topk}] (free beam search reads "
                          f"the graph's top-k); raise --topk")
    steps = ["checkpoint", "CLIP model", "image encoder", "decoder"] + (["fp16 encoder", "fp16 decoder"] if fp16 else []) \
        + (["fused graphs"] if fused else []) + (["u8 encoders"] if u8 else []) + ["noun hierarchy", "manifest"]

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=False) as progress, \
            StagedBundle(out_dir, overwrite) as stage:
        task = progress.add_task("export", total=len(steps))
        root = stage.tmp

        def run(name, fn):
            progress.update(task, description=f"{name}...")
            t0 = time.perf_counter()
            result = fn()
            timings[name] = round(time.perf_counter() - t0, 2)
            progress.console.print(f"  {name}: {timings[name]:.1f} s", highlight=False)
            progress.advance(task)
            if fail_after == name:
                raise ExportError(f"failing after {name} as asked (test)")
            return result

        ckpt = run("checkpoint", lambda: load_checkpoint(checkpoint_path))
        spec = ckpt.embedder
        if clip or pretrained:
            spec = with_weights_file(spec, pretrained, clip)
        given_tok = _given_tokenizer(tokenizer, ckpt.token_table) if tokenizer is not None else None
        cfg = ckpt.config
        if spec.pretrained is None and not spec.config_file and ":" not in spec.model:
            progress.console.print(f"[yellow]note:[/] {spec.model} has no pretrained weights in this spec, so the "
                                   "image encoder gets random weights (fine for tests); pass --pretrained TAG|PATH "
                                   "for a usable bundle", highlight=False)
        # The text tokenizer is loaded only for its file: CLIP BPE ships with open_clip.
        need_text = given_tok is None and ckpt.token_table.kind != "clip_bpe"
        embedder, tok_warning = run("CLIP model", lambda: _load_embedder(spec, progress.console, need_text))
        size = tower_image_size(embedder.visual)
        with torch.no_grad():
            probe_out = embedder.visual(torch.zeros(1, 3, *size))
        if probe_out.shape[-1] != cfg.embed_dim:
            raise ExportError(f"{spec.model} gives {probe_out.shape[-1]}-d image embeddings but the decoder "
                              f"in {checkpoint_path} expects {cfg.embed_dim}; use the checkpoint's own CLIP model")

        enc = run("image encoder", lambda: export_encoder(embedder.model, root))
        model = ckpt.build_model()
        dec = run("decoder", lambda: export_decoder(model, root, topk=topk))
        exports = [(enc, "image_encoder", "fp32", "plain"), (dec["prefill"], "decoder_prefill", "fp32", "plain"),
                   (dec["step"], "decoder_step", "fp32", "plain")]
        if fp16:
            from novic.export.fp16 import decoder_fp16, encoder_fp16
            enc16 = run("fp16 encoder", lambda: encoder_fp16(enc))
            dec16 = run("fp16 decoder", lambda: decoder_fp16(dec))
            exports += [(enc16, "image_encoder", "fp16", "plain"), (dec16["prefill"], "decoder_prefill", "fp16", "plain"),
                        (dec16["step"], "decoder_step", "fp16", "plain")]
        fused_gates = None
        if fused:
            from novic.export.fused import export_fused
            nouns = [[t for t in toks if t != 0] for n, toks in zip(ckpt.nouns or [], ckpt.noun_tokens or []) if n]
            say = lambda line: progress.console.print(f"  {line}", highlight=False)  # noqa: E731
            kept, fused_gates = run("fused graphs", lambda: export_fused(
                enc, dec, cfg, fp16=fp16, noun_tokens=nouns or None, width=beam_width, say=say))
            exports += [(e, role, prec, "fused") for e, role, prec in kept]
        u8_gates = None
        if u8:
            from novic.export.u8 import U8_PIXELS, export_u8
            say = lambda line: progress.console.print(f"  {line}", highlight=False)  # noqa: E731
            encoders = {}   # precision -> the encoder ort-cuda loads: fused where it was kept, else plain
            for e, role, prec, variant in exports:
                if role == "image_encoder" and (prec not in encoders or variant == "fused"):
                    encoders[prec] = (e, prec, variant)
            kept, u8_gates = run("u8 encoders", lambda: export_u8(list(encoders.values()), embedder.preprocess, say))
            exports += [(e, "image_encoder", prec, variant, U8_PIXELS) for e, prec, variant in kept]

        noun_texts = [n for n in ckpt.nouns if n] if ckpt.nouns is not None and ckpt.noun_tokens is not None else None
        hierarchy = run("noun hierarchy", lambda: _hierarchy_entry(root, noun_texts, wordnet_dir, progress.console))

        def manifest():
            tok_src = given_tok or tokenizer_file(embedder, ckpt.token_table)
            tok_entry = None
            if tok_src is not None:
                (root / TOKENIZER_DIR).mkdir(exist_ok=True)
                dst = root / TOKENIZER_DIR / tok_src.name
                shutil.copyfile(tok_src, dst)
                tok_entry = {**file_entry(root, dst), "kind": ckpt.token_table.kind, "clean": ckpt.token_table.clean}
            nouns = None
            guided_max = guided_root = None
            if ckpt.nouns is not None and ckpt.noun_tokens is not None:
                pairs = [(n, [t for t in toks if t != 0]) for n, toks in zip(ckpt.nouns, ckpt.noun_tokens) if n]
                nouns = {"count": len(pairs), "text": [p[0] for p in pairs], "tokens": [p[1] for p in pairs],
                         "eos_terminated": False}
                guided_max, guided_root = _guided_widths(nouns["tokens"]) if pairs else (None, None)
            return {
                "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "novic_version": _novic_version(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "embedder": {"spec": spec.to_dict(), "embed_dim": cfg.embed_dim, "image_size": list(size),
                             "preprocess": embedder.preprocess},
                "decoder": cfg.to_dict(),
                "search": {"topk": topk, "beam_width": beam_width, "temperature": 1.0, "length_alpha": 0.0,
                           "guided": nouns is not None, "guided_max_cands": guided_max,
                           "guided_root_cands": guided_root},
                "tokens": ckpt.token_table.to_dict(),
                "nouns": nouns,
                "tokenizer": tok_entry,
                "hierarchy": hierarchy,
                "artifacts": [artifact_entry(root, *entry) for entry in exports],
                "engines": [],
                "export": {"checkpoint": str(Path(checkpoint_path).absolute()),
                           "checkpoint_sha256": sha256_file(checkpoint_path),
                           "opset": dec.get("opset"), "torch": torch.__version__, "onnx": onnx.__version__,
                           "tokenizer_note": tok_warning, "timings": timings,
                           **({"fused_gates": fused_gates} if fused_gates is not None else {}),
                           **({"u8_gates": u8_gates} if u8_gates is not None else {})},
            }

        data = run("manifest", manifest)
        data["export"]["seconds"] = round(time.perf_counter() - start, 2)
        path = stage.commit(data)
        progress.update(task, description=f"bundle written to {path}")
    seconds = round(time.perf_counter() - start, 2)
    files = {}   # every graph and weight file once (a u8 twin reads its float graph's weights)
    for a in data["artifacts"]:
        for f in [a, *a.get("external_data", [])]:
            files.setdefault(f["file"], f["size"])
    return {"path": str(path), "seconds": seconds, "timings": timings, "artifacts": list(files.items()),
            "manifest": data}


# --- check: bundle graphs vs the PyTorch oracle -----------------------------------------------------
def _sample_images(n_random: int, size, seed: int = 0):
    """A few real photos (scikit-image ships some, if installed) + random-noise images (PIL)."""
    import numpy as np
    from PIL import Image

    images = []
    try:
        from skimage import data as skdata
        for name in ("astronaut", "chelsea", "coffee"):
            images.append((name, Image.fromarray(getattr(skdata, name)()).convert("RGB")))
    except Exception:  # noqa: BLE001 - optional dev dependency
        pass
    rng = np.random.default_rng(seed)
    for i in range(n_random):
        arr = rng.integers(0, 256, (size[0] + 17 * i, size[1] + 9 * i, 3), dtype=np.uint8)
        images.append((f"noise{i}", Image.fromarray(arr)))
    return images


def check_bundle(bundle_dir, *, n: int = 200, checkpoint=None, beam_width: int | None = None,
                 precisions=None, n_images: int = 2, seed: int = 0, reference: bool = False,
                 console=None) -> dict:
    """Compare the bundle's graphs with the PyTorch oracle; print a table; return the numbers.

    Decoder: N random unit embeddings; max |logprob| error of the prefill top-k, and token
    agreement of greedy, beam and guided beam (over the bundle's nouns) decoding: the runtime
    search over onnxruntime vs the same search over the PyTorch decoder (novic.model.session), or
    vs novic.model.reference's full-recompute decoders with `reference=True` (much slower).
    Encoder: real photos (scikit-image) + noise images, batch 1 and batch > 1; cosine and max abs
    error against open_clip's image tower.
    "ok" is False when an fp32 graph misses its gate (identical tokens, cosine >= 0.99999); fp16
    graphs are reported (gate: cosine >= 0.999) but only warn."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from rich.console import Console

    from novic.export.parity import (FP16_COS, FP32_COS, agreement, random_unit_embeddings, search_tokens,
                                     token_lists)
    from novic.model.checkpoint import load_checkpoint
    from novic.model.embedder import EmbedderSpec
    from novic.runtime.backends.ort import OrtDecoderSession, OrtImageEncoder
    from novic.runtime.trie import TokenTrie

    console = console or Console(stderr=True)
    bundle = Bundle.open(bundle_dir, verify="eager")
    ckpt_path = Path(checkpoint or bundle.manifest.get("export", {}).get("checkpoint", ""))
    if not checkpoint and not ckpt_path.is_file():
        raise BundleError(f"{bundle.path}: the checkpoint it was exported from ({ckpt_path}) is not found; "
                          "pass --checkpoint CKPT")
    ckpt = load_checkpoint(ckpt_path)
    if ckpt.config != bundle.decoder_config:
        raise BundleError(f"{ckpt_path} has decoder config {ckpt.config} but the bundle {bundle.decoder_config}; "
                          "pass the checkpoint the bundle was exported from")
    model = ckpt.build_model()
    cfg = bundle.decoder_config
    width = beam_width or bundle.search_defaults.get("beam_width", DEFAULT_BEAM_WIDTH)
    trie = TokenTrie(bundle.noun_tokens) if bundle.noun_tokens else None
    embeds = random_unit_embeddings(n, cfg.embed_dim, seed)
    rows, results = [], {"decoder": {}, "encoder": {}, "ok": True}

    if reference:
        from novic.model import reference as ref
        x = torch.from_numpy(embeds)
        oracle = {"greedy": [[tuple(h.tokens)] for h in ref.greedy_decode(model, x)],
                  "beam": token_lists(ref.beam_search(model, x, width=width))}
        if trie is not None:
            oracle["guided"] = token_lists(ref.beam_search(model, x, width=width, trie=trie))
    else:
        from novic.model.session import TorchDecoderSession
        oracle = search_tokens(TorchDecoderSession(model, topk=bundle.graph_topk), embeds, width, trie)
    with torch.no_grad():
        ref_lp = torch.log_softmax(model.prefill(torch.from_numpy(embeds))[0].float(), -1)
        ref_lp[:, 0] = float("-inf")

    def graphs(role):   # (precision, variant) pairs to check: the plain graphs, then the fused ones
        return [(p, v) for v in ("plain", "fused") for p in bundle.precisions(role, v)]

    for precision, variant in graphs("decoder_step"):
        if precisions is not None and precision not in precisions:
            continue
        session = OrtDecoderSession(bundle.artifact_path("decoder_prefill", precision, variant),
                                    bundle.artifact_path("decoder_step", precision, variant), cfg, provider="cpu")
        name = precision if variant == "plain" else f"{precision} {variant}"
        out = session.prefill(embeds, 1.0, np.zeros((n, 1), np.int64))
        err = float(np.abs(out.topk_logprobs - ref_lp.gather(1, torch.from_numpy(out.topk_ids)).numpy()).max())
        top1 = float(np.mean(out.topk_ids[:, 0] == ref_lp.argmax(1).numpy()))
        agree, best = agreement(search_tokens(session, embeds, width, trie), oracle)
        ok = precision != "fp32" or all(v == 1.0 for v in agree.values())
        results["ok"] &= ok
        results["decoder"][name] = {"max_abs_logprob_err": err, "top1_first_token": top1,
                                    "agreement": agree, "best_agreement": best}
        rows.append((f"decoder {name}", f"{err:.1e}", f"top-1 {top1:.1%}", f"{agree['greedy']:.1%}",
                     f"{best['beam']:.1%} / {agree['beam']:.1%}",
                     f"{best['guided']:.1%} / {agree['guided']:.1%}" if "guided" in agree else "-",
                     "PASS" if ok else "FAIL"))

    spec = EmbedderSpec.from_dict(bundle.embedder["spec"])
    embedder, _ = _load_embedder(spec, console)
    transform = embedder.image_transform()
    images = _sample_images(n_images, bundle.embedder.get("image_size", bundle.preprocess.get("size", [224, 224])))
    pixels = torch.stack([transform(img) for _, img in images])
    with torch.no_grad():
        ref_emb = F.normalize(embedder.visual(pixels).float(), dim=-1).numpy()
    for precision, variant in graphs("image_encoder"):
        encoder = OrtImageEncoder(bundle.artifact_path("image_encoder", precision, variant), provider="cpu")
        name = precision if variant == "plain" else f"{precision} {variant}"
        got = np.concatenate([encoder(pixels[i:i + 1].numpy()) for i in range(len(images))]
                             + [encoder(pixels.numpy())])
        ref = np.concatenate([ref_emb, ref_emb])  # batch 1 and batch > 1
        cos = float((np.sum(got * ref, 1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))).min())
        err = float(np.abs(got - ref).max())
        ok = cos >= (FP32_COS if precision == "fp32" else FP16_COS)
        if precision == "fp32":
            results["ok"] &= ok
        results["encoder"][name] = {"min_cosine": cos, "max_abs_err": err, "images": [i for i, _ in images]}
        rows.append((f"image encoder {name}", f"{err:.1e}", f"cos {cos:.6f}", "", "", "",
                     "PASS" if ok else ("WARN" if precision != "fp32" else "FAIL")))

    what = "reference decoders" if reference else "PyTorch decoder"
    console.print(f"{bundle.path} vs the {what}: {n} random unit embeddings, beam {width}, {len(images)} images",
                  highlight=False, soft_wrap=True)
    for graph, err, first, greedy, beam, guided, gate in rows:
        if graph.startswith("decoder"):
            line = (f"  {graph:<20} max |d logp| {err}  first token {first}  greedy {greedy}  "
                    f"beam best/all {beam}  guided best/all {guided}")
        else:
            line = f"  {graph:<20} max |d| {err}  {first}  (batch 1 and {len(images)})"
        color = {"PASS": "green", "WARN": "yellow", "FAIL": "bold red"}[gate]
        console.print(f"{line}  [{color}]{gate}[/]", highlight=False, soft_wrap=True)
    return results
