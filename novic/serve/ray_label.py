"""`novic-label INPUT... --out OUT`: label an image collection on Ray Data (`pip install 'novic[ray]'`).

    from novic.serve.ray_label import label
    summary = label(["photos/", "more/*.jpg", "list.txt"], "labels/", bundle="bundle/", concurrency=2)

The pipeline: the paths still to do (inputs minus what OUT already holds) -> decode + preprocess in
CPU tasks -> classify in an actor pool (`concurrency` actors, one Classifier each, `gpus_per_worker`
GPUs each) -> the driver writes the rows to OUT in parts. Inputs: directories (their whole tree),
glob patterns, and list files (*.txt / *.lst: one path or URI per line, relative paths taken from
the list's directory). A URI (s3://, gs://, file://...) is read with pyarrow's filesystems, the ones
Ray Data itself reads.

OUT is a directory of parts, `part-RUN-NNNNNN.jsonl` or `.parquet`, each written atomically (temp
file + rename), with one row per image: path, labels (best first), probs, logprobs, error (null, or
one line: an unreadable image is an error row, never a failed job), granularity, and, at a
granularity other than fine, fine and paths (per label, as "fine" and "path" of novic-run --json;
null at fine). A rerun with the same OUT skips the paths already in it, so a job killed at any point
(a worker, the driver) is resumed by running it again: complete output, no duplicates; it must ask
for the granularity OUT holds (one OUT, one level). Rows are in completion order, not input order.
"""
from __future__ import annotations

import io
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from novic.errors import NovicError, printable
from novic.inputs import expand_inputs

FORMATS = ("jsonl", "parquet")
LIST_SUFFIXES = (".txt", ".lst")
PART_ROWS = 1024        # rows per part: a killed driver loses at most this much work
PART_SECONDS = 30.0     # ... or this much time, whichever comes first


class LabelError(NovicError):
    """A bad input list, output directory or option; one line with the fix."""


class OptionsError(LabelError):
    """Search options the bundle cannot use (for novic-label, a usage error: exit code 2)."""


@dataclass
class LabelSummary:
    inputs: int          # distinct images named by the inputs
    already_done: int    # skipped: OUT held them from an earlier run
    labelled: int        # rows written by this run
    failed: int          # of those, error rows
    seconds: float
    problems: list       # input arguments that named nothing

    @property
    def rate(self) -> float:
        return self.labelled / self.seconds if self.seconds > 0 else float("inf")


# ---- inputs -------------------------------------------------------------------------------
def _is_uri(text: str) -> bool:
    return "://" in text


def expand(inputs: Sequence[str]) -> tuple[list[str], list[str]]:
    """INPUT arguments -> (distinct image paths/URIs in order, one line per argument that named
    nothing). Local paths are made absolute, so that a rerun from another directory resumes."""
    paths, problems, seen = [], [], set()

    def add(item: str):
        item = item if _is_uri(item) else os.path.abspath(item)
        if item not in seen:
            seen.add(item)
            paths.append(item)

    for arg in inputs:
        if _is_uri(arg):
            add(arg)
        elif arg.endswith(LIST_SUFFIXES) and os.path.isfile(arg):
            listed = _read_list(arg)
            if not listed:
                problems.append(f"{arg}: list file names no images; put one path per line")
            for item in listed:
                add(item)
        else:
            found, missed = expand_inputs([arg], recursive=True)
            problems += missed
            for item in found:
                add(item)
    return paths, problems


def _read_list(path: str) -> list[str]:
    base = os.path.dirname(os.path.abspath(path))
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelError(f"{path}: cannot read the list file ({exc}); save it as UTF-8, one path per line") from None
    items = [line.strip() for line in lines]
    return [i if _is_uri(i) else os.path.join(base, i) for i in items if i and not i.startswith("#")]


# ---- the output directory -------------------------------------------------------------------
def _parts(out: Path, fmt: str) -> list[Path]:
    return sorted(out.glob(f"part-*.{fmt}"))


