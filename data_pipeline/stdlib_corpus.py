"""The default corpus: the running interpreter's standard library `*.py` files, built into shards
once. `terrabyte train` without `data.path` and `terrabyte bench data` without `--input` use it."""
from __future__ import annotations

import fcntl
import logging
import os
import sysconfig

from .read.manifest import load_manifest
from .write.builder import build_shards
from .write.config import BuildConfig
from .write.publish import BUILD_LOCK

logger = logging.getLogger(__name__)

STDLIB_INCLUDE = ("*.py",)
STDLIB_EXCLUDE = ("site-packages/*", "dist-packages/*")


def stdlib_corpus() -> str:
    """The running interpreter's standard library source directory (~30 MB of .py files)."""
    return sysconfig.get_paths()["stdlib"]


def _valid_default(out_dir: str, corpus: str) -> bool:
    try:
        man = load_manifest(out_dir)
    except (OSError, ValueError):
        return False
    args = man["builder"]["args"]
    if list(args.get("inputs", [])) != [corpus] or list(args.get("include", [])) != list(STDLIB_INCLUDE):
        return False
    return all(os.path.getsize(os.path.join(out_dir, s["path"])) == s["tar_bytes"]
               if os.path.exists(os.path.join(out_dir, s["path"])) else False for s in man["shards"])


def ensure_default_shards(out_dir: str, progress: bool = False) -> str:
    """Builds shards of the standard library's *.py files into out_dir once; returns out_dir.

    Safe when several local ranks call it at once (a file lock serialises them; the first builds,
    the rest find the finished manifest). On several nodes, call it on one rank and barrier.
    """
    corpus = stdlib_corpus()
    if _valid_default(out_dir, corpus):
        return out_dir
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, BUILD_LOCK), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not _valid_default(out_dir, corpus):
                logger.info("building default shards from %s into %s", corpus, out_dir)
                build_shards(BuildConfig(inputs=[corpus], include=STDLIB_INCLUDE, exclude=STDLIB_EXCLUDE),
                             out_dir, progress=progress)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return out_dir
