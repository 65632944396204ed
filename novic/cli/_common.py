"""Small helpers shared by the console scripts.

Exit codes, in every console script: 0 done; 1 an input or the work failed (a file, an image, a
bundle, the environment); 2 a usage error (an option's value or a combination of options cannot be
used; nothing was run), as typer itself answers a malformed option. 130 interrupted."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import List, NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape

from novic.errors import printable  # noqa: F401 (the CLIs import it from here too)
from novic.runtime.backends.select import AUTO, BACKENDS

err = Console(stderr=True)

# Choices checked by typer itself, so that a bad value is a usage error (exit code 2) in every
# console script. The precisions are novic.runtime.bundle.PRECISIONS (not imported: it would load
# numpy for --help; a test compares them).
Backend = Enum("Backend", {name: name for name in (AUTO, *BACKENDS)}, type=str)
Precision = Enum("Precision", {name: name for name in ("fp32", "fp16", "int8", "fp8")}, type=str)


def choice(value):
    """The string of a Backend/Precision option (None stays None)."""
    return value.value if isinstance(value, Enum) else value


def vocab_flag(default: str = "the bundle's"):
    """The --vocab option of the commands that decode guided (read it with `parse_vocab`)."""
    return typer.Option(None, "--vocab", metavar="FILE|NOUNS",
                        help="Nouns for guided decoding: a text file with one noun per line, or nouns separated by "
                             f"commas ('cat,dog'); repeated, the nouns of all are used (default: {default}).")


def parse_vocab(values: Optional[List[str]], guided: bool):
    """--vocab values -> what Classifier takes: None (the bundle's nouns), one file's path, or the
    nouns of all values in order (files, and comma-separated nouns). A usage error (exit 2) names
    the value that cannot be used."""
    if not values:
        return None
    if not guided:
        fail("--vocab restricts guided decoding; drop --vocab or --free", code=2)
    if len(values) == 1 and os.path.exists(values[0]):
        return values[0]   # the classifier names the file in its messages and caches it by mtime
    from novic.runtime.classifier import ClassifierError, read_vocab_file, split_nouns

    nouns = []
    for value in values:
        if os.path.exists(value):
            try:
                nouns += read_vocab_file(value)
            except ClassifierError as exc:
                fail(f"--vocab {exc}", code=2)
        elif "," in value:
            nouns += split_nouns(value)
        else:
            fail(f"--vocab {value}: no such file; give a text file with one noun per line, or nouns "
                 f"separated by commas (--vocab 'cat,dog')", code=2)
    return nouns


def max_pixels_option():
    """--max-pixels, in the commands that read image files (novic-run, novic-label)."""
    return typer.Option(None, "--max-pixels", min=1, help="Pillow's decompression-bomb limit "
                        "(PIL.Image.MAX_IMAGE_PIXELS, default ~89 M): images over twice it are refused.")


# --granularity / --roll-up, in every command that labels images (novic.runtime.hierarchy).
GRANULARITY_HELP = ("Label level: fine (as decoded), basic (dog, tree, car) or coarse (animal, plant, vehicle); "
                    "needs the bundle's noun hierarchy (docs/labels.md).")
ROLL_UP_HELP = ("File of target labels, one per line: each label rolls up to its nearest listed ancestor "
                "(instead of --granularity).")


def granularity_option(help: str = GRANULARITY_HELP):
    return typer.Option("fine", "--granularity", "-g", help=help)


def roll_up_option(help: str = ROLL_UP_HELP):
    return typer.Option(None, "--roll-up", help=help)


def granularity_level(granularity: str, roll_up: Path | None):
    """--granularity and --roll-up -> the `granularity` the Classifier takes (a level or the file);
    a bad level, or both options, is a usage error (exit 2). The level is checked here, not by typer,
    so that the error is one line."""
    from novic.runtime.hierarchy import GRANULARITIES

    if granularity not in GRANULARITIES:
        fail(f"--granularity {granularity!r}: use {', '.join(GRANULARITIES[:-1])} or {GRANULARITIES[-1]} "
             f"(or --roll-up FILE)", code=2)
    if roll_up is not None and granularity != "fine":
        fail("--roll-up replaces --granularity; pass one of them", code=2)
    return roll_up if roll_up is not None else granularity


def error_line(message: str) -> None:
    """One error line on stderr, `message` shown as is (no rich markup: names may hold [brackets])."""
    err.print(f"[bold red]error:[/] {escape(printable(message))}", highlight=False, soft_wrap=True)


def fail(message: str, code: int = 1) -> "NoReturn":  # noqa: F821
    """One clear line on stderr, no traceback."""
    error_line(message)
    raise SystemExit(code)


def os_error_line(exc: OSError) -> str:
    """"PATH: Permission denied; check the path and its permissions" for an OSError."""
    where = exc.filename if exc.filename is not None else ""
    what = exc.strerror or str(exc)
    return f"{where}: {what}; check the path and its permissions, or choose another location" if where else \
        f"{what}; check the paths given and their permissions"


# Packages that only the training/export extras bring; a runtime-only install (novic[cpu]) lacks them.
HEAVY_MODULES = ("torch", "torchvision", "open_clip", "onnx", "onnxscript", "safetensors", "timm")


def missing_extra_line(exc: ImportError, extra: str) -> str | None:
    """"novic-export needs torch, which is not installed: pip install 'novic[export]' ..." for an
    ImportError of a package that `extra` brings; None for any other ImportError."""
    name = (getattr(exc, "name", None) or "").split(".")[0]
    if name not in HEAVY_MODULES:
        return None
    prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "this command"
    return (f"{prog} needs {name}, which is not installed (a runtime-only install runs bundles only): "
            f"pip install 'novic[{extra}]' (README \"Install\")")


@contextmanager
def one_line_errors(*also: type, extra: str | None = None):
    """Errors that carry a clear message become one error line and exit code 1, no traceback:
    novic's own (NovicError), an OSError (a missing or unwritable path), the `also` types that
    a console script knows to be its users' mistakes (their messages folded onto one line), and,
    given the `extra` that brings a command's heavy packages, a missing torch/open_clip/onnx."""
    from novic.errors import NovicError

    try:
        yield
    except ImportError as exc:
        line = missing_extra_line(exc, extra) if extra else None
        if line is None and not isinstance(exc, also):
            raise
        fail(line or " ".join(str(exc).split()))
    except NovicError as exc:
        fail(str(exc))
    except OSError as exc:   # e.g. an output path that cannot be written: one line naming it
        own_words = exc.filename is None and isinstance(exc, also)   # raised by novic with the fix in it
        fail(" ".join(str(exc).split()) if own_words else os_error_line(exc))
    except also as exc:
        fail(" ".join(str(exc).split()))


def run_app(app, *also: type, extra: str | None = None) -> None:
    """Run a typer app under `one_line_errors(*also, extra=extra)`; a KeyboardInterrupt that typer
    lets through is one line and exit code 130."""
    try:
        with one_line_errors(*also, extra=extra):
            app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
