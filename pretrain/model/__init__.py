"""The model, plain PyTorch: its arguments (``args.py``), layers (``layers.py``), one level of the
hierarchy (``stage.py``), ``TerraByte`` itself (``terrabyte.py``) and its hub I/O mixin (``hub.py``)."""
from .args import ModelArgs
from .terrabyte import TerraByte

__all__ = ["ModelArgs", "TerraByte"]
