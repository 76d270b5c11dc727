"""The errors a user can cause, as opposed to bugs.

``terrabyte``'s command-line guard turns a ``TerrabyteError`` (and an ``OSError``) into one line,
``terrabyte: error: ...``, and exit code 2; any other exception keeps its traceback, so a real bug
never passes for a config mistake. Each class is also a ``ValueError`` because that is what callers
of the library caught before these classes existed.
"""
from __future__ import annotations


class TerrabyteError(Exception):
    """Bad input: a file, key or value the message names."""


class ConfigError(TerrabyteError, ValueError):
    """A config key, command-line flag or argument with a value that cannot work."""


class DataError(TerrabyteError, ValueError):
    """A shard or member that cannot be read as written (corrupt, truncated, missing)."""


class CheckpointError(TerrabyteError, ValueError):
    """A checkpoint that is missing, incomplete, damaged or written for another model or layout."""
