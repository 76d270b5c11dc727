"""Reading a build's `manifest.json` (its format: ../format.py) and checking it before anything
trusts it.

`load_manifest` reads it from a directory, a file, an http(s) URL or a `pipe:` command template and
keeps where it came from as `_dir`; `shard_list` and `file_url` turn the relative shard and
dictionary paths into locations the readers (`fetch.ShardFiles`, `read_whole`) open. This module
reads no shard: the loader, `verify` and the stages build on it, and it imports none of them.
"""
from __future__ import annotations

import json
import os
import re

from ..basics.errors import ConfigError, DataError
from ..format import DICT_FILE, FORMAT, INDEX_KEYS, MANIFEST, SPLITS

MAX_BYTES = 1 << 48
"""Largest offset, size or count a manifest may give (256 TiB): anything past it is a garbled or
hostile manifest, refused before it reaches arithmetic (int64 columns) or an allocation."""
MAX_TOTAL = 1 << 60  # a whole manifest's raw bytes plus documents: the loader's int64 sums never overflow
PLAIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,254}$")
"""A file name the build may refer to (shards, dictionary): a plain name inside the build's folder,
with nothing that a shell, a path or a terminal reads specially."""
PIPE_FILE_VAR = "TERRABYTE_FILE"


def pipe_command(template: str) -> str:
    """The shell text of a `pipe:` template with each `{}` made a reference to $TERRABYTE_FILE,
    quoted for where it stands (bare, inside "...", inside '...'), so a file name reaches the
    command as data whatever the template's own quoting, never as shell text."""
    body, out, quote, i = template[len("pipe:"):], [], None, 0
    ref = {None: f'"${{{PIPE_FILE_VAR}}}"', '"': f"${{{PIPE_FILE_VAR}}}", "'": f"'\"${{{PIPE_FILE_VAR}}}\"'"}
    while i < len(body):
        if body.startswith("{}", i):
            out.append(ref[quote])
            i += 2
            continue
        c = body[i]
        if c == "\\" and quote != "'":
            out.append(body[i:i + 2])
            i += 2
            continue
        if quote is None and c in "'\"":
            quote = c
        elif c == quote:
            quote = None
        out.append(c)
        i += 1
    return "".join(out)


def run_pipe(template: str, name: str) -> bytes:
    """Output of a `pipe:` command template run for one file of the build (manifest, shard,
    dictionary): the name must be a plain file name and is passed in the environment."""
    import subprocess

    if not PLAIN_NAME.fullmatch(name):
        raise DataError(f"pipe: file name {name!r} is not a plain file name (letters, digits, '.', '_', '-'); "
                        "refused: it is never given to a shell")
    shown = template[len("pipe:"):].replace("{}", name)
    r = subprocess.run(pipe_command(template), shell=True, capture_output=True,
                       env={**os.environ, PIPE_FILE_VAR: name})
    if r.returncode != 0:
        msg = r.stderr.decode(errors="replace").strip().splitlines()
        raise FileNotFoundError(f"pipe command {shown!r} failed (exit {r.returncode}): {msg[-1] if msg else ''}")
    return r.stdout


