"""Small helpers shared by the console scripts."""
from __future__ import annotations

import sys

from rich.console import Console
from rich.markup import escape

err = Console(stderr=True)


def fail(message: str, code: int = 1) -> "NoReturn":  # noqa: F821
    """One clear line on stderr, no traceback."""
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise SystemExit(code)


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
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
