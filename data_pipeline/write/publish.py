"""The output folder: refuse one that holds no build of ours, stage the build inside it, write the
manifest and move the finished build into place (the manifest last: a folder without
`manifest.json` is not a finished build)."""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict
from typing import Sequence

from ..basics.errors import ConfigError
from ..format import DICT_FILE, FORMAT, MANIFEST, SPLITS
from .config import BUILDER_VERSION, BuildConfig
from .shard_writer import SHARD_RE, remove_quietly
from .tasks import MARKER_RE, marker_path, write_json

logger = logging.getLogger(__name__)

STAGING = ".build"  # the build in progress, inside --out: moved into place once every task is done
STAGING_MARK = ".terrabyte-build"  # in STAGING: says the folder around it is a build of ours
BUILD_LOCK = ".build.lock"  # taken by callers that build into one folder from several processes


def _totals(shards: Sequence[dict]) -> dict:
    out = {}
    for split in SPLITS + ("all",):
        sel = [s for s in shards if split == "all" or s["split"] == split]
        out[split] = {k: sum(s[k] for s in sel) for k in ("documents", "members", "raw_bytes", "compressed_bytes", "tar_bytes")}
        out[split]["shards"] = len(sel)
    return out


def make_manifest(cfg: BuildConfig, task_records: Sequence[dict], dict_id: int | None,
                  dedup_report: dict | None = None) -> dict:
    shards = sorted((s for r in task_records for s in r["shards"]), key=lambda s: (s["split"] != "train", s["path"]))
    stats = {}
    for r in task_records:
        for k, v in r["stats"].items():
            if isinstance(v, list):
                stats.setdefault(k, []).extend(v)
            else:
                stats[k] = stats.get(k, 0) + v
    return {
        "format": FORMAT,
        "builder": {"version": BUILDER_VERSION, "args": asdict(cfg)},
        "tasks": len(task_records),
        "zstd_dict": {"path": DICT_FILE, "id": dict_id} if dict_id is not None else None,
        "shards": shards,
        "totals": _totals(shards),
        "stats": stats,
        **({"dedup": dedup_report} if dedup_report is not None else {}),
    }


def _read_json_dict(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            obj = json.load(f)
    except (OSError, ValueError, RecursionError):
        return {}
    return obj if isinstance(obj, dict) else {}


def check_out_dir(out_dir: str) -> None:
    """`--out` must be new, empty, or a build of ours (finished, or stopped before its manifest):
    the builder replaces and removes files only in such a folder, and only under its own names, so
    a folder of someone else's files is refused before anything is written."""
    try:
        entries = sorted(e for e in os.listdir(out_dir) if e != BUILD_LOCK)
    except FileNotFoundError:
        return
    except NotADirectoryError:
        raise ConfigError(f"--out {out_dir!r} is a file, not a folder") from None
    staging = os.path.join(out_dir, STAGING)
    ours = not os.path.islink(staging) and os.path.isfile(os.path.join(staging, STAGING_MARK))
    if os.path.lexists(staging) and not ours:  # it is written into and removed: it must be ours
        raise ConfigError(f"--out {out_dir!r}: {STAGING!r} in it is not a staging folder of the builder; "
                          "remove it or pick another folder")
    if not entries or ours or \
            _read_json_dict(os.path.join(out_dir, MANIFEST)).get("format") == FORMAT or \
            any(MARKER_RE.match(e) and "fingerprint" in _read_json_dict(os.path.join(out_dir, e)) for e in entries):
        return
    more = f" and {len(entries) - 1} more" if len(entries) > 1 else ""
    raise ConfigError(f"--out {out_dir!r} is not empty and holds no Terrabyte shard build ({entries[0]!r}{more}); "
                      "the builder writes only into a new or empty folder or over a build of its own: pick another")


def clear_tasks(staging: str, tasks: set):
    """The files that earlier tries left in the staging folder for `tasks` (taken from --out)."""
    for fn in os.listdir(staging) if tasks else ():
        shard, marker = SHARD_RE.match(fn), MARKER_RE.match(fn)
        if (shard and int(shard.group(2)) in tasks) or (marker and int(marker.group(1)) in tasks):
            remove_quietly(os.path.join(staging, fn))


def publish(out_dir: str, staging: str, manifest: dict, ntasks: int):
    """Moves a finished build from the staging folder into `out_dir`, task by task (its shards,
    then its marker, so a marker in `out_dir` always has its shards beside it), removes the
    previous build's files that the new one does not keep, and writes the manifest last."""
    remove_quietly(os.path.join(out_dir, MANIFEST))  # the old manifest must not vouch for new shards
    names = {t: [] for t in range(ntasks)}
    for s in manifest["shards"]:
        names[s["task"]].append(s["path"])
    for t in range(ntasks):
        for fn in names[t] + [os.path.basename(marker_path(out_dir, t))]:
            if os.path.exists(os.path.join(staging, fn)):
                os.replace(os.path.join(staging, fn), os.path.join(out_dir, fn))
    if manifest.get("zstd_dict") and os.path.exists(os.path.join(staging, DICT_FILE)):
        os.replace(os.path.join(staging, DICT_FILE), os.path.join(out_dir, DICT_FILE))
    _cleanup_stale(out_dir, {s["path"] for s in manifest["shards"]}, set(range(ntasks)))
    write_json(os.path.join(out_dir, MANIFEST), manifest)
    shutil.rmtree(staging, ignore_errors=True)


def _cleanup_stale(out_dir: str, keep_shards: set, keep_tasks: set):
    for fn in os.listdir(out_dir):
        m = SHARD_RE.match(fn)
        if m and fn not in keep_shards:
            logger.info("removing stale shard %s", fn)
            remove_quietly(os.path.join(out_dir, fn))
        m = MARKER_RE.match(fn)
        if m and int(m.group(1)) not in keep_tasks:
            remove_quietly(os.path.join(out_dir, fn))
