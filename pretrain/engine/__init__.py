"""DeepSpeed around the plain model: the engine (``engine.py``) and ``ds_seams.py``, the one home of the
DeepSpeed internals the project reaches into."""
