"""`terrabyte shards verify` and `stats`: check a finished build against its manifest, summarise it.

Verification reads every shard the way the loader does (one pread per member, by the manifest's
offsets) and also as a plain tar, so a shard that would load wrongly or not at all is named, with
its member, before a run trips over it. A continued document (one cut into consecutive members,
possibly across shards) is checked as one: its pieces must follow each other without gap or
overlap up to the recorded size, and agree with the shard's `spans` record where there is one
(builds before 1.1 have none).
"""
from __future__ import annotations

import hashlib
import os
import tarfile

from .basics.errors import DataError
from .format import SPLITS
from .read import epochs, fetch, unpack
from .read.manifest import load_manifest

MB = 1e6


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
    files = fetch.ShardFiles()
    try:
        members = {split: [] for split in SPLITS}  # (shard, member key, its JSON docs or None) in stream order
        for shard in man["shards"]:
            url = os.path.join(base, shard["path"])
            found, docs = _verify_one(shard, url, files, zdict)
            problems.extend(found)
            members.setdefault(shard["split"], []).extend((shard, k, d) for k, d in enumerate(docs))
            if bar is not None:
                bar.update(shard["tar_bytes"])
        for split in members:
            problems.extend(check_continued(members[split]))
    finally:
        files.close()
        if bar is not None:
            bar.close()
    return problems


def _verify_one(shard: dict, url: str, files: fetch.ShardFiles, zdict: bytes | None) -> tuple[list[str], list]:
    """Problems of one shard, and each member's JSON document list (None where unreadable)."""
    name = shard["path"]
    docs: list = [None] * shard["members"]
    if not os.path.isfile(url):
        return [f"{name}: missing"], docs
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
    table = epochs.member_table([dict(shard, url=url)])
    for i in range(len(table)):
        try:
            s = unpack.parse_meta(unpack.decompress_sample(fetch.read_member(table, files, i), zdict))
            got = sum(d["length"] for d in s.meta["docs"])
            if got != len(s.data):
                raise DataError(f"{s.where}: JSON pieces cover {got} bytes of {len(s.data)}")
            docs[i] = s.meta["docs"]
        except DataError as e:
            out.append(str(e).replace(url, name))
    return out, docs


