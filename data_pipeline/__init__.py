"""Shards and their loaders: basics/ (errors, vocab, host helpers: what the model imports),
format.py (the shard format's names), write/ (corpus -> shards), read/ (shards -> batches), and on
top cli.py (`terrabyte shards`), verify.py, stdlib_corpus.py (the default corpus) and bench.py.
Importing this package or basics/ imports nothing else."""
