"""The write side: a corpus into zstd webdataset shards and their manifest (`terrabyte shards
build`); builder.py runs the steps and names the module of each. It imports nothing from the
read side: what it writes is named in ../format.py."""