def open_output(out: str | os.PathLike, fmt: str, granularity: str = "fine") -> tuple[Path, set[str]]:
    """Create OUT or take it up again: -> (OUT, the paths its parts already hold). Temp files of a
    killed run are removed; parts of the other format, or rows of another granularity, are refused
    (one OUT, one format, one level)."""
    if fmt not in FORMATS:
        raise LabelError(f"format {fmt!r}: use {' or '.join(FORMATS)}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LabelError(f"{out}: exists and is not a directory; --out names a directory of parts")
    out.mkdir(parents=True, exist_ok=True)
    other = [f for f in FORMATS if f != fmt and _parts(out, f)]
    if other:
        raise LabelError(f"{out}: holds {other[0]} parts from an earlier run; use --format {other[0]} "
                         f"or another --out")
    for stale in out.glob(".part-*.tmp*"):   # a part a killed driver did not finish
        stale.unlink(missing_ok=True)
    done: set[str] = set()
    for part in _parts(out, fmt):
        paths, levels = _read_part_paths(part, fmt)
        other = next((level for level in levels if level != granularity), None)
        if other is not None:
            raise LabelError(f"{out}: holds labels at granularity {other!r} from an earlier run; ask for that "
                             f"granularity again (--granularity, or --roll-up FILE) or use another --out")
        done.update(paths)
    return out, done


def _read_part_paths(part: Path, fmt: str) -> tuple[list[str], set[str]]:
    """A part's paths and the granularities of its rows (parts older than the column: fine)."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        columns = [c for c in ("path", "granularity") if c in pq.read_schema(part).names]
        table = pq.read_table(part, columns=columns)
        levels = set(table.column("granularity").to_pylist()) if "granularity" in columns else {"fine"}
        return table.column("path").to_pylist(), levels
    with open(part, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r["path"] for r in rows], {r.get("granularity", "fine") for r in rows}


def read_output(out: str | os.PathLike) -> list[dict]:
    """Every row of OUT (either format), for checks and for users' scripts."""
    out = Path(out)
    rows = []
    for part in _parts(out, "jsonl"):
        with open(part, encoding="utf-8") as f:
            rows += [json.loads(line) for line in f if line.strip()]
    if _parts(out, "parquet"):
        import pyarrow.parquet as pq

        for part in _parts(out, "parquet"):
            rows += pq.read_table(part).to_pylist()
    return rows


class _PartWriter:
    """Collects rows and writes them as numbered parts, each atomically (novic.atomic)."""

    def __init__(self, out: Path, fmt: str, part_rows: int = PART_ROWS):
        self.out, self.fmt, self.part_rows = out, fmt, part_rows
        self.run = f"{time.strftime('%Y%m%d%H%M%S')}-{secrets.token_hex(3)}"
        self.rows: list[dict] = []
        self.count = 0
        self.since = time.monotonic()

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if len(self.rows) >= self.part_rows or time.monotonic() - self.since > PART_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            path = self.out / f"part-{self.run}-{self.count:06d}.{self.fmt}"
            _write_part(path, self.rows, self.fmt)
            self.count += 1
        self.rows, self.since = [], time.monotonic()


def _write_part(path: Path, rows: list[dict], fmt: str) -> None:
    from novic.atomic import atomic_path, write_bytes_atomic

    if fmt == "jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        write_bytes_atomic(path, text.encode("utf-8"))
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pylist(rows, schema=row_schema()), tmp)


def row_schema():
    """The columns of a part (Parquet; a JSONL row has the same keys)."""
    import pyarrow as pa

    return pa.schema([("path", pa.string()), ("labels", pa.list_(pa.string())),
                      ("probs", pa.list_(pa.float64())), ("logprobs", pa.list_(pa.float64())),
                      ("error", pa.string()), ("granularity", pa.string()), ("fine", pa.list_(pa.string())),
                      ("paths", pa.list_(pa.list_(pa.string())))])


# ---- the Ray Data stages -----------------------------------------------------------------
def _open_source(path: str) -> Any:
    """A local path as is (load_image names it); a URI as a file object named by it, read through
    pyarrow's filesystems."""
    if not _is_uri(path):
        return path
    from pyarrow import fs

    try:
        filesystem, inner = fs.FileSystem.from_uri(path)
        with filesystem.open_input_stream(inner) as stream:
            data = io.BytesIO(stream.read())
    except Exception as exc:  # noqa: BLE001 - the image's own error row, like a missing local file
        data = io.BytesIO(b"")
        data.read_error = f"cannot read ({type(exc).__name__}: {exc})"
    data.name = path
    return data


