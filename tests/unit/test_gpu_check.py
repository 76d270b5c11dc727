"""launch/gpu/check.sh rehearsed on CPU (issue #22): every step measures something, at most 8 files
come back, the summary has every section; every `python -m` module it names has an entry point;
the summary counts a step that exits 0 with an empty table as failed."""
from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import tarfile
from pathlib import Path

import pytest

from terrabyte.launch import check

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "launch" / "gpu" / "check.sh"


def _modules(script: Path) -> set[str]:
    return set(re.findall(r"python3? -m ([A-Za-z_][\w.]*)", script.read_text()))


def test_every_python_m_module_of_the_check_has_an_entry_point():
    names = {m for m in _modules(SCRIPT) | _modules(REPO / "launch" / "gpu" / "prepare_wheels.sh")
             if m.startswith("terrabyte.")}
    assert {"terrabyte.kernels.tools.gpu_check", "terrabyte.launch.cli", "terrabyte.launch.check"} <= names
    for name in sorted(names):
        module = importlib.import_module(name)
        assert callable(getattr(module, "main", None)), f"{name} has no main()"
        assert 'if __name__ == "__main__":' in Path(module.__file__).read_text(), f"{name} has no __main__ block"
    # the module the issue found empty: run as a program it must parse its flags, not exit 0 silently
    from terrabyte.pretrain.bench import context as bench_context

    with pytest.raises(SystemExit) as stop:
        bench_context.main(["--help"])
    assert stop.value.code == 0


def test_summary_counts_an_empty_table_as_a_failure(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    out.mkdir()
    (work / "01_environment.md").write_text("| a | b |\n|---|---|\n| 1 | 2 |\n")
    (work / "02_kernels.md").write_text("| a | b |\n|---|---|\n")  # exit 0, header only
    (work / "03_engine.md").write_text("")
    (work / "steps.tsv").write_text("01\tenvironment\t0\t3\t60\n02\tkernels\t0\t5\t60\n03\tengine\t124\t60\t60\n"
                                    "04\tlong_context\t200\t0\t0\n")
    assert check.summary(work, out, "t") == 3
    saved = json.loads((out / "summary.json").read_text())
    assert [s["ok"] for s in saved["steps"]] == [True, False, False, False]
    text = (out / "summary.md").read_text()
    assert "exited 0 with an empty table" in text and "over its 60 s limit" in text and "SKIPPED" in text
    assert all(f"## {check.TITLES[s]}" in text for s in check.SECTIONS)


def test_cpu_rehearsal(tmp_path):
    """The whole script with --cpu (about a minute on 2 cores): the deliverable of issue #22 where no
    GPU is lent."""
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), TMPDIR=str(tmp_path))
    proc = subprocess.run(["bash", str(SCRIPT), "--cpu"], capture_output=True, text=True, env=env, timeout=600)
    summary = json.loads((out / "summary.json").read_text())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["logs.tgz", "summary.json", "summary.md"]  # <= 8 come back
    names = [s["name"] for s in summary["steps"]]
    assert names == list(check.SECTIONS)
    for s in summary["steps"]:
        assert s["ok"] and s["rows"] > 0, s
    text = (out / "summary.md").read_text()
    assert text.startswith("# CPU rehearsal") and all(f"## {check.TITLES[s]}" in text for s in check.SECTIONS)
    assert "| tiny | 3 |" in text and "| tiny | 0 |" in text  # the engine with and without ZeRO-3
    assert "ours, dense causal pattern (control)" in text
    with tarfile.open(out / "logs.tgz") as tar:
        logs = {Path(n).name for n in tar.getnames()}
    assert {f"{i:02d}_{s}.log" for i, s in enumerate(check.SECTIONS, 1)} <= logs
    assert "done: 0 failed" in proc.stdout
