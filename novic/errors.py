"""Errors whose message is meant for the user: one line naming the input and the fix."""


class NovicError(Exception):
    """Base class: the CLI prints the message alone, without a traceback."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (libraries often add paragraphs), or its type."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
