"""Hostile run directories, job values and configs: a checkpoint never runs code when read for its
weights (every entry point, every layout) unless trusted; `latest` names a folder inside
checkpoints/ or nothing; pruning and saving never touch folders Terrabyte did not write; SLURM
values never become shell lines; config numbers are numbers.

The payload is a pickle whose ``__reduce__`` opens (creates) a marker file: unpickled in full, in
this process or any it starts, the marker appears."""
import json
import logging

import pytest
import torch

from terrabyte.data_pipeline.basics.errors import CheckpointError, ConfigError
from terrabyte.pretrain.checkpoint import store as ckpt
from terrabyte.pretrain.checkpoint import weights as ckpt_weights
from terrabyte.pretrain.train.config import ModelConfig

from .test_checkpoint_safety import META, save, tensors_writer


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def payload_run(root, layout: dict, marker):
    """A run directory shaped like a DeepSpeed pipeline/tensor-parallel checkpoint whose files carry
    the payload where DeepSpeed's converter and zero_to_fp32 read first."""
    step = root / "checkpoints" / "step2"
    step.mkdir(parents=True)
    (root / "checkpoints" / "latest").write_text("step2")
    (step / ckpt.LAYOUT_FILE).write_text(json.dumps({"world": 2, "dp": 1, "sequence": 1, "pipeline": 1,
                                                     "tensor": 1, "zero_stage": 1, **layout}))
    (step / "model_config.json").write_text(json.dumps(ModelConfig().kwargs()))
    for rank in (0, 1):
        torch.save({"module": None, "buffer_names": [], "param_shapes": [{}], "ds_version": "0.19.8",
                    "payload": Payload(marker)}, step / f"mp_rank_{rank:02d}_model_states.pt")
        torch.save({"optimizer_state_dict": {"zero_stage": Payload(marker), "partition_count": 1}},
                   step / f"zero_pp_rank_0_mp_rank_{rank:02d}_optim_states.pt")
    return root


def one_line_refusal(text: str, run) -> None:
    assert "Traceback" not in text, text
    lines = [line for line in text.strip().splitlines() if "error" in line or "checkpoint file" in line]
    assert len(lines) == 1, lines
    assert str(run / "checkpoints" / "step2") in lines[0] and "--trust-checkpoint" in lines[0], lines[0]


@pytest.mark.parametrize("layout", [{"pipeline": 2}, {"tensor": 2}, {}], ids=["pipeline", "tensor", "zero"])
def test_no_entry_point_unpickles_a_checkpoint(tmp_path, layout, capsys, monkeypatch):
    from terrabyte.launch.cli import main
    from terrabyte.pretrain.eval.harness import TerraByteLM
    from terrabyte.pretrain.model.terrabyte import TerraByte
    from terrabyte.pretrain.checkpoint.pretrained import init_from

    marker = tmp_path / "ran-code"
    run = payload_run(tmp_path / "run", layout, marker)
    (tmp_path / "doc.txt").write_bytes(b"some bytes to score")
    for argv in (["generate", "--checkpoint", str(run), "--max-bytes", "4"],
                 ["eval", "--checkpoint", str(run), "--data", str(tmp_path / "doc.txt")],
                 ["eval", "--checkpoint", str(run), "--tasks", "lambada_openai"],
                 ["export", str(run), "--out", str(tmp_path / "out.safetensors")]):
        capsys.readouterr()
        assert main(argv) == 2, argv
        assert not marker.exists(), argv
        one_line_refusal(capsys.readouterr().err, run)
    model = TerraByte(**ModelConfig().kwargs())
    for load in (lambda: TerraByte.from_pretrained(run), lambda: init_from(model, run),
                 lambda: TerraByteLM(pretrained=str(run), device="cpu")):
        with pytest.raises(CheckpointError, match="--trust-checkpoint") as info:
            load()
        assert not marker.exists()
        one_line_refusal(str(info.value), run)
    # a hub id resolves to a snapshot and is read the same way (huggingface_hub's cache layout, offline)
    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--model" / "snapshots" / ("0" * 40)
    (cache / "models--someone--model" / "refs").mkdir(parents=True)
    (cache / "models--someone--model" / "refs" / "main").write_text("0" * 40)
    run.rename(snapshot.parent.mkdir(parents=True) or snapshot)
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        TerraByte.from_pretrained("someone/model", cache_dir=str(cache), local_files_only=True)
    assert not marker.exists()
    # the flag that accepts the risk does unpickle (so it is the flag that decides)
    with pytest.raises(CheckpointError):
        TerraByte.from_pretrained("someone/model", cache_dir=str(cache), local_files_only=True,
                                  trust_checkpoint=True)
    assert marker.exists()


