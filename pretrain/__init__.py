"""Terrabyte pretraining: the TerraByte model, its config tree, engine and trainer.

The model (``model.py``) is plain PyTorch; DeepSpeed is applied from outside by ``engine.py``.
"""
from .model import TerraByte

__all__ = ["TerraByte"]
