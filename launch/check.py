"""Helpers of ``launch/gpu/check.sh``: ``python -m terrabyte.launch.check ceilings|tensorboard|summary``.

- ``ceilings [--cpu]``: the device's own ceilings, against which MFU and kernel times are read: a
  large bf16 matmul (TFLOP/s; fp32 on CPU) and a device-memory copy (GB/s, read + write counted);
  one markdown table on stdout, the numbers also as JSON (``--json``).
- ``tensorboard RUN_DIR``: the scalars of a run's TensorBoard events as one table.
- ``summary --work DIR --out DIR``: ``summary.md`` (every step's status, time and table) and
  ``summary.json`` from the step files check.sh leaves in its work folder; rewritten after each
  step, so a check cut short still returns what it had.

A step's folder entry: ``NN_name.md`` (its table), ``NN_name.log`` (its whole output) and one line of
``steps.tsv``: ``name<TAB>exit code<TAB>seconds<TAB>limit``. A step whose command exits 0 without a
table row counts as failed ("no measurement"): nothing may pass by measuring nothing.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

# the sections summary.md always has, in check.sh's order (a section with no step says "not run")
SECTIONS = ("environment", "kernels", "engine", "long_context", "train_small")
TITLES = {
    "environment": "Environment and device ceilings",
    "kernels": "Kernels: correctness, then timing against FlexAttention and SDPA",
    "engine": "Engine: MFU of small and a 1b slice, with and without ZeRO-3",
    "long_context": "Long context: one long_1g step at 1 GiB, then doubling",
    "train_small": "Training run: `small`, read back from TensorBoard",
}
TABLE_ROW = re.compile(r"^\|(?!\s*-)(.*\|)\s*$")


def table_rows(text: str) -> int:
    """Data rows of the markdown tables in ``text`` (header rows excluded)."""
    rows, in_table = 0, False
    for line in text.splitlines():
        if line.startswith("|---") or line.startswith("| ---"):
            in_table = True
            continue
        if in_table and TABLE_ROW.match(line):
            rows += 1
        elif not line.startswith("|"):
            in_table = False
    return rows


# ---------------------------------------------------------------- ceilings


def _timed(fn, reps: int) -> float:
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    sync()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def ceilings(cpu: bool) -> dict:
    import torch

    from terrabyte.data_pipeline.basics.system import describe_machine
    from terrabyte.pretrain.train.metrics import peak_tflops

    device = "cpu" if cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device (use --cpu for the rehearsal)")
    n, dtype, copy_bytes = (8192, torch.bfloat16, 1 << 30) if device == "cuda" else (512, torch.float32, 64 << 20)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    seconds = _timed(lambda: a @ b, 10 if device == "cuda" else 3)
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_s = _timed(lambda: dst.copy_(src), 10 if device == "cuda" else 3)
    out = {"machine": describe_machine(device), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
           "matmul_n": n, "matmul_dtype": str(dtype).replace("torch.", ""), "matmul_tflops": 2 * n**3 / seconds / 1e12,
           "copy_bytes": copy_bytes, "copy_gb_s": 2 * copy_bytes / copy_s / 1e9,
           "datasheet_bf16_tflops": peak_tflops(None, True) if device == "cuda" else None}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30, capability=f"{props.major}.{props.minor}")
    return out


def format_ceilings(c: dict) -> str:
    peak = c.get("datasheet_bf16_tflops")
    share = f"{c['matmul_tflops'] / peak:.1%}" if peak else "-"
    lines = [f"Machine: {c['machine']}; date: {c['date']}; torch {c['torch']}, triton {c['triton']}", "",
             "| measure | value | datasheet | measured / datasheet |", "|---|---|---|---|",
             f"| {c['matmul_dtype']} matmul {c['matmul_n']}^3 (TFLOP/s) | {c['matmul_tflops']:.1f} | "
             f"{f'{peak:.0f}' if peak else '-'} | {share} |",
             f"| memory copy {c['copy_bytes'] >> 20} MiB (GB/s, read + write) | {c['copy_gb_s']:.1f} | - | - |"]
    if c.get("gpu"):
        lines.append(f"| device | {c['gpu']}, {c['gpu_memory_gib']:.0f} GiB, sm_{c['capability'].replace('.', '')} | - | - |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- tensorboard


TAGS = ("train/loss", "train/bytes_per_second", "perf/model_tflops_per_rank", "perf/mfu", "perf/peak_memory_gib",
        "perf/loader_wait_fraction", "val/loss", "val/bits_per_byte")


def tensorboard_table(run_dir: str) -> str:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(Path(run_dir) / "tensorboard"), size_guidance={"scalars": 0})
    ea.Reload()
    have = [t for t in TAGS if t in ea.Tags()["scalars"]]
    values = {t: {e.step: e.value for e in ea.Scalars(t)} for t in have}
    steps = sorted({s for v in values.values() for s in v})
    lines = ["| step | " + " | ".join(have) + " |", "|---" * (len(have) + 1) + "|"]
    for s in steps:
        lines.append(f"| {s} | " + " | ".join(f"{values[t][s]:.4g}" if s in values[t] else "" for t in have) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- summary


def read_steps(work: Path) -> list[dict]:
    steps = []
    tsv = work / "steps.tsv"
    for line in tsv.read_text().splitlines() if tsv.exists() else []:
        parts = line.split("\t")
        if len(parts) != 5:
            continue
        index, name, rc, seconds, limit = parts
        table = work / f"{index}_{name}.md"
        text = table.read_text(errors="replace") if table.exists() else ""
        rc_i = int(rc) if rc.lstrip("-").isdigit() else -1
        rows = table_rows(text)
        if rc_i == 0 and rows == 0:
            status = "FAILED: exited 0 with an empty table (no measurement)"
        elif rc_i == 0:
            status = "ok"
        elif rc_i == 124 or rc_i == 137:
            status = f"FAILED: over its {limit} s limit (rows so far kept)"
        elif rc_i == 200:
            status = "SKIPPED: the check's time budget was spent"
        else:
            status = f"FAILED: exit code {rc_i}"
        steps.append({"index": index, "name": name, "rc": rc_i, "seconds": float(seconds or 0), "limit_s": limit,
                      "rows": rows, "status": status, "table": text, "ok": status == "ok"})
    return steps


def _section(name: str) -> str:
    return next((s for s in SECTIONS if name.startswith(s)), name)


def summary(work: Path, out: Path, title: str) -> int:
    steps = read_steps(work)
    failed = sum(not s["ok"] for s in steps)
    md = [f"# {title}", "", f"Written {time.strftime('%Y-%m-%d %H:%M:%S')}; {len(steps)} step(s) so far, {failed} failed or "
          "skipped. Every log is in logs.tgz.", "", "| step | status | seconds | limit (s) | table rows |",
          "|---|---|---|---|---|"]
    md += [f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | {s['limit_s']} | {s['rows']} |" for s in steps]
    for section in SECTIONS:
        md += ["", f"## {TITLES[section]}", ""]
        mine = [s for s in steps if _section(s["name"]) == section]
        if not mine:
            md.append("not run (yet)")
        for s in mine:
            md += [f"### {s['name']}: {s['status']} ({s['seconds']:.0f} s)", "", s["table"].strip() or "(no output)", ""]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    (out / "summary.json").write_text(json.dumps({"failed": failed, "steps": [
        {k: v for k, v in s.items() if k != "table"} for s in steps]}, indent=1))
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m terrabyte.launch.check", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    c = sub.add_parser("ceilings", help="bf16 matmul TFLOP/s and memory copy GB/s of this device")
    c.add_argument("--cpu", action="store_true", help="the CPU rehearsal: fp32, small sizes")
    c.add_argument("--json", default=None, help="also write the numbers here")
    t = sub.add_parser("tensorboard", help="a run's TensorBoard scalars as one table")
    t.add_argument("run_dir")
    s = sub.add_parser("summary", help="summary.md and summary.json from check.sh's work folder")
    s.add_argument("--work", required=True, type=Path)
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--title", default="GPU check")
    args = parser.parse_args(argv)
    if args.what == "ceilings":
        result = ceilings(args.cpu)
        sys.stdout.write(format_ceilings(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        return 0
    if args.what == "tensorboard":
        table = tensorboard_table(args.run_dir)
        sys.stdout.write(table)
        return 0 if table_rows(table) else 1
    args.out.mkdir(parents=True, exist_ok=True)
    summary(args.work, args.out, args.title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