def decode_batch(batch: dict, preprocess_config: Any, fast_decode: bool, max_pixels: int | None = None) -> dict:
    """CPU task: a batch of paths -> resized, cropped uint8 pixels (a quarter of the bytes through
    Ray's object store; Classifier.classify_pixels normalises them for a float encoder) + one error
    text per row ('' = fine). `max_pixels`: Pillow's decompression-bomb limit for this batch (None:
    Pillow's own)."""
    import numpy as np
    from PIL import Image

    from novic.runtime.preprocess import Preprocessor

    paths = [str(p) for p in batch["path"]]
    sources = [_open_source(p) for p in paths]
    default_limit = Image.MAX_IMAGE_PIXELS
    if max_pixels is not None:   # a module global: set for this batch only (a worker runs other tasks)
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        pixels, errors = Preprocessor(preprocess_config, threads=1, fast_decode=fast_decode,
                                       uint8=True).load_batch(sources)
    finally:
        Image.MAX_IMAGE_PIXELS = default_limit
    texts = []
    for source, error in zip(sources, errors):
        why = getattr(source, "read_error", None)
        texts.append(f"{source.name}: {why}" if why else ("" if error is None else str(error)))
    return {"path": np.array(paths, dtype=object), "pixels": pixels, "error": np.array(texts, dtype=object)}


class Classify:
    """Actor: one Classifier; a decoded batch -> output rows (an Arrow table)."""

    def __init__(self, bundle: str, load: dict, options: dict, granularity_name: str):
        from novic.runtime.classifier import Classifier

        self.clf = Classifier.load(bundle, verify="cached", **load)
        self.options = options
        self.granularity = granularity_name     # what the rows say

    def __call__(self, batch: dict):
        import numpy as np
        import pyarrow as pa


        paths, errors = [str(p) for p in batch["path"]], [str(e) for e in batch["error"]]
        good = [i for i, e in enumerate(errors) if not e]
        results = self.clf.classify_pixels(np.asarray(batch["pixels"])[good], [paths[i] for i in good],
                                           **self.options)
        by_row = dict(zip(good, results))
        rows, rolled = [], self.granularity != "fine"
        for i, path in enumerate(paths):
            labels = by_row[i].to_json()["labels"] if i in by_row else []
            rows.append({"path": path, "labels": [l["text"] for l in labels],
                         "probs": [l["prob"] for l in labels], "logprobs": [l["logprob"] for l in labels],
                         "error": printable(errors[i]) if errors[i] else None, "granularity": self.granularity,
                         "fine": [l["fine"] for l in labels] if rolled else None,
                         "paths": [l["path"] for l in labels] if rolled else None})
        return pa.Table.from_pylist(rows, schema=row_schema())


