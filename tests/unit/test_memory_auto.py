"""Activation checkpointing chosen from the memory estimate (issue #22): by a model built in Python
(checkpoint_activations left unset) at each training step, and by the trainer's start-up check."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from terrabyte.data_pipeline.basics.errors import ConfigError
from terrabyte.pretrain.train import dry_run as estimate
from terrabyte.pretrain.model import terrabyte as model_module
from terrabyte.pretrain.train.config import load_config
from terrabyte.pretrain.model.terrabyte import TerraByte

SHAPE = dict(num_tokens=256, dim=(32, 16), depth=(2, 1), max_seq_len=(64, 8), dim_head=8, heads=2)


def _step(model):
    x = torch.randint(0, 256, (1, 512))
    model(x, return_loss=True).backward()


def test_python_model_checkpoints_only_when_the_global_stage_would_not_fit(monkeypatch):
    model = TerraByte(**SHAPE).train()
    assert model.auto_checkpoint_activations and not model.checkpoint_activations
    need = model.global_activation_bytes(1, False, 4) + model.global_backward_bytes(1, False, 4)
    monkeypatch.setattr(model_module, "available_memory_bytes", lambda device: int(need / model_module.AUTO_CHECKPOINT_SHARE) + 1)
    _step(model)
    assert not model.checkpoint_activations
    monkeypatch.setattr(model_module, "available_memory_bytes", lambda device: int(need / model_module.AUTO_CHECKPOINT_SHARE) - 1)
    _step(model)
    assert model.checkpoint_activations and all(s.checkpoint_activations for s in model.stages)
    with torch.no_grad():  # no backward, nothing to keep: no checkpointing
        model(torch.randint(0, 256, (1, 512)))
    assert not model.checkpoint_activations
    explicit = TerraByte(**SHAPE, checkpoint_activations=False).train()
    _step(explicit)
    assert not explicit.checkpoint_activations  # a setting given is kept, whatever the memory
    with pytest.raises(ConfigError, match="checkpoint_activations='yes'"):
        TerraByte(**SHAPE, checkpoint_activations="yes")


def test_checkpointed_estimate_is_smaller_and_grows_with_the_context():
    model = TerraByte(**SHAPE)
    assert model.global_activation_bytes(1, True) < model.global_activation_bytes(1, False)
    per = [model.global_activation_bytes(1, False, patches=p) for p in (16, 32, 64)]
    assert per[2] - per[1] == pytest.approx(2 * (per[1] - per[0]))  # linear in the patches, plus one chunk


def test_trainer_check_turns_checkpointing_on_then_picks_the_chunk(monkeypatch):
    cfg = load_config("long_cpu", ["--model.checkpoint_activations", "false", "--model.max_seq_len", "65536,8,8"])
    meta = estimate.meta_model(cfg)
    states = estimate.model_state_bytes(meta, cfg)
    without = states + estimate.activation_bytes(meta, cfg)
    on = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, checkpoint_activations=True))
    with_ckpt = states + estimate.activation_bytes(estimate.meta_model(on), on)
    assert with_ckpt < without
    device = torch.device("cpu")

    monkeypatch.setattr(estimate, "device_memory_bytes", lambda d: (with_ckpt + without) / 2)
    estimate.check_fits(cfg, device, model=meta)
    assert cfg.model.checkpoint_activations is True and cfg.model.chunk_bytes is None

    cfg.model.checkpoint_activations = False  # less memory still: the chunk shrinks too
    chunk_part = estimate.chunk_activation_bytes(meta, cfg)
    monkeypatch.setattr(estimate, "device_memory_bytes", lambda d: with_ckpt - chunk_part / 4)
    estimate.check_fits(cfg, device, model=meta)
    assert cfg.model.checkpoint_activations and 0 < cfg.model.chunk_bytes < meta.chunk_bytes

    cfg.model.chunk_bytes = None
    monkeypatch.setattr(estimate, "device_memory_bytes", lambda d: states / 2)
    with pytest.raises(ConfigError, match="would not fit|even with one patch|over the"):
        estimate.check_fits(cfg, device, model=meta)


def test_malloc_threshold_pinned_on_glibc():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    assert model_module.pin_malloc_threshold() is True