def load_manifest(path: str, allow_pipe: bool = False) -> dict:
    """Reads and checks `<dir>/manifest.json` (a directory, a manifest file, an http(s) URL of
    either, or with `allow_pipe` a `pipe:CMD` template whose `{}` is replaced by each file name);
    raises naming the file. The directory is kept as `_dir` to resolve shard paths."""
    path = os.fspath(path)
    if path.startswith("pipe:"):
        if not allow_pipe:
            raise ConfigError(f"data path {path!r} runs a shell command: allow it explicitly "
                              "(ByteLoader(allow_pipe=True) / data.allow_pipe) or use a local path or http(s) URL")
        if "{}" not in path:
            raise ConfigError(f"pipe: data path {path!r} needs a '{{}}' where the file name goes, e.g. "
                              "'pipe:aws s3 cp s3://bucket/shards/{} -'")
        text, mpath, base = run_pipe(path, MANIFEST), path.replace("{}", MANIFEST), path
    elif path.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        mpath = path if path.endswith(".json") else path.rstrip("/") + "/" + MANIFEST
        try:
            with urllib.request.urlopen(mpath, timeout=60) as r:
                text = r.read()
        except (urllib.error.URLError, OSError) as e:
            raise FileNotFoundError(f"cannot fetch shard manifest {mpath!r}: {e}") from None
        base = mpath.rsplit("/", 1)[0]
    else:
        mpath = os.path.join(path, MANIFEST) if os.path.isdir(path) else path
        if not os.path.exists(mpath):
            raise FileNotFoundError(f"no {MANIFEST} in {path!r}: build shards first with `terrabyte shards build`")
        if not os.path.isfile(mpath):  # a device or FIFO would be read without end
            raise DataError(f"{mpath!r} is not a regular file; refused")
        with open(mpath, "rb") as f:
            text = f.read()
        base = os.path.dirname(os.path.abspath(mpath))
    try:
        man = json.loads(text)
    except ValueError as e:
        raise DataError(f"{mpath!r} is not valid JSON ({e}); rebuild the shards") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT or "shards" not in man:
        raise DataError(f"{mpath!r} is not a Terrabyte shard manifest; rebuild the shards")
    check_manifest(man, mpath)
    man["_dir"] = base
    return man


def check_manifest(man: dict, where: str) -> None:
    """The fields the readers use have the right types and agree with each other, and no shard or
    dictionary path leaves the build's directory; else a DataError naming the shard and key (a
    garbled manifest must not become a traceback, or a read of some other file)."""
    shards = man["shards"]
    if not isinstance(shards, list):
        raise DataError(f"{where!r}: 'shards' is not a list; rebuild the shards")
    for i, shard in enumerate(shards):
        _check_shard(shard, f"{where!r} shard {i}")
    info = man.get("zstd_dict")
    if info and not (isinstance(info, dict) and _plain(info.get("path", DICT_FILE))):
        raise DataError(f"{where!r}: 'zstd_dict' must name a plain file inside the build; rebuild the shards")
    total = sum(sum(s["index"]["raw"]) + sum(s["index"]["ends"]) for s in shards)
    if total > MAX_TOTAL:
        raise DataError(f"{where!r}: the shards' 'raw' and 'ends' columns add up to {total}, past {MAX_TOTAL}; "
                        "refused (a garbled manifest)")


def _is_count(v) -> bool:
    return type(v) is int and 0 <= v <= MAX_BYTES


def _plain(name) -> bool:
    return isinstance(name, str) and PLAIN_NAME.fullmatch(name) is not None


