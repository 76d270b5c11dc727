"""Command-line inputs into sources: files, directories (recursively, sorted), globs, archives,
JSON Lines files, MediaWiki dumps and stdin.

A *source* is one thing a build task reads. Discovery only stats files, so the builder can plan
tasks by size before reading a byte; documents.py reads each source into documents. Recorded paths
are relative to the input they came from (a file input records its base name), use "/" separators,
and are what include/exclude globs match.
"""
from __future__ import annotations

import fnmatch
import glob
import logging
import os
import stat
from dataclasses import dataclass
from typing import Sequence

from ..basics.errors import ConfigError

logger = logging.getLogger(__name__)

# Input formats chosen with --format. "auto" picks by file name; "raw" reads every file as bytes.
FORMATS = ("auto", "raw", "mediawiki")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.zst", ".tar.xz", ".txz", ".tar.bz2", ".tbz2", ".tbz", ".zip")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".ndjson")
STDIN = "-"


@dataclass(frozen=True)
class Source:
    """One unit of input. `name` is the recorded path; `path` is where to read it (or "-")."""

    kind: str  # "file" | "archive" | "jsonl" | "mediawiki" | "stdin"
    path: str
    name: str
    size: int
    link_ok: bool = False  # `path` may be a symbolic link (named on the command line, or --follow-symlinks)


def source_kind(name: str, input_format: str) -> str:
    if input_format not in FORMATS:
        raise ConfigError(f"unknown input format {input_format!r}; choose one of {', '.join(FORMATS)}")
    if input_format == "raw":
        return "file"
    if input_format == "mediawiki":
        return "mediawiki"
    lower = name.lower()
    if lower.endswith(ARCHIVE_SUFFIXES):
        return "archive"
    if lower.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return "file"


