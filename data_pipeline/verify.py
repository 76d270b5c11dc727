"""`terrabyte shards verify` and `stats`: check a finished build against its manifest, summarise it.

Verification reads every shard the way the loader does (one pread per member, by the manifest's
offsets) and also as a plain tar, so a shard that would load wrongly or not at all is named, with
its member, before a run trips over it.
"""
from __future__ import annotations

import hashlib
import os
import tarfile

from . import stages
from .errors import DataError
from .manifest import SPLITS, load_manifest


def verify_shards(path: str, *, progress: bool = False) -> list[str]:
    """Checks every shard of a build: present, sha256, tar structure, and every member (JSON
    parses, zstd frame decompresses to the recorded size). Returns one message per problem, each
    naming the shard and member."""
    man = load_manifest(path)
    base = man["_dir"]
    zdict = None
    if man.get("zstd_dict"):
        try:
            with open(os.path.join(base, man["zstd_dict"]["path"]), "rb") as f:
                zdict = f.read()
        except OSError as e:
            return [f"zstd dictionary {man['zstd_dict']['path']}: {e.strerror}"]
    problems: list[str] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(s["tar_bytes"] for s in man["shards"]), unit="B", unit_scale=True, desc="verify")
    files = stages.ShardFiles()
    try:
        for shard in man["shards"]:
            url = os.path.join(base, shard["path"])
            problems.extend(_verify_one(shard, url, files, zdict))
            if bar is not None:
                bar.update(shard["tar_bytes"])
    finally:
        files.close()
        if bar is not None:
            bar.close()
    return problems


def _verify_one(shard: dict, url: str, files: stages.ShardFiles, zdict: bytes | None) -> list[str]:
    name = shard["path"]
    if not os.path.isfile(url):
        return [f"{name}: missing"]
    out = []
    h = hashlib.sha256()
    with open(url, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    if h.hexdigest() != shard["sha256"]:
        out.append(f"{name}: sha256 mismatch (file changed or corrupt)")
    try:
        with tarfile.open(url, "r:") as tf:
            names = [m.name for m in tf.getmembers()]
        want = [f"{k:06d}.{ext}" for k in range(shard["members"]) for ext in ("json", "zst")]
        if names != want:
            out.append(f"{name}: tar lists {len(names)} files, expected {len(want)} ({want[:1]}...)")
    except (tarfile.TarError, OSError, EOFError) as e:
        out.append(f"{name}: not a readable tar ({e})")
    table = stages.member_table([dict(shard, url=url)])
    for i in range(len(table)):
        try:
            s = stages.parse_meta(stages.decompress_sample(stages.read_member(table, files, i), zdict))
            got = sum(d["length"] for d in s.meta["docs"])
            if got != len(s.data):
                raise DataError(f"{s.where}: JSON pieces cover {got} bytes of {len(s.data)}")
        except DataError as e:
            out.append(str(e).replace(url, name))
    return out


def format_stats(man: dict) -> str:
    """A plain-text summary table of a manifest."""
    rows = [("split", "shards", "documents", "members", "raw MB", "zstd MB", "ratio")]
    for split in SPLITS + ("all",):
        t = man["totals"][split]
        ratio = t["raw_bytes"] / t["compressed_bytes"] if t["compressed_bytes"] else 0.0
        rows.append((split, str(t["shards"]), str(t["documents"]), str(t["members"]), f"{t['raw_bytes'] / 1e6:.1f}",
                     f"{t['compressed_bytes'] / 1e6:.1f}", f"{ratio:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))) for r in rows]
    args = man["builder"]["args"]
    lines.append("")
    lines.append(f"builder {man['builder']['version']}, zstd level {args['zstd_level']}, member {args['member_bytes']} B, "
                 f"val fraction {args['val_fraction']}, {man.get('tasks', '?')} task(s)"
                 + (f", dictionary id {man['zstd_dict']['id']}" if man.get("zstd_dict") else ""))
    st = man.get("stats", {})
    lines.append(f"read {st.get('documents_read', 0)} documents from {st.get('sources', 0)} sources; "
                 f"duplicates dropped {st.get('duplicates', 0)}, size-filtered {st.get('filtered_size', 0)}, "
                 f"sources skipped {st.get('skipped_sources', 0)}")
    return "\n".join(lines) + "\n"
