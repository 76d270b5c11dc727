import json
import subprocess
import sys

import pytest
import torch

from terrabyte.pretrain import TerraByte
from terrabyte.pretrain.eval.bits_per_byte import byte_log_probs, documents, evaluate, windows
from terrabyte.pretrain.checkpoint.weights import save_safetensors
from terrabyte.data_pipeline.basics.errors import ConfigError

CONFIG = dict(num_tokens=256, dim=(32, 16), depth=(1, 1), max_seq_len=(8, 4), dim_head=8, heads=2)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TerraByte(**CONFIG).eval()


def test_windows_score_every_byte_once():
    for n in (1, 31, 32, 33, 100):
        for stride in (32, 16, 5):
            covered = []
            for w in windows(n, 32, stride):
                assert w.start <= w.score_from < w.score_to <= min(w.start + 32, n)
                covered.extend(range(w.score_from, w.score_to))
            assert covered == list(range(n))


def test_basic_equals_one_forward_for_short_documents(model):
    doc = torch.randint(0, 256, (27,))
    logits = model(doc[None])[0]
    expected = torch.log_softmax(logits.double(), -1).gather(-1, doc[:, None]).squeeze(-1)
    for mode in ("basic", "sliding", "strided", "sliding_strided"):
        got = byte_log_probs(model, doc, mode, stride=None, batch=4)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_modes_on_long_documents(model):
    doc = torch.randint(0, 256, (200,))
    basic = byte_log_probs(model, doc, "basic", None, 4)
    sliding = byte_log_probs(model, doc, "sliding", 8, 4)
    strided = byte_log_probs(model, doc, "strided", None, 4)
    # the first window is shared by all modes
    torch.testing.assert_close(sliding[:32], basic[:32])
    # sliding: byte 40 is scored in the window starting at 16 (offset 24), with more context than basic
    logits = model(doc[None, 16:48])[0]
    torch.testing.assert_close(
        sliding[40], torch.log_softmax(logits.double(), -1)[24, doc[40]], atol=1e-5, rtol=1e-5)
    # strided: bytes in the second half of a patch (patch = 4 bytes) come from the shifted pass
    shifted = model(doc[None, 30:62])[0]  # window 32..64 moved back by 2 bytes
    torch.testing.assert_close(
        strided[34 + 1], torch.log_softmax(shifted.double(), -1)[5, doc[35]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(strided[33], basic[33])  # first half of its patch: the regular pass
    assert not torch.equal(strided, basic)


def test_shards_and_files_give_the_same_number(tmp_path, model):
    from terrabyte.data_pipeline.write.builder import build_shards
    from terrabyte.data_pipeline.write.config import BuildConfig

    src = tmp_path / "src"
    src.mkdir()
    rng = torch.Generator().manual_seed(1)
    for i in range(6):
        (src / f"f{i}.bin").write_bytes(bytes(torch.randint(0, 256, (50 + 37 * i,), generator=rng).tolist()))
    build_shards(BuildConfig(inputs=[str(src)]), str(tmp_path / "shards"), progress=False)
    from_files = evaluate(model, documents([str(src)], "all"), "sliding", 16, 4)
    from_shards = evaluate(model, documents([str(tmp_path / "shards")], "all"), "sliding", 16, 4)
    assert from_files["bytes"] == from_shards["bytes"] == sum(50 + 37 * i for i in range(6))
    assert from_files["documents"] == from_shards["documents"] == 6
    assert from_files["bits_per_byte"] == pytest.approx(from_shards["bits_per_byte"], rel=1e-12)

    save_safetensors(model, CONFIG, tmp_path / "m.safetensors")
    proc = subprocess.run(
        [sys.executable, "-m", "terrabyte.launch.cli", "eval", "--checkpoint", str(tmp_path / "m.safetensors"),
         "--data", str(src), "--mode", "sliding", "--stride", "16", "--split", "all", "--out", str(tmp_path / "r.json")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report == json.loads(proc.stdout)
    assert report["bits_per_byte"] == pytest.approx(from_files["bits_per_byte"], rel=1e-6)
    assert report["dtype"] == "fp32"
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the by-position plot beside it

    # bf16 weights: the same windows, a number within bf16's rounding of the fp32 one
    proc = subprocess.run(
        [sys.executable, "-m", "terrabyte.launch.cli", "eval", "--checkpoint", str(tmp_path / "m.safetensors"),
         "--data", str(src), "--mode", "sliding", "--stride", "16", "--split", "all", "--dtype", "bf16"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    bf16 = json.loads(proc.stdout)
    assert bf16["dtype"] == "bf16" and bf16["bytes"] == report["bytes"]
    assert bf16["bits_per_byte"] == pytest.approx(report["bits_per_byte"], rel=0.02)
    assert bf16["bits_per_byte"] != report["bits_per_byte"]  # it did run in bf16


def test_full_context_scores_by_position_and_bounds_the_window(model, monkeypatch):
    """``--context full``: a document up to the model's context is one window; the by-position
    buckets split the same nats; a smaller --context only ever gives positions below it."""
    from terrabyte.pretrain.eval import bits_per_byte as ev

    monkeypatch.setattr(ev, "FIRST_BUCKET", 4)  # buckets [0, 4), [4, 32) for a 32-byte context
    doc = bytes(torch.randint(0, 256, (75,), generator=torch.Generator().manual_seed(3)).tolist())
    report = evaluate(model, [("d", doc)], "basic", None, 4, context="full")
    assert report["context_bytes"] == 32 and report["bytes"] == 75
    buckets = report["by_position"]
    assert [(b["from"], b["to"]) for b in buckets] == [(0, 4), (4, 32)]
    assert [b["bytes"] for b in buckets] == [4 * 3, 28 + 28 + 7]  # windows of 32, 32 and 11 bytes
    total = sum(b["bits_per_byte"] * b["bytes"] for b in buckets) / 75
    assert total == pytest.approx(report["bits_per_byte"], rel=1e-12)
    logps, positions = ev.score_document(model, torch.tensor(list(doc)), "basic", None, 4, 16)
    assert int(positions.max()) == 15 and int(positions.min()) == 0
    with pytest.raises(ConfigError, match="--context 64 must be in 1..32"):
        evaluate(model, [("d", doc)], context=64)
    with pytest.raises(ConfigError, match="--context 'half'"):
        evaluate(model, [("d", doc)], context="half")


@pytest.mark.parametrize("scheme", ["space", "entropy"])
def test_patches_that_follow_the_data_are_scored_window_by_window(scheme):
    """Every mode scores each byte as the forward over its window does; strided passes add nothing
    where patches have no fixed offset to move."""
    torch.manual_seed(0)
    model = TerraByte(**CONFIG, patching=scheme, context_bytes=20).eval()
    doc = torch.tensor(list(b"def f(x):\n    return x.y + 1  # z\n" * 3))

    def forward(lo, hi):
        logits = model(doc[None, lo:hi])[0]
        return torch.log_softmax(logits.double(), -1).gather(-1, doc[lo:hi, None]).squeeze(-1)

    basic = byte_log_probs(model, doc, "basic", None, 4)
    for lo in range(0, len(doc), 20):
        torch.testing.assert_close(basic[lo:lo + 20], forward(lo, min(lo + 20, len(doc))), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(byte_log_probs(model, doc, "strided", None, 4), basic)
    sliding = byte_log_probs(model, doc, "sliding", 10, 4)
    torch.testing.assert_close(sliding[25:30], forward(10, 30)[15:], atol=1e-5, rtol=1e-5)
