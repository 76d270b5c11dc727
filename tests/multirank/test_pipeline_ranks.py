"""The hierarchy as a 2-stage DeepSpeed pipeline (ZeRO-1) on 2 real ranks, started by the ``deepspeed``
launcher as any DeepSpeed script is (each rank gets ``--local_rank=N``): the same losses and validation score as the plain model on 1 rank; each stage saves its own
layers; the run resumes on 4 ranks as data x pipeline (2 x 2); the export, the checkpoint consolidated offline and the plain model agree; a
NaN loss on the last stage skips the update on both stages."""
import pytest
import torch

from .conftest import assert_losses_match, launch, losses, scalars
from .test_nonfinite_ranks import DIVERGE

pytestmark = pytest.mark.slow

PIPE = ["--parallel.pipeline_stages", "2", "--parallel.zero_stage", "1"]


@pytest.fixture(scope="module")
def pipe_run(tmp_path_factory, shards):
    run = tmp_path_factory.mktemp("pipeline") / "run"
    first = launch(run, shards, 2, *PIPE, launcher="deepspeed")
    return run, first


def test_two_stages_match_the_plain_model(pipe_run, baseline):
    run, first = pipe_run
    assert "data 1 x pipeline 2" in first.stderr
    assert "--no_local_rank" not in first.args  # the plain launcher: each rank got --local_rank=N
    assert_losses_match(losses(run), losses(baseline), range(1, 7))
    assert scalars(run, "val/bits_per_byte")[6] == pytest.approx(scalars(baseline, "val/bits_per_byte")[6], rel=1e-4)
    # embedding, 2 global blocks, the chunked lower stages with the loss: 4 layers over 2 stages
    ckpt = run / "checkpoints" / "step6"
    assert sorted(p.name for p in ckpt.glob("layer_*-model_states.pt")) == [
        f"layer_{i:02d}-model_states.pt" for i in range(4)]
    assert sorted(p.name for p in ckpt.glob("mp_rank_*_model_states.pt")) == [
        "mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"]
    stage0 = torch.load(ckpt / "layer_00-model_states.pt", weights_only=False)
    assert sorted(stage0) == ["stages.0.embed.proj.weight", "stages.0.embed.token_emb.weight", "stages.0.start_token"]


def test_export_checkpoint_and_plain_model_agree(pipe_run, baseline):
    from safetensors.torch import load_file

    from terrabyte.pretrain.checkpoint.weights import load_state
    from terrabyte.pretrain.eval.generate_cli import load_model

    run, _ = pipe_run
    exported = load_file(str(run / "model.safetensors"))
    _, consolidated = load_state(run / "checkpoints")  # both stages merged offline (universal conversion)
    plain = load_file(str(baseline / "model.safetensors"))
    assert set(exported) == set(consolidated) == set(plain)
    for name in exported:
        assert torch.equal(exported[name], consolidated[name]), name
    # the exported file is a plain TerraByte: it generates what the checkpoint generates
    prompt = torch.tensor([list(b"document ")])
    outs = [load_model(source).generate(prime=prompt, max_new_bytes=16, temperature=0)
            for source in (run / "model.safetensors", run / "checkpoints")]
    assert torch.equal(outs[0], outs[1]) and outs[0].shape == (1, 9 + 16)


def test_pipeline_resumes_as_data_x_pipeline(pipe_run, baseline, shards):
    """The 2-stage checkpoint resumes on 4 ranks, two data-parallel replicas of the pipeline (through the
    universal format: ZeRO-1's optimizer state was saved for one replica), and follows the 1-rank run."""
    run, _ = pipe_run
    proc = launch(run, shards, 4, *PIPE, steps=8, launcher="deepspeed", timeout=600)
    assert "data 2 x pipeline 2 x tensor 1 x sequence 1" in proc.stderr
    assert "resumed from step 6" in proc.stderr
    assert_losses_match(losses(run), losses(baseline), range(7, 9))
    # pipeline checkpoints name parameters by layer: another pipeline depth is refused up front
    plain = launch(run, shards, 1, "--parallel.zero_stage", "1", steps=10, check=False)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().splitlines()[-1] == (
        f"terrabyte: error: checkpoint {run / 'checkpoints' / 'step8'} was written with parallel.pipeline_stages=2; "
        "resuming with 1 is not supported: resume with --parallel.pipeline_stages 2 (data-parallel, tensor- and "
        "sequence-parallel sizes may change)")


def test_nonfinite_loss_skips_the_update_on_every_stage(tmp_path, shards):
    from safetensors.torch import load_file

    from terrabyte.pretrain.checkpoint.weights import load_state

    run = tmp_path / "diverge"
    launch(run, shards, 2, *PIPE, *DIVERGE, "--train.max_nonfinite_steps", "5", steps=4)
    skipped = scalars(run, "train/skipped_steps")
    assert [skipped[s] for s in (1, 2, 3, 4)] == [0, 1, 2, 3]
    # the loss is only seen by the last stage; the first stage's weights did not move either
    _, at_step1 = load_state(run / "checkpoints")
    final = load_file(str(run / "model.safetensors"))
    assert set(final) == set(at_step1) and all(torch.equal(final[k], at_step1[k]) for k in final)
