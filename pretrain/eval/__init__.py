"""Evaluation and inference: bits per byte, the lm-evaluation-harness model type and the
``generate``/``export`` subcommands."""