def matches_globs(rel: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    if include and not any(fnmatch.fnmatchcase(rel, g) for g in include):
        return False
    return not any(fnmatch.fnmatchcase(rel, g) for g in exclude)


def _keep_file(rel: str, kind: str, include, exclude) -> bool:
    # Globs apply at every level: to files on disk (archives included) and again to archive members
    # as `<archive>/<member>`. Reading only .py files from tarballs: --include '*.tar.gz' --include '*.py'.
    return matches_globs(rel, include, exclude)


def _has_magic(path: str) -> bool:
    return glob.has_magic(path)


def discover_sources(
    inputs: Sequence[str],
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    input_format: str = "auto",
    follow_symlinks: bool = False,
    skipped: dict | None = None,
) -> list[Source]:
    """Expands files, directories (recursively, sorted) and globs into sources.

    Include/exclude globs (fnmatch; `*` also matches "/") apply to the path relative to the input
    directory (archives included: an archive must pass them to be read) and again to each archive
    member as `<archive>/<member>`. A missing input raises FileNotFoundError
    naming it; a glob that matches nothing raises too, since that is almost always a typo.

    Only regular files become sources. A symbolic link found in a directory or by a glob is not
    followed unless `follow_symlinks` (a cloned repository's `x.py -> /proc/self/environ` must not
    reach the shards); devices, FIFOs and sockets never are. Each is logged and counted in
    `skipped` ("skipped_links", "skipped_special"). An input named on the command line is taken as
    given, links included, but must still be a regular file or a directory.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not inputs:
        raise ConfigError("no inputs given: pass at least one file, directory, glob or '-' for stdin")
    walk = _Walk(include, exclude, input_format, follow_symlinks, skipped if skipped is not None else {})
    sources: list[Source] = []
    for raw in inputs:
        item = os.fspath(raw)
        if item == STDIN:
            sources.append(Source("stdin", STDIN, "stdin", 0))
            continue
        if item.startswith(("http://", "https://", "pipe:")):
            raise ConfigError(f"input {item!r}: URLs and pipe: inputs are read by the loader only; "
                              "download the corpus first")
        if _has_magic(item) and not os.path.exists(item):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise FileNotFoundError(f"input glob {item!r} matches no file")
            for m in matches:
                sources.extend(walk.path(m, os.path.dirname(m) or "."))
            continue
        if not os.path.exists(item):
            raise FileNotFoundError(f"input path {item!r} does not exist")
        sources.extend(walk.path(item, None))
    return sources


def safe_name(name: str) -> str:
    """A recorded name that encodes to UTF-8: bytes of a file or member name that are not UTF-8
    (which Python keeps as lone surrogates) become `\\xNN` escapes, so they can be written to a
    member's JSON and matched by globs."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        pass
    try:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return name.encode("utf-8", "backslashreplace").decode("utf-8")


_LOGGED_SKIPS = 20  # the first skipped entries are logged one by one; the builder logs the total


class _Walk:
    """Directory and glob expansion into sources, counting what it does not follow or open."""

    def __init__(self, include, exclude, input_format, follow: bool, skipped: dict):
        self.include, self.exclude, self.input_format = include, exclude, input_format
        self.follow, self.skipped = follow, skipped

    def _skip(self, key: str, rel: str, why: str):
        n = self.skipped[key] = self.skipped.get(key, 0) + 1
        if n <= _LOGGED_SKIPS:
            logger.warning("skipping %s: %s", rel, why)

    def _entry(self, full: str, rel: str, named: bool) -> list[Source]:
        """The source for one file (or nothing, counted); `named`: given on the command line."""
        if not _keep_file(rel, source_kind(rel, self.input_format), self.include, self.exclude):
            return []
        try:
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                if not (named or self.follow):
                    self._skip("skipped_links", rel, "a symbolic link (not followed; --follow-symlinks to read it)")
                    return []
                st = os.stat(full)
        except OSError as e:
            raise OSError(f"cannot stat input file {full!r}: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            self._skip("skipped_special", rel, "not a regular file (devices, FIFOs and sockets are never read)")
            return []
        return [Source(source_kind(rel, self.input_format), full, rel, st.st_size,
                       link_ok=named or self.follow)]

    def path(self, path: str, base: str | None) -> list[Source]:
        named = base is None
        if not named and os.path.islink(path) and not self.follow:
            rel = safe_name(os.path.relpath(path, base).replace(os.sep, "/"))
            if matches_globs(rel, self.include, self.exclude):
                self._skip("skipped_links", rel, "a symbolic link (not followed; --follow-symlinks to read it)")
            return []
        if not os.path.isdir(path):
            rel = os.path.basename(path) if named else os.path.relpath(path, base).replace(os.sep, "/")
            return self._entry(path, safe_name(rel), named)
        # Recorded paths are relative to the input directory (or to the glob's directory).
        root = os.path.normpath(path)
        prefix = "" if named else os.path.relpath(root, base).replace(os.sep, "/") + "/"
        prefix = "" if prefix == "./" else prefix
        found, seen = [], set()
        for dirpath, dirnames, filenames in os.walk(root, onerror=_raise_walk_error, followlinks=self.follow):
            if self.follow:  # a link back up the tree must not walk forever
                st = os.stat(dirpath)
                if (st.st_dev, st.st_ino) in seen:
                    dirnames[:] = []
                    continue
                seen.add((st.st_dev, st.st_ino))
            reldir = os.path.relpath(dirpath, root).replace(os.sep, "/")
            reldir = prefix if reldir == "." else f"{prefix}{reldir}/"
            # sorted traversal: the same tree always yields the same order; excluded dirs pruned
            kept = []
            for d in sorted(dirnames):
                if _dir_excluded(safe_name(reldir + d), self.exclude):
                    continue
                if not self.follow and os.path.islink(os.path.join(dirpath, d)):
                    self._skip("skipped_links", safe_name(reldir + d),
                               "a symbolic link to a directory (not followed; --follow-symlinks to read it)")
                    continue
                kept.append(d)
            dirnames[:] = kept
            for fn in sorted(filenames):
                found.extend(self._entry(os.path.join(dirpath, fn), safe_name(reldir + fn), False))
        return found


def _dir_excluded(reldir: str, exclude: Sequence[str]) -> bool:
    # `--exclude 'site-packages/*'` prunes the whole directory instead of listing 50k files.
    return any(g.endswith("/*") and fnmatch.fnmatchcase(reldir, g[:-2]) for g in exclude)


def _raise_walk_error(err: OSError):
    raise OSError(f"cannot list directory {err.filename!r}: {err.strerror}")
