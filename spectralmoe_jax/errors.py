"""What the user did wrong, as opposed to a bug: the base of every error the entry point turns
into one line and exit status 1 (a bug keeps its traceback).

Each layer defines its own kind (`DataError` in data/, `ConversionError` in conversion/, ...) on
this base; this module imports nothing of the package, so every layer can use it.
"""

from __future__ import annotations

import difflib
import errno
from collections.abc import Iterable


class UserError(Exception):
    """Bad input, configuration or environment; the message names the file, key or value."""


class ConfigError(UserError, ValueError):
    """A key the run does not know, or a value it cannot use: names the key."""


def unknown_key(key: str, known: Iterable[str], where: str) -> str:
    """'unknown config key train.learning_rat; did you mean 'learning_rate'?'"""
    known = sorted(known)
    near = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
    hint = (f"did you mean {' or '.join(repr(n) for n in near)}?" if near
            else f"known keys: {', '.join(known)}")
    return f"unknown config key {where}.{key}; {hint}"


# The environment, not the code: a full disk or quota, a read-only or forbidden path.
ENVIRONMENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)


def environment_message(error: BaseException) -> str | None:
    """'/runs/x/metrics.jsonl: No space left on device' for an OSError the user's machine
    caused (anywhere in the error's chain); None for anything else (a bug keeps its trace)."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in ENVIRONMENT_ERRNOS:
            where = f"{error.filename}: " if error.filename else ""
            return f"{where}{error.strerror or error}"
        error = error.__cause__ or error.__context__
    return None
