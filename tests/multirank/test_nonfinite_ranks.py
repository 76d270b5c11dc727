"""A loss that turns NaN/inf on 2 real ranks (an absurd learning rate blows the weights up after step 1):
both ranks skip the update together and count it, write no checkpoint meanwhile, and stop with the
same clear line after ``train.max_nonfinite_steps`` in a row; the last good checkpoint still loads."""
import pytest
import torch

from .conftest import launch, scalars

pytestmark = pytest.mark.slow

DIVERGE = ["--optim.lr", "1e30", "--optim.warmup_steps", "1", "--train.grad_clip", "0", "--checkpoint.interval", "1",
           "--train.sample_bytes", "0"]


def test_nonfinite_steps_are_skipped_then_stop(tmp_path, shards):
    from safetensors.torch import load_file

    from terrabyte.pretrain.checkpoint.weights import load_state

    # below the limit: steps 2-4 are skipped, so the weights at the end are still those of step 1
    run = tmp_path / "skipped"
    launch(run, shards, 2, *DIVERGE, "--train.max_nonfinite_steps", "5", steps=4)
    skipped = scalars(run, "train/skipped_steps")
    assert [skipped[s] for s in (1, 2, 3, 4)] == [0, 1, 2, 3]
    assert (run / "checkpoints" / "latest").read_text() == "step1"
    assert not (run / "checkpoints" / "step2").exists()
    _, at_step1 = load_state(run / "checkpoints")
    final = load_file(str(run / "model.safetensors"))
    assert all(torch.equal(final[k], at_step1[k]) for k in at_step1)
    assert all(torch.isfinite(t).all() for t in at_step1.values())

    # at the limit: the ranks stop together with one line (torchrun may end the second rank before it
    # prints), no traceback of ours
    run = tmp_path / "stopped"
    proc = launch(run, shards, 2, *DIVERGE, "--train.max_nonfinite_steps", "3", steps=12, check=False)
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.splitlines() if l.startswith("terrabyte: error:")]
    assert lines and len(set(lines)) == 1, proc.stderr[-3000:]
    assert "the loss was NaN/inf in 3 steps in a row (steps 2-4; train.max_nonfinite_steps=3)" in lines[0]
    assert "the last checkpoint (step 1) is unaffected" in lines[0]
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr
    assert (run / "checkpoints" / "latest").read_text() == "step1"
    config, state = load_state(run / "checkpoints")
    assert config["dim"] == [64, 32] and set(state) == set(at_step1)
