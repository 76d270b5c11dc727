"""What earlier versions of Terrabyte wrote is still read (``pretrain/checkpoint/earlier_formats.py``),
one test per reader, and none of them skips a check silently: what cannot be verified is named in a
warning, and what can still be checked is."""
import json
import logging

import pytest
import torch

from terrabyte.data_pipeline.basics.errors import CheckpointError
from terrabyte.pretrain import TerraByte
from terrabyte.pretrain.checkpoint import store as ckpt
from terrabyte.pretrain.checkpoint import resume as ckpt_resume, weights as ckpt_weights
from terrabyte.pretrain.checkpoint import earlier_formats

from .test_checkpoint_safety import save

WARNINGS = "terrabyte.pretrain.checkpoint.earlier_formats"
# three stages: the upper stage's unit embedding differs between "grouped" and "concat"
THREE = dict(num_tokens=64, dim=(32, 16, 16), depth=1, max_seq_len=(4, 2, 2), dim_head=8, heads=2)


def test_checkpoint_without_files_json_loads_with_a_warning_naming_what_is_unverified(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    save(root, 2)
    (root / "step2" / ckpt.FILES_MANIFEST).unlink()
    with caplog.at_level(logging.WARNING, logger=WARNINGS):
        assert ckpt.choose_checkpoint(root, fallback=False) == "step2"
    assert "step2 has no files.json" in caplog.text
    assert "no file's presence, size or sha256 is verified" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=WARNINGS):
        ckpt.verify_files(root / "step2", rank=1, world=2)  # said once per job, by rank 0
    assert not caplog.records


def test_format1_files_json_checks_sizes_and_warns_that_sha256_is_not(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    step = save(root, 2)
    entries = json.loads((step / ckpt.FILES_MANIFEST).read_text())["files"]
    (step / ckpt.FILES_MANIFEST).write_text(json.dumps({name: e["size"] for name, e in entries.items()}))
    assert ckpt.is_ours(step)
    with caplog.at_level(logging.WARNING, logger=WARNINGS):
        ckpt.verify_files(step)
    assert "format 1" in caplog.text and "sha256 are not verified" in caplog.text
    victim = step / "mp_rank_00_model_states.pt"
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt has .* bytes"):
        ckpt.verify_files(step)


def test_checkpoint_without_layout_json_warns(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    step = save(root, 2)
    (step / ckpt.LAYOUT_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger=WARNINGS):
        assert ckpt.saved_layout(step) is None
    assert "has no layout.json" in caplog.text and "layout it was written with is not verified" in caplog.text


def test_resume_without_model_config_json_warns(tmp_path, caplog):
    from terrabyte.pretrain.train.config import load_config
    from terrabyte.pretrain.parallel.layout import plan_layout

    cfg = load_config("tiny")
    layout = plan_layout(cfg, 1, 0)
    root = ckpt.checkpoint_dir(tmp_path)
    ckpt.write_checkpoint(root, 2, lambda folder: (folder.mkdir(parents=True), (folder / "a.pt").write_bytes(b"x")),
                          {ckpt.LAYOUT_FILE: layout.as_dict()}, keep=2)
    with caplog.at_level(logging.WARNING, logger=WARNINGS):
        plan = ckpt_resume.plan_resume(cfg, tmp_path, layout)
    assert plan.tag == "step2" and not plan.universal
    assert "has no model_config.json" in caplog.text and "not verified against this run's model config" in caplog.text


def test_model_configs_without_unit_embedding_are_concat(tmp_path):
    later = earlier_formats.LATER_MODEL_KEYS  # keys added since: fixed patches, no n-grams
    assert earlier_formats.model_config({"dim": [8]}) == {**later, "dim": [8], "unit_embedding": "concat"}
    assert earlier_formats.model_config({"unit_embedding": "grouped"}) == {**later, "unit_embedding": "grouped"}
    assert later == {"patching": "fixed", "patch_threshold": None, "context_bytes": None, "ngram_sizes": [],
                     "ngram_buckets": 16384}
    torch.manual_seed(0)
    model = TerraByte(**THREE, unit_embedding="concat")
    old = {k: v for k, v in model.config.items() if k != "unit_embedding"}
    # an export
    ckpt_weights.save_safetensors(model, old, tmp_path / "model.safetensors")
    assert ckpt_weights.load_state(tmp_path / "model.safetensors")[0]["unit_embedding"] == "concat"
    # a save_pretrained directory
    saved = model.save_pretrained(tmp_path / "saved", config=old)
    loaded = TerraByte.from_pretrained(saved)
    assert loaded.config["unit_embedding"] == "concat"
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    # a checkpoint's model_config.json against this run's
    ckpt_resume.check_same_model(old, model.config, "step2")
    with pytest.raises(CheckpointError, match="model.unit_embedding is 'concat' there but 'grouped' now"):
        ckpt_resume.check_same_model(old, {**model.config, "unit_embedding": "grouped"}, "step2")


def test_bare_cpu_random_state_restores():
    state = torch.get_rng_state()
    expected = torch.rand(5)
    ckpt.restore_rng(state)  # checkpoints from before the CUDA state was saved beside it
    assert torch.equal(torch.rand(5), expected)
    assert earlier_formats.rng_states(state)["cpu"] is state
