"""Terrabyte pretraining: the TerraByte model, its config tree, engine and trainer.

The model (``model.py``) is plain PyTorch; DeepSpeed is applied from outside by ``engine.py``.
"""
from .model import TerraByte
from . import pretrained  # noqa: F401  (TerraByte.from_pretrained, save_pretrained, push_to_hub)

__all__ = ["TerraByte"]
