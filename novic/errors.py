"""Errors whose message is meant for the user: one line naming the input and the fix."""
import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def printable(text: str) -> str:
    """`text` safe for one terminal line and for JSON as UTF-8: bytes of a file name that are not
    UTF-8 (kept by Python as lone surrogates) and control characters (a newline, an escape
    sequence planted in a file name) become \\xNN escapes."""
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:   # other lone surrogates
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class NovicError(Exception):
    """Base class: the CLI prints the message alone, without a traceback."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (libraries often add paragraphs), or its type."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# Messages name options the way their reader passes them: `guided=False` to a Python caller,
# `--free` to a console script's user. A console script's command runs under `cli_voice`.
_cli_depth = 0


def option(api: str, cli: str) -> str:
    """`api` (the Python spelling, e.g. "guided=False"), or `cli` ("--free") while a console
    script's command runs (see `cli_voice`)."""
    return cli if _cli_depth else api


def cli_voice(command):
    """Decorator for a console script's command: messages raised while it runs use `option`'s CLI
    spelling. Process-wide on purpose: a command's worker threads raise messages too."""
    import functools

    @functools.wraps(command)
    def run(*args, **kwargs):
        global _cli_depth
        _cli_depth += 1
        try:
            return command(*args, **kwargs)
        finally:
            _cli_depth -= 1

    return run