@pytest.mark.parametrize("name, text, message", [
    (ckpt.LAYOUT_FILE, "{[", "layout.json is not valid JSON"),
    (ckpt.LAYOUT_FILE, "[2]", "layout.json must hold a mapping"),
    (ckpt.LAYOUT_FILE, '{"pipeline": "2"}', "pipeline must be a positive whole number, got '2'"),
    ("model_config.json", "nan]", "model_config.json is not valid JSON"),
    ("model_config.json", "[]", "model_config.json must hold a mapping"),
])
def test_garbled_checkpoint_metadata_is_one_line(tmp_path, name, text, message):
    run = payload_run(tmp_path / "run", {}, tmp_path / "ran-code")
    (run / "checkpoints" / "step2" / name).write_text(text)
    with pytest.raises(CheckpointError, match=message):
        ckpt_weights.load_state(run)
    assert not (tmp_path / "ran-code").exists()


def test_pretrain_trust_flag_reaches_the_config():
    from terrabyte.pretrain.train.trainer import parse

    _, cfg = parse(["--init-from", "somewhere", "--trust-checkpoint"])
    assert cfg.train.init_from == "somewhere" and cfg.train.init_from_trust is True
    _, cfg = parse(["--init-from", "somewhere"])
    assert cfg.train.init_from_trust is False


# --------------------------------------------------------------------------- latest, pruning, foreign folders


@pytest.mark.parametrize("target", ["../../elsewhere", "/etc", "..", "step2/../../x", "link"])
def test_latest_must_name_a_folder_directly_inside_checkpoints(tmp_path, target):
    root = tmp_path / "run" / "checkpoints"
    save(root, 2)
    (tmp_path / "elsewhere").mkdir()
    (root / "link").symlink_to(tmp_path / "elsewhere")
    (root / "latest").write_text(target)
    for read in (lambda: ckpt.choose_checkpoint(root, fallback=True),
                 lambda: ckpt_weights.resolve_model_source(root.parent), lambda: save(root, 4)):
        with pytest.raises(CheckpointError, match=r"latest names .*: it must name a folder directly inside"):
            read()
    (root / "latest").unlink()
    (root / "latest").symlink_to(tmp_path / "elsewhere" / "tag")
    (tmp_path / "elsewhere" / "tag").write_text("step2")
    with pytest.raises(CheckpointError, match="is a link or not a regular file"):
        ckpt_weights.resolve_model_source(root.parent)
    (root / "latest").unlink()
    (root / "latest").mkdir()  # a folder named latest is not "no latest"
    with pytest.raises(CheckpointError, match="is a link or not a regular file"):
        ckpt.choose_checkpoint(root, fallback=True)


def foreign_folders(root, steps=(1, 2, 3, 4, 5)):
    for n in steps:
        (root / f"step{n}").mkdir(parents=True)
        (root / f"step{n}" / "precious.txt").write_text(f"not Terrabyte's {n}")
    # a files.json that is not ours does not make a folder ours
    (root / "step5" / ckpt.FILES_MANIFEST).write_text(json.dumps(["a list"]))


