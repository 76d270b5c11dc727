"""Checkpoints: everything a run writes to disk and reads back.

Save on all ranks into a temporary folder, fsynced, renamed whole, and only then moved to by an
atomic ``latest``, with the parallel layout and every file's size and sha256 beside it; keep the
newest K; verify a checkpoint before resuming (or fall back to the newest intact one); plan a
resume (through DeepSpeed's universal format when the parallel layout changed); consolidate a
checkpoint of any layout into one plain fp32 state dict, reading it with weights-only loads; decide
which weights a run directory stands for (``resolve_model_source``); read and write the exported
``model.safetensors`` (its config and step in the file's metadata). ``engine/engine.py`` builds and
steps the DeepSpeed engine; this package never changes it.
"""