def _check_shard(shard, where: str) -> None:
    if not isinstance(shard, dict):
        raise DataError(f"{where} is not an object; rebuild the shards")
    if shard.get("split") not in SPLITS:
        raise DataError(f"{where}: 'split' is {shard.get('split')!r}, not one of {SPLITS}")
    if not _plain(shard.get("path")):
        raise DataError(f"{where}: 'path' {shard.get('path')!r} is not a plain shard file name (letters, digits, "
                        "'.', '_', '-'; no '/', '..', shell or control characters); refused")
    if not isinstance(shard.get("sha256"), str):
        raise DataError(f"{where} ({shard['path']}): 'sha256' is missing or not a string")
    members, index = shard.get("members"), shard.get("index")
    if not _is_count(members) or not isinstance(index, dict):
        raise DataError(f"{where} ({shard['path']}): 'members' or 'index' is missing or malformed")
    for key in INDEX_KEYS:
        column = index.get(key)
        if not (isinstance(column, list) and len(column) == members and all(map(_is_count, column))):
            raise DataError(f"{where} ({shard['path']}): index column {key!r} is not {members} counts "
                            f"in [0, {MAX_BYTES}]")
    if any(c > 1 for c in index["cont"]) or any(r == 0 for r in index["zst_size"]) or \
            any(r + e == 0 for r, e in zip(index["raw"], index["ends"])):
        raise DataError(f"{where} ({shard['path']}): index columns 'cont', 'zst_size' or 'raw' / 'ends' are malformed")
    tar_bytes = shard.get("tar_bytes")
    if tar_bytes is not None and not _is_count(tar_bytes):
        raise DataError(f"{where} ({shard['path']}): 'tar_bytes' {tar_bytes!r} is not a count in [0, {MAX_BYTES}]")
    for i, (raw, zst) in enumerate(zip(index["raw"], index["zst_size"])):
        if zst > raw + (raw >> 7) + 1024:  # zstd never grows data by more than this
            raise DataError(f"{where} ({shard['path']}) member {i}: 'zst_size' {zst} is more than a zstd frame of "
                            f"{raw} raw bytes can be; refused")
    if tar_bytes is not None:
        for key in ("json", "zst"):
            for i, (o, n) in enumerate(zip(index[f"{key}_offset"], index[f"{key}_size"])):
                if o + n > tar_bytes:
                    raise DataError(f"{where} ({shard['path']}) member {i}: '{key}_offset' + '{key}_size' ({o} + {n}) "
                                    f"is past the shard's end ('tar_bytes' {tar_bytes})")
    # the totals are written from the same members: a changed count shows as a disagreement
    for total, column in (("raw_bytes", "raw"), ("compressed_bytes", "zst_size")):
        if total in shard and shard[total] != sum(index[column]):
            raise DataError(f"{where} ({shard['path']}): '{total}' {shard[total]!r} is not the sum of the index "
                            f"column {column!r} ({sum(index[column])})")


def file_url(manifest: dict, path: str) -> str:
    """Where to read the build's file `path` (a shard, the dictionary): a local path, an http(s)
    URL, or for a `pipe:` build the template and the file name joined by NUL (`display` prints it)."""
    base = manifest.get("_dir", ".")
    if base.startswith("pipe:"):
        return f"{base}\0{path}"  # template and file name; fetch.ShardFiles runs it
    if "://" in base:
        return base.rstrip("/") + "/" + path
    return os.path.join(base, path)


def display(url: str) -> str:
    """A shard location for messages (a pipe: location is a template and a file name)."""
    return url.replace("\0", " ")


def shard_list(manifest: dict, split: str) -> list[dict]:
    """The split's shards, in manifest order, with their locations (`url`)."""
    shards = [dict(s, url=file_url(manifest, s["path"])) for s in manifest["shards"] if s["split"] == split]
    if not shards:
        have = sorted({s["split"] for s in manifest["shards"]})
        raise DataError(f"manifest in {manifest.get('_dir', '.')!r} has no {split!r} shards (it has: "
                        f"{', '.join(have) or 'none'}); rebuild with a different --val-fraction or pick another split")
    return shards


def read_whole(url: str) -> bytes:
    """A whole small file (e.g. the zstd dictionary) from a local path, http(s) URL or pipe:."""
    if url.startswith("pipe:"):
        return run_pipe(*url.split("\0", 1))
    if "://" in url:
        import urllib.request

        with urllib.request.urlopen(url, timeout=60) as r:
            return r.read()
    with open(url, "rb") as f:
        return f.read()


def load_dictionary(manifest: dict) -> bytes | None:
    """The zstd dictionary the build was compressed with, or None; FileNotFoundError naming it if
    the manifest names one that cannot be read."""
    info = manifest.get("zstd_dict")
    if not info:
        return None
    url = file_url(manifest, info.get("path", DICT_FILE))
    try:
        return read_whole(url)
    except OSError as e:
        raise FileNotFoundError(f"zstd dictionary {display(url)!r} named by the manifest is missing: "
                                f"{e.strerror or e}") from None
