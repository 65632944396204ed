"""Small helpers shared by the console scripts."""
from __future__ import annotations

import sys

from rich.console import Console
from rich.markup import escape

err = Console(stderr=True)


def printable(text: str) -> str:
    """`text` as valid UTF-8 for the terminal and JSON: bytes of a file name that are not UTF-8
    (which Python keeps as lone surrogates) become \\xNN escapes."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:   # other lone surrogates
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def fail(message: str, code: int = 1) -> "NoReturn":  # noqa: F821
    """One clear line on stderr, no traceback."""
    err.print(f"[bold red]error:[/] {escape(printable(message))}", highlight=False, soft_wrap=True)
    raise SystemExit(code)


def os_error_line(exc: OSError) -> str:
    """"PATH: Permission denied; check the path and its permissions" for an OSError."""
    where = exc.filename if exc.filename is not None else ""
    what = exc.strerror or str(exc)
    return f"{where}: {what}; check the path and its permissions, or choose another location" if where else \
        f"{what}; check the paths given and their permissions"


def not_yet(what: str, issue: int) -> "NoReturn":  # noqa: F821
    err.print(f"{what} is not implemented yet (planned in issue #{issue}).", highlight=False,
              soft_wrap=True)
    raise SystemExit(2)


def run_app(app) -> None:
    """Run a typer app; errors that carry a clear message become one line and exit code 1."""
    from novic.errors import NovicError

    try:
        app()
    except NovicError as exc:
        fail(str(exc))
    except OSError as exc:   # e.g. an output path that cannot be written: one line, not a traceback
        fail(os_error_line(exc))
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
