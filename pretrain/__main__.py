"""Per-rank entry point used by every launcher: ``python -m terrabyte.pretrain --config ... [overrides]``."""
import sys

from terrabyte.data_pipeline.basics.errors import run_guarded
from .train.trainer import main

if __name__ == "__main__":
    sys.exit(run_guarded(main, sys.argv[1:]))
