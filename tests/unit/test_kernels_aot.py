"""The sm_90 compile check (issue #22): `python -m terrabyte.kernels.tools.aot --subset` with the GPU
machine's Triton (3.6.0, installed on the side once into ~/.cache/terrabyte, reused afterwards)
compiles the heaviest variant of every kernel and reports registers and stack per variant."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

GPU_TRITON = "3.6.0"
SIDE = Path(os.environ.get("TERRABYTE_CACHE", Path.home() / ".cache" / "terrabyte")) / f"triton-{GPU_TRITON}"


def _side_triton() -> Path:
    """Triton 3.6.0 in its own folder (a ~150 MB wheel, downloaded once per machine)."""
    if not (SIDE / "triton" / "__init__.py").exists():
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(SIDE),
                               f"triton=={GPU_TRITON}"], capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            pytest.skip(f"triton=={GPU_TRITON} not installable for this Python: {proc.stderr.strip()[-300:]}")
    return SIDE


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Triton's ptxas is a Linux binary")
def test_every_kernel_compiles_for_sm90_with_the_gpu_machines_triton():
    side = _side_triton()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(side), os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "terrabyte.kernels.tools.aot", "--arch", "90", "--subset"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"triton {GPU_TRITON}, sm_90: 6 of 6 variants compiled" in proc.stdout
    rows = re.findall(r"^ok\s+(\w+)\s.*: (\d+) registers, (\d+) B stack", proc.stdout, re.M)
    assert sorted(k for k, _, _ in rows) == ["count", "count", "dkdv", "dq", "fwd", "preprocess"]
    assert all(0 < int(r) <= 255 for _, r, _ in rows)


def test_variant_list_covers_what_the_gpu_path_launches():
    from terrabyte.kernels.tools import aot

    full = aot.variants()
    seen = {(v["kernel"], v["dtype"], v["constexprs"].get("HEAD_DIM"), v["constexprs"]["BLOCK"]) for v in full}
    for kernel in aot.KERNELS:
        for dtype in ("bf16", "fp16", "fp32"):
            for d in (32, 64, 128):
                for block in (64, 128):
                    assert (kernel, dtype, d, block) in seen
    assert {v["pattern"] for v in full if v["kernel"] == "dkdv"} == {"union", "csr", "noncausal"}
    assert {(v["constexprs"]["TRANSPOSED"], v["constexprs"]["BLOCK"]) for v in full if v["kernel"] == "count"} == {
        (t, b) for t in (False, True) for b in (64, 128)}
