"""The one error type for bad input, so every command can report it as one line.

``InputError`` is what the library raises for a failure the user can fix: a missing, unreadable,
truncated or wrong-format file, a bad configuration, inconsistent metadata. Its message names the
file, record, line, key or field and says what was expected. ``adaface-jax`` prints it as

    adaface-jax <command>: error: <message>

with exit status 1 and no traceback (``--debug`` or ``ADAFACE_DEBUG=1`` shows one). Anything else
is a bug and keeps its traceback.

This module imports nothing heavy: ``data_pipeline`` uses it too.
"""
from __future__ import annotations


class InputError(ValueError):
    """Bad input that the user can fix; the message names the thing and what was expected."""


class ConfigError(InputError):
    """A configuration problem found before anything is compiled; the message names the field."""


def one_line(exc: BaseException) -> str:
    """A readable single line for an expected failure (OSError: 'file: reason'; multi-line messages
    joined with '; ')."""
    if isinstance(exc, OSError) and exc.strerror:
        where = exc.filename if exc.filename is not None else ""
        if exc.filename2 is not None:
            where = f"{where} -> {exc.filename2}"
        text = f"{where}: {exc.strerror}" if where else exc.strerror
    elif isinstance(exc, KeyError) and len(exc.args) == 1:
        text = str(exc.args[0])
    else:
        text = str(exc) or type(exc).__name__
    parts = [p.strip() for p in text.splitlines() if p.strip()]
    return "; ".join(parts) if parts else type(exc).__name__
