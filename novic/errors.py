"""Errors whose message is meant for the user: one line naming the input and the fix."""


class NovicError(Exception):
    """Base class: the CLI prints the message alone, without a traceback."""
