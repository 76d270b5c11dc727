"""`pip install .` lays the folders out as the terrabyte namespace, configs included, and nothing else."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_non_editable_install_layout(tmp_path):
    target = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(REPO)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    top = {p.name for p in target.iterdir() if not p.name.endswith((".dist-info", ".egg-info"))} - {"bin"}
    assert top == {"terrabyte"}, top
    subpackages = {p.name for p in (target / "terrabyte").iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert {"pretrain", "kernels", "data_pipeline", "launch", "configs"} <= subpackages
    assert (target / "terrabyte" / "configs" / "tiny.yaml").is_file()
    assert (target / "terrabyte" / "pretrain" / "model.py").is_file()
    for sub in ("basics", "read", "write"):  # packages inside a top folder are installed too
        assert (target / "terrabyte" / "data_pipeline" / sub / "__init__.py").is_file(), sub
    # the installed copy (not the checkout) imports and finds its configs
    code = (
        "import terrabyte.pretrain as p, terrabyte.pretrain.args as a; "
        "assert p.__file__.startswith(%r), p.__file__; print(a.available_configs())" % str(target)
    )
    env = dict(os.environ, PYTHONPATH=str(target))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "tiny" in out.stdout and "1b" in out.stdout
