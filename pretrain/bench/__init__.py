"""``terrabyte bench model|quality|context|engine``: the model against megabyte-pytorch and the
parallel layouts against one rank; results in pretrain/BENCHMARKS.md."""
