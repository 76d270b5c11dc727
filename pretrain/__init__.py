"""Terrabyte pretraining: the TerraByte model, its config tree, engine and trainer.

The model (the ``model`` package) is plain PyTorch; DeepSpeed is applied from outside by the
``engine`` package.
Importing the package imports the model alone (torch and einops): the config tree, the engine,
checkpoints and hub I/O are imported by what uses them.
"""
from .model import TerraByte

__all__ = ["TerraByte"]
