"""The shard format's names: what the write side promises the read side. Both sides import this
module; it imports nothing.

The builder writes, next to its tar shards, one `manifest.json`:

    {"format": "terrabyte-shards", "builder": {"version", "args"}, "tasks", "zstd_dict",
     "shards": [{"split", "path", "task", "documents", "members", "raw_bytes", "compressed_bytes",
                 "tar_bytes", "sha256", "index": {INDEX_KEYS -> one int per member},
                 "spans": [{"path", "size", "member", "members"}, ...]}, ...],
     "totals": {split or "all": {...}}, "stats": {...}}

`spans` (builder 1.1; absent before, and optional for readers) lists the continued documents that
start in the shard: a document larger than a member, cut into `members` consecutive members (which
may run on into the next shards) from member `member`, `size` raw bytes in all. Readers that do not
know it lose nothing: the member JSON and the `cont` column say the same, `spans` lets `verify`
check a chain against its recorded size and `stats` report them without reading a shard.
"""

FORMAT = "terrabyte-shards"
MANIFEST = "manifest.json"
DICT_FILE = "zstd.dict"
SPLITS = ("train", "val", "test")  # test: only from --split-bytes (a corpus cut by position)
INDEX_KEYS = ("json_offset", "json_size", "zst_offset", "zst_size", "raw", "starts", "ends", "cont")
"""Per-member columns of a shard's `index`: where its JSON and zstd payloads sit in the tar (data
offsets, not headers), its raw size, documents starting / ending in it, and whether its last
document continues in the next member."""