# ---- the job ------------------------------------------------------------------------------
def label(inputs: Sequence[str], out: str | os.PathLike, *, bundle: str | os.PathLike, fmt: str = "jsonl",
          concurrency: int = 1, gpus_per_worker: float = 0, cpus_per_worker: float = 1, batch_size: int = 32,
          backend: str = "auto", precision: str | None = None, fast_decode: bool = False,
          max_pixels: int | None = None, topk: int = 5, guided: bool = True, vocab: Any = None, beam_width: int = 10,
          temperature: float = 1.0, alpha: float = 0.0, granularity: Any = None, address: str | None = None,
          num_cpus: int | None = None, part_rows: int = PART_ROWS,
          on_row: Callable[[dict], None] | None = None) -> LabelSummary:
    """Label every image named by `inputs` into OUT (see the module docstring); resumable.
    `granularity`: fine (None), basic, coarse, or a file of target labels (as `Classifier.classify`).
    `max_pixels`: Pillow's decompression-bomb limit in the decode tasks (novic-run --max-pixels).
    `part_rows`: rows per output part (what a killed driver can lose); `on_row` sees each row
    as it is written."""
    from novic.runtime.classifier import Classifier, ClassifierError
    from novic.runtime.hierarchy import HierarchyError
    from novic.runtime.request_options import check_request
    from novic.serve._ray import connect, require

    t0 = time.perf_counter()
    rdata = require("ray.data")   # a missing extra is said first, before any other work
    if concurrency < 1 or batch_size < 1 or part_rows < 1 or gpus_per_worker < 0 or cpus_per_worker <= 0:
        raise LabelError("--concurrency and --batch-size must be >= 1, --gpus-per-worker >= 0, "
                         "--cpus-per-worker > 0")
    bundle = os.path.abspath(os.fspath(bundle))
    granularity, level = _granularity(granularity)
    options = dict(topk=topk, guided=guided, vocab=vocab, beam_width=beam_width, temperature=temperature,
                   alpha=alpha, granularity=granularity)
    if isinstance(vocab, (str, os.PathLike)):
        options["vocab"] = os.path.abspath(os.fspath(vocab))   # the actors may not share our cwd
    # Bad options (and a bad bundle) fail here, once, with one line, not in every actor.
    with Classifier.load(bundle, backend="ort-cpu", threads=1) as probe:
        try:
            check_request(probe, **options)
        except (ClassifierError, HierarchyError) as exc:
            raise OptionsError(str(exc)) from None
        preprocess = probe.bundle.preprocess_config
    paths, problems = expand(inputs)
    out_dir, done = open_output(out, fmt, level)
    todo = [p for p in paths if p not in done]
    summary = LabelSummary(len(paths), len(paths) - len(todo), 0, 0, 0.0, problems)
    if not todo:
        summary.seconds = time.perf_counter() - t0
        return summary

    threads = max(1, int(cpus_per_worker))
    if num_cpus is None and not address:   # room for the decode tasks beside the actors
        num_cpus = max(os.cpu_count() or 1, int(concurrency * cpus_per_worker) + 1)
    connect(address, num_cpus=num_cpus)
    rdata.DataContext.get_current().enable_progress_bars = False
    blocks = max(1, min(len(todo) // batch_size, 10_000))
    ds = rdata.from_items([{"path": p} for p in todo], override_num_blocks=blocks)
    # Decoding runs in CPU tasks. Where the actors need no more than a task (a CPU-only pool), Ray
    # Data fuses the two stages into the actors, which saves copying the pixels between processes.
    ds = ds.map_batches(decode_batch, fn_args=(preprocess, fast_decode, max_pixels), batch_size=batch_size,
                        batch_format="numpy", num_cpus=1)
    load = dict(backend=backend, precision=precision, threads=threads, fast_decode=fast_decode)
    ds = ds.map_batches(Classify, fn_constructor_args=(bundle, load, options, level), batch_size=batch_size,
                        batch_format="numpy", compute=rdata.ActorPoolStrategy(size=concurrency),
                        num_cpus=cpus_per_worker,
                        num_gpus=gpus_per_worker)
    writer, written = _PartWriter(out_dir, fmt, part_rows), set(done)
    try:
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in table.to_pylist():
                if row["path"] in written:   # a task Ray ran twice (after a worker died) answers once
                    continue
                written.add(row["path"])
                writer.add(row)
                summary.labelled += 1
                summary.failed += row["error"] is not None
                if on_row is not None:
                    on_row(row)
    finally:
        writer.flush()   # what was labelled before an error or Ctrl-C is kept
    summary.seconds = time.perf_counter() - t0
    return summary


def _granularity(granularity: Any) -> tuple[Any, str]:
    """-> (what the actors hand the Classifier, what the rows say): a level as is; a file of target
    labels made absolute (the actors may not share our cwd), named by that path; a list as is."""
    from novic.runtime.hierarchy import GRANULARITIES

    if granularity is None or granularity in GRANULARITIES:
        return granularity, granularity or "fine"
    if isinstance(granularity, (list, tuple)):
        return list(granularity), "list: " + ", ".join(map(str, granularity))
    if isinstance(granularity, (str, os.PathLike)):
        path = os.path.abspath(os.fspath(granularity))
        return path, path
    return granularity, str(granularity)   # the Classifier's check says what is wrong with it


def summary_line(summary: LabelSummary, out: str) -> str:
    return (f"novic-label: {summary.labelled} labelled ({summary.failed} error rows), {summary.already_done} "
            f"already in {out}, {summary.inputs} in all; {summary.seconds:.1f} s ({summary.rate:.1f} img/s)")
