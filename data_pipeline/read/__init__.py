"""The read side: from a build's manifest to packed token batches (and whole documents).

Like webdataset's `filters.py`, each stage is a plain function of one item or a generator over an
iterable, testable alone. `ByteLoader` (loader.py) uses them in this order, per lane of an epoch:

    manifest.py  load_manifest -> shard_list
    epochs.py    member_table -> epoch_order -> lanes (the rank split) -> locate (where a lane starts)
    fetch.py     prefetch_map(read_member (one pread of a member's JSON + zstd)
    unpack.py        -> decompress_sample (into a BufferPool buffer) -> parse_meta
    segments.py      -> member_segments)
                 -> TokenReader.fill (documents + EOS, into the loader's lane buffer)

and cuts micro-batches out of the filled lane buffer itself: there is no separate pack or batch
stage, because the loader fills a block of steps of each lane per `fill` call into one reused
uint8 buffer (EOS positions on the side) and copies each micro-batch from it (why:
`ByteLoader._iter_train`, batch.py, data_pipeline/BENCHMARKS.md). mixture.py draws from several
builds' loaders by weight; ../verify.py checks a build member by member through the same stages.

The sequential path, for whole documents instead of packed batches (`loader.split_documents`,
used by `terrabyte eval`, and the tests):

    fetch.tar_members (expands tar shards as webdataset's `tar_file_expander` + `group_by_keys` do)
        -> unpack.decompress -> unpack.documents (chunks of large documents joined)

`unpack.documents_from_wds` reads one sample of upstream `webdataset`. Errors follow one policy, a
handler: "raise" raises a `DataError` naming the shard and member; "skip" drops the member, counts
it in an `ErrorCounter` (fetch.py) and logs it.

This package imports nothing from the write side: both build on `format.py` and `basics/`.
"""
