"""`terrabyte bench data` on a tiny corpus: the table is produced and counts what it should."""
import argparse
import shutil

from terrabyte.data_pipeline import bench


def test_bench_data_table(tmp_path, capsys):
    src = tmp_path / "c"
    src.mkdir()
    for i in range(20):
        (src / f"f{i}.txt").write_bytes(f"line {i}\n".encode() * 200)
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--input", str(src), "--repeats", "1", "--epochs", "2", "--seq-len", "64",
                              "--global-batch", "4", "--micro-batch", "2", "--num-workers", "0", "1",
                              "--sources", "3"])
    assert bench.run(args) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ") and "---" not in line}
    assert any(k.startswith("build (zstd level 3)") for k in rows)
    assert "plain zstd decompress" in rows
    loader_rows = [v for k, v in rows.items() if k.startswith("ByteLoader")]
    assert len(loader_rows) == 4  # uint8 and int64, 0 and 1 prefetch threads
    assert sum("(uint8)" in r for r in loader_rows) == 2
    # the mixture of three separately built parts, beside one source and zstd on the same members
    mixture_rows = [v for k, v in rows.items() if k.startswith("3-source MixtureLoader")]
    assert len(mixture_rows) == 4 and all("of one source's MB/s" in r for r in mixture_rows)
    assert "plain zstd decompress, 3 sources" in rows
    if shutil.which("zstd"):
        assert "zstd -d (command line)" in rows and "zstd -d (command line), 3 sources" in rows
        assert all("of zstd -d (CPU)" in r for r in loader_rows + mixture_rows)
    from terrabyte.data_pipeline.read.loader import ByteLoader
    from terrabyte.data_pipeline.read.manifest import load_manifest
    from terrabyte.data_pipeline.write.builder import build_shards
    from terrabyte.data_pipeline.write.config import BuildConfig

    build_shards(BuildConfig(inputs=[str(src)]), str(tmp_path / "s"), progress=False)
    n = len(ByteLoader(str(tmp_path / "s"), seq_len=64, global_batch=4, micro_batch=2))
    # tokens delivered = epochs * micro-batches per epoch * micro_batch * seq_len, whatever the threads
    assert bench.bench_loader(str(tmp_path / "s"), args, 0) == bench.bench_loader(str(tmp_path / "s"), args, 1) \
        == 2 * n * 2 * 64
    raw = sum(p.stat().st_size for p in src.iterdir())
    assert bench.bench_plain_zstd(str(tmp_path / "s")) == load_manifest(str(tmp_path / "s"))["totals"]["train"]["raw_bytes"]
    assert raw == load_manifest(str(tmp_path / "s"))["totals"]["all"]["raw_bytes"]
    assert "mosaicml-streaming" in out
