"""`terrabyte bench context`: every row, a finite exponent, the JSON, the time cap, context parsing.

The children run as threads of the test process (``_ThreadChild``): a spawned interpreter costs
seconds per row, and what is tested here is the sweep around them, not the process start.
"""
import argparse
import json
import math
import queue
import threading

import pytest

from terrabyte.data_pipeline.basics.errors import ConfigError
from terrabyte.pretrain.bench import context as bc
from terrabyte.pretrain.bench import context_measure

TINY = ["--model.dim", "16,8,8", "--model.depth", "1,1,1", "--model.dim_head", "8", "--model.heads", "2,1,1"]


class _ThreadChild:
    """What ``spawn_child`` starts, in a thread: kill() cannot stop it, join() waits for its step."""

    exitcode = None

    def __init__(self, target, args):
        self.queue = queue.Queue()
        self.thread = threading.Thread(target=target, args=(*args, self.queue), daemon=True)
        self.thread.start()

    def is_alive(self):
        return self.thread.is_alive()

    def kill(self):
        pass

    def join(self, timeout=None):
        self.thread.join(timeout)


@pytest.fixture
def in_threads(monkeypatch):
    def spawn(target, args, pin_malloc=True):
        child = _ThreadChild(target, args)
        return child, child.queue

    monkeypatch.setattr(context_measure, "spawn_child", spawn)  # measure() starts its children with it


def _run(tmp_path, capsys, *flags):
    parser = argparse.ArgumentParser()
    bc.add_arguments(parser)
    args = parser.parse_args(["--contexts", "1K,2K", "--threads", "1", "--memory-limit", "0",
                              "--out", str(tmp_path / "c.json"), "--png", str(tmp_path / "c.png"), *flags, "--", *TINY])
    assert bc.run(args) == 0
    return capsys.readouterr().out, json.loads((tmp_path / "c.json").read_text())


def _kinds():
    return [k for k in bc.SWEEP_MODELS.split(",") if k != "megabyte" or bc.megabyte_class() is not None]


def test_two_contexts_every_row_and_exponent(tmp_path, capsys, in_threads):
    out, saved = _run(tmp_path, capsys)
    rows = [line for line in out.splitlines() if line.startswith("| 1 KiB") or line.startswith("| 2 KiB")]
    assert len(rows) == 2 * len(_kinds())
    assert all(line.endswith("| ok |") for line in rows)
    assert [(r["context"], r["model"]) for r in saved["results"]] == [(n, k) for n in (1024, 2048) for k in _kinds()]
    for kind in _kinds():
        assert math.isfinite(saved["fits"][kind]["exponent"])
        assert f"- {kind}: time ~ context^" in out
    assert "Targets (issue #12):" in out and len(saved["checks"]) == 3


def test_time_cap_stops_each_model_after_its_first_context(tmp_path, capsys, in_threads):
    out, saved = _run(tmp_path, capsys, "--time-cap", "0")
    by_context = {n: [r["status"] for r in saved["results"] if r["context"] == n] for n in (1024, 2048)}
    assert by_context[1024] == ["stopped: over 0 s"] * len(_kinds())
    assert by_context[2048] == ["skipped (stopped: over 0 s at 1 KiB)"] * len(_kinds())
    assert "no exponent" in out


def test_contexts_parse():
    assert bc.parse_contexts("2K, 1K,8M", unit=64) == [1024, 2048, 8 << 20]
    for bad in ("12Q", "100", "0"):
        with pytest.raises(ConfigError, match=repr(bad)):
            bc.parse_contexts(f"1K,{bad}", unit=64)
    with pytest.raises(ConfigError, match="dense"):
        bc.parse_models("tb_sparse,dense")


def test_fit_exponent():
    assert bc.fit_exponent([(1, 3.0), (2, 12.0), (4, 48.0)]) == pytest.approx(2.0)
    assert bc.fit_exponent([(1024, 1.0)]) is None
