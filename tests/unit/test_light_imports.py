"""What an import pulls in: the model without DeepSpeed, yaml or Triton; the command line without
the modules of the subcommands it does not run. Each case runs in a fresh interpreter, since
this one has imported everything by now."""
import json
import subprocess
import sys

from terrabyte.launch.cli import BENCHES, COMMANDS

BLOCKED = ("deepspeed", "yaml", "triton")
# the project's modules `from terrabyte.pretrain import TerraByte` may import
LIGHT = {"terrabyte", "terrabyte.pretrain", "terrabyte.pretrain.model", "terrabyte.pretrain.model.args",
         "terrabyte.pretrain.model.layers", "terrabyte.pretrain.model.stage", "terrabyte.pretrain.model.terrabyte",
         "terrabyte.pretrain.model.hub", "terrabyte.pretrain.model.patching", "terrabyte.pretrain.decode", "terrabyte.pretrain.decode.cache",
         "terrabyte.pretrain.decode.generate", "terrabyte.pretrain.decode.plans", "terrabyte.pretrain.decode.sample",
         "terrabyte.data_pipeline", "terrabyte.data_pipeline.basics",
         "terrabyte.data_pipeline.basics.errors", "terrabyte.data_pipeline.basics.vocab"}

# A machine without DeepSpeed, yaml and Triton (macOS has no Triton wheel): importing any of them
# fails, and every attempt is recorded. Then a step of training on CPU with a sparse global stage.
TRAIN_WITHOUT = r"""
import importlib.abc, json, sys
BLOCKED = %r
tried = []

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            frame = sys._getframe(1)
            while frame and frame.f_globals.get("__name__", "").startswith("importlib"):
                frame = frame.f_back  # past the import machinery, to the module that imports
            tried.append((name, frame.f_globals.get("__name__", "?") if frame else "?"))
            raise ImportError(f"{name} is not installed here")
        return None

sys.meta_path.insert(0, Blocker())
from terrabyte.pretrain import TerraByte
at_import = sorted(m for m in sys.modules if m.startswith("terrabyte"))
import torch

torch.manual_seed(0)
model = TerraByte(num_tokens=256, dim=(32, 16), depth=(1, 1), max_seq_len=(64, 4), dim_head=8, heads=2,
                  attention=[{"kind": "sparse", "pattern": {"local": 16, "global_tokens": 1, "block": 16}}, None])
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
x = torch.randint(0, 256, (2, 256))
loss = model(x, return_loss=True)
loss.backward()
grads = [p.grad for p in model.stages[0].layers["0"].attn.parameters()]
optimizer.step()
after = model(x, return_loss=True)
print(json.dumps({
    "at_import": at_import, "loss": loss.item(), "after": after.item(),
    "grads_finite": all(bool(torch.isfinite(g).all()) and bool(g.abs().sum() > 0) for g in grads),
    "attend": type(model.stages[0].layers["0"].attn.attend).__name__,
    "blocked_loaded": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED),
    "tried_by_us": sorted({name for name, by in tried if by.startswith("terrabyte")}),
    "tried": sorted({name.split(".")[0] for name, _ in tried}),
    "gathered": "terrabyte.kernels.cpu.gathered_attention" in sys.modules,
}))
"""


def run_python(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_model_imports_and_trains_without_deepspeed_yaml_or_triton():
    seen = run_python(TRAIN_WITHOUT % (BLOCKED,))
    assert set(seen["at_import"]) <= LIGHT, sorted(set(seen["at_import"]) - LIGHT)
    assert "terrabyte.pretrain.model.terrabyte" in seen["at_import"]
    assert seen["blocked_loaded"] == []
    assert seen["tried_by_us"] == []  # not even a guarded attempt from the project's code
    assert "deepspeed" not in seen["tried"] and "yaml" not in seen["tried"]  # (torch itself probes for triton)
    assert seen["attend"] == "SparseAttention" and seen["gathered"]  # the sparse stage ran the CPU path
    assert seen["grads_finite"]
    assert 0 < seen["loss"] < 10 and 0 < seen["after"] < seen["loss"]  # finite, and the step lowered it


# The command line, run as `terrabyte ARGS`; prints (exit code, output, modules of this project loaded).
CLI = r"""
import contextlib, io, json, sys
from terrabyte.launch.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        code = main(%r)
    except SystemExit as exc:
        code = exc.code
print(json.dumps({"code": code, "out": out.getvalue(),
                  "modules": sorted(m for m in sys.modules if m.startswith("terrabyte"))}))
"""


def subcommand_modules() -> set[str]:
    return {module for module, *_ in COMMANDS.values()} | {module for module, _ in BENCHES.values()}


def test_help_lists_every_subcommand_and_imports_none():
    seen = run_python(CLI % (["--help"],))
    assert seen["code"] == 0
    text = " ".join(seen["out"].split())
    for name, (*_, help) in COMMANDS.items():
        assert f"{name} {help.split()[0]}" in text, name
    assert not subcommand_modules() & set(seen["modules"]), sorted(subcommand_modules() & set(seen["modules"]))
    bench = run_python(CLI % (["bench", "--help"],))
    for name, (_, help) in BENCHES.items():
        assert name in bench["out"] and help.split()[0] in bench["out"], name
    assert not subcommand_modules() & set(bench["modules"])


def test_a_subcommand_imports_its_module_alone_and_shows_its_options():
    seen = run_python(CLI % (["generate", "--help"],))
    assert seen["code"] == 0 and "--checkpoint" in seen["out"] and "--temperature" in seen["out"]
    assert subcommand_modules() & set(seen["modules"]) == {"terrabyte.pretrain.eval.generate_cli"}
    seen = run_python(CLI % (["bench", "attention", "--help"],))
    assert seen["code"] == 0 and "--pattern" in seen["out"] and "--lengths" in seen["out"], seen["out"]
    assert subcommand_modules() & set(seen["modules"]) == {"terrabyte.kernels.tools.bench"}