def test_foreign_checkpoint_folders_survive_save_and_prune(tmp_path):
    root = tmp_path / "checkpoints"
    foreign_folders(root)
    # a fresh run refuses the directory before writing anything
    with pytest.raises(CheckpointError, match=r"holds checkpoint folders Terrabyte did not write \(step1, step2, "
                                              r"step3, step4, step5: .*use another run.dir"):
        ckpt.check_run_dir(root)
    # written anyway (a resumed run keeps such folders): saving and pruning leave them alone, and a
    # save of a step whose folder is foreign is refused
    for step in (6, 7, 8, 9):
        save(root, step, keep=2)
    with pytest.raises(CheckpointError, match="step3 was not written by Terrabyte"):
        save(root, 3)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step1", "step2", "step3", "step4", "step5",
                                                      "step8", "step9"]
    for n in (1, 2, 3, 4, 5):
        assert (root / f"step{n}" / "precious.txt").read_text() == f"not Terrabyte's {n}"
    ckpt.check_run_dir(root)  # with latest: a resume, allowed


def test_format1_checkpoints_are_pruned_as_ours(tmp_path):
    root = tmp_path / "checkpoints"
    save(root, 1)
    (root / "step1" / ckpt.FILES_MANIFEST).write_text(json.dumps({"mp_rank_00_model_states.pt": 10}))
    for step in (2, 3):
        save(root, step, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step2", "step3"]


# --------------------------------------------------------------------------- job values


def _job(**kw):
    from terrabyte.launch.slurm import JobSpec

    base = dict(nodes=2, gpus_per_node=8, time="04:00:00", partition="gpu", config="tiny", run_dir="/runs/a",
                venv="/venv", workdir="/work", log_dir="/runs/a/slurm", account="acct",
                sbatch_options=["--qos=high"], overrides=["--train.steps", "100"])
    return JobSpec(**{**base, **kw})


@pytest.mark.parametrize("field, flag", [
    ("partition", "--partition"), ("account", "--account"), ("run_dir", "--run-dir"), ("job_name", "--job-name"),
    ("venv", "--venv"), ("log_dir", "--log-dir"), ("time", "--time"), ("sbatch_options", "--sbatch-option"),
    ("overrides", "an override"),
])
def test_slurm_values_with_a_newline_are_refused(field, flag):
    from terrabyte.launch.slurm import render

    payload = "gpu\ntouch /tmp/pwned"
    value = [f"--qos={payload}"] if field == "sbatch_options" else \
        ["--train.steps", payload] if field == "overrides" else payload
    with pytest.raises(ConfigError) as info:
        render(_job(**{field: value}))
    assert len(str(info.value).splitlines()) == 1
    assert str(info.value).startswith(flag) and "control character" in str(info.value)


def test_slurm_values_are_rendered_quoted():
    from terrabyte.launch.slurm import render

    plain = render(_job()).splitlines()
    odd = render(_job(partition='gpu" --qos=evil', account="a#b c", run_dir="/runs/$(touch x)",
                      sbatch_options=['--comment=x"y #z', "--exclusive"])).splitlines()
    assert len(odd) == len(plain) + 1  # the one extra sbatch option, nothing injected
    assert '#SBATCH --partition="gpu\\" --qos=evil"' in odd
    assert '#SBATCH --account="a\\#b c"' in odd
    assert '#SBATCH --comment="x\\"y \\#z"' in odd and "#SBATCH --exclusive" in odd
    assert "TB_RUN_DIR='/runs/$(touch x)'" in odd
    for bad in ("--qos high", "-p gpu", "--qos=a\nb"):
        with pytest.raises(ConfigError, match="--sbatch-option"):
            render(_job(sbatch_options=[bad]))


@pytest.mark.parametrize("addr", ["host\ntouch /tmp/pwned", "$(touch x)", "a b", "node;id"])
def test_master_addr_is_a_host_name(addr):
    from terrabyte.launch.launchers import LaunchSpec, validate

    with pytest.raises(ConfigError, match="--master-addr .* is not a host name or address"):
        validate(LaunchSpec(nodes=2, procs_per_node=1, master_addr=addr), "torchrun")
    validate(LaunchSpec(nodes=2, procs_per_node=1, master_addr="node-1.cluster"), "torchrun")
    validate(LaunchSpec(nodes=2, procs_per_node=1, master_addr="[fe80::1]"), "torchrun")
