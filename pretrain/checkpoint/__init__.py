"""Checkpoints: DeepSpeed checkpoints written atomically, verified and resumed; consolidated weights and
safetensors exports; the formats earlier versions wrote; ``from_pretrained`` and hub I/O."""