def check_continued(members: list) -> list[str]:
    """Problems with documents across members: `members` is (shard record, member key, JSON docs
    or None if unreadable) in stream order. Every piece lies inside its document; a document
    starts at offset 0 unless it continues the previous member's last one, exactly where that one
    stopped; only a member's last document may continue; the index's starts/ends/cont agree with
    the JSON; and a continued document matches the shard's `spans` record (size, member count)."""
    out = []
    spans = {}  # (shard path, first member) -> recorded span
    for shard in {id(sh): sh for sh, _, _ in members}.values():
        for sp in shard.get("spans", ()):
            spans[(shard["path"], sp["member"])] = sp
    seen = set()
    # the continued document in progress: [path, next offset, size, where it started, members, has spans]
    cur = None
    for shard, k, docs in members:
        where = f"{shard['path']} member {k:06d}"
        if docs is None:  # unreadable: already reported; restart the chain check after it
            cur = None
            continue
        idx = shard["index"]
        starts = sum(d["doc_offset"] == 0 for d in docs)
        ends = sum(d["doc_offset"] + d["length"] == d["doc_size"] for d in docs)
        cont = int(bool(docs) and docs[-1]["doc_offset"] + docs[-1]["length"] < docs[-1]["doc_size"])
        if (idx["starts"][k], idx["ends"][k], idx["cont"][k]) != (starts, ends, cont):
            out.append(f"{where}: manifest index says starts/ends/cont {idx['starts'][k]}/{idx['ends'][k]}/"
                       f"{idx['cont'][k]}, the member's JSON {starts}/{ends}/{cont}")
        for j, d in enumerate(docs):
            path, off, n, size = d["path"], d["doc_offset"], d["length"], d["doc_size"]
            if off < 0 or n < 0 or off + n > size:
                out.append(f"{where}: piece of {path!r} at {off}+{n} lies outside its {size} bytes")
                continue
            if j == 0 and cur is not None:
                if (path, off, size) != (cur[0], cur[1], cur[2]):
                    out.append(f"{where}: expected {cur[0]!r} to continue at byte {cur[1]} of {cur[2]}, "
                               f"found {path!r} at byte {off}")
                    cur = None
                else:
                    cur[1] += n
                    cur[4] += 1
            elif off != 0:
                out.append(f"{where}: {path!r} starts at byte {off}, not where a previous member stopped")
            elif off + n < size:
                if j != len(docs) - 1:
                    out.append(f"{where}: {path!r} is cut short but is not the member's last document")
                cur = [path, n, size, (shard["path"], k), 1, "spans" in shard]
            if cur is not None and cur[1] == cur[2]:  # a continued document ends here
                sp = spans.get(cur[3])
                if cur[5] and sp is None:
                    out.append(f"{cur[3][0]} member {cur[3][1]:06d}: continued document {cur[0]!r} is not in the "
                               "shard's spans record")
                elif sp is not None and (sp["path"], sp["size"], sp["members"]) != (cur[0], cur[2], cur[4]):
                    out.append(f"{cur[3][0]} member {cur[3][1]:06d}: spans record says {sp['path']!r}, {sp['size']} "
                               f"bytes in {sp['members']} members; the members hold {cur[0]!r}, {cur[2]} bytes "
                               f"in {cur[4]}")
                seen.add(cur[3])
                cur = None
    if cur is not None:
        out.append(f"{cur[3][0]} member {cur[3][1]:06d}: document {cur[0]!r} stops at byte {cur[1]} of {cur[2]} "
                   "(its last members are missing)")
    for key in sorted(set(spans) - seen):
        if members and not any(d is None for _, _, d in members):
            out.append(f"{key[0]} member {key[1]:06d}: spans record names {spans[key]['path']!r}, "
                       "which the members do not continue")
    return out


def continued_summary(man: dict) -> str:
    """One line on the documents cut into several members (sizes from `spans`, builds >= 1.1)."""
    spans = [sp for s in man["shards"] for sp in s.get("spans", ())]
    if spans or all("spans" in s for s in man["shards"]):
        if not spans:
            return "continued documents (cut into several members): none"
        big = max(spans, key=lambda sp: sp["size"])
        return (f"continued documents (cut into several members): {len(spans)} in {sum(sp['members'] for sp in spans)} "
                f"members; largest {big['size'] / MB:.1f} MB ({big['path']}, {big['members']} members)")
    n, prev, split = 0, 0, None  # an older build: count chains from the index alone
    for s in man["shards"]:
        if s["split"] != split:
            prev, split = 0, s["split"]
        for c in s["index"]["cont"]:
            n += int(c and not prev)
            prev = c
    return f"continued documents (cut into several members): about {n} (sizes not recorded by builder {man['builder']['version']})"


def format_stats(man: dict) -> str:
    """A plain-text summary table of a manifest."""
    rows = [("split", "shards", "documents", "members", "raw MB", "zstd MB", "ratio")]
    for split in SPLITS + ("all",):
        if split not in man["totals"] or (split == "test" and not man["totals"][split]["shards"]):
            continue  # older manifests have no test totals; most builds have no test split
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
    if man.get("dedup"):
        from .write.neardup import format_report

        lines.extend(format_report(man["dedup"]))
    lines.append(continued_summary(man))
    if st.get("skipped_links") or st.get("skipped_special"):
        lines.append(f"not read: {st.get('skipped_links', 0)} symbolic links in input folders (--follow-symlinks "
                     f"reads them), {st.get('skipped_special', 0)} devices, FIFOs, sockets or archive links")
    return "\n".join(lines) + "\n"
