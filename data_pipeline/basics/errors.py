"""The errors a user can cause, as opposed to bugs.

``terrabyte``'s command-line guard turns a ``TerrabyteError`` (and an ``OSError``) into one line,
``terrabyte: error: ...``, and exit code 2; any other exception keeps its traceback, so a real bug
never passes for a config mistake. Each class is also a ``ValueError`` because that is what callers
of the library caught before these classes existed.
"""
from __future__ import annotations

import sys
from typing import Callable


class TerrabyteError(Exception):
    """Bad input: a file, key or value the message names."""


class ConfigError(TerrabyteError, ValueError):
    """A config key, command-line flag or argument with a value that cannot work."""


class DataError(TerrabyteError, ValueError):
    """A shard or member that cannot be read as written (corrupt, truncated, missing)."""


class CheckpointError(TerrabyteError, ValueError):
    """A checkpoint that is missing, incomplete, damaged or written for another model or layout."""


def run_guarded(fn: Callable, *args) -> int:
    """Run a command's ``fn``: user errors (and OS errors such as a missing file) become one line on
    stderr and exit code 2; a Ctrl-C exits 130; anything else is a bug and keeps its traceback."""
    try:
        result = fn(*args)
    except (TerrabyteError, OSError) as exc:
        sys.stderr.write(f"terrabyte: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("terrabyte: interrupted\n")
        return 130
    return int(result or 0)
