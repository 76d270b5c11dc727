"""The sparse pattern: which keys each query attends, per head, as a few integers (``parts``), with
its element mask (``masks``), key lists (``keys``) and the Python twin of the kernels' tile walk
(``tile_walk``, here rather than in ``triton/`` because ``SparsePattern.key_blocks`` runs it and
the pattern must import without Triton)."""
from .sparse_pattern import SparsePattern, check_attention_inputs

__all__ = ["SparsePattern", "check_attention_inputs"]
