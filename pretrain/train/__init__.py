"""Training: the job config tree (``config.py``), the trainer, the dry-run estimates and the metrics."""
