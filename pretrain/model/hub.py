"""``from_pretrained`` / ``save_pretrained`` / ``push_to_hub``: huggingface_hub's
``PyTorchModelHubMixin`` names, as a mixin ``TerraByte`` inherits.

Their code (``checkpoint/pretrained.py``) reads run directories and DeepSpeed checkpoints, whose code builds
``TerraByte``: the methods import it when called, so importing the model imports none of it
(torch and einops only; no DeepSpeed, yaml or safetensors until weights are read or written).
"""
from __future__ import annotations

from pathlib import Path


class HubMixin:
    """``Model.from_pretrained(path_or_repo_id)``, ``model.save_pretrained(directory)``,
    ``model.push_to_hub(repo_id)``; keyword arguments as ``pretrained.from_pretrained``,
    ``pretrained.save_pretrained`` and ``pretrained.push_to_hub`` take them."""

    @classmethod
    def from_pretrained(cls, source: str | Path, **kwargs):
        """Build the model from its saved config and load its weights (strictly), in eval mode:
        ``source`` is a ``save_pretrained`` directory, an exported ``.safetensors``, a run directory
        or checkpoint folder, or (only when it is not a local path) a hub repository id."""
        from ..checkpoint.pretrained import from_pretrained

        return from_pretrained(cls, source, **kwargs)

    def save_pretrained(self, directory: str | Path, **kwargs) -> Path:
        """``directory/model.safetensors`` and ``directory/config.json`` (the constructor's
        arguments); with ``push_to_hub=True`` also uploaded."""
        from ..checkpoint.pretrained import save_pretrained

        return save_pretrained(self, directory, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs) -> str:
        """Upload as ``repo_id`` (created if needed); returns the commit URL."""
        from ..checkpoint.pretrained import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)
