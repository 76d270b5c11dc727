#!/usr/bin/env bash
# Every GPU check of the project in one run of at most 5 minutes (CHECK_BUDGET_S): for a session with a GPU machine.
#
#   here:  bash launch/gpu/prepare_wheels.sh
#   there: bash launch/gpu/check.sh             (device tool: carry [".whl"], timeout_s 480)
#
# 1. kernels: correctness of the Triton sparse attention (bf16/fp16/fp32, fwd+bwd) against the
#    reference, then its benchmark against FlexAttention/SDPA (kernels/gpu_check.py, 60 s budget);
# 2. model: `terrabyte bench model` on the GPU, MEGABYTE-pytorch side by side;
# 3. long contexts: `terrabyte bench context --gpu`: doubling long_1g-shaped contexts until one
#    fails (the longest context one GPU trains) and the time of one 1 GiB long_1g step;
# 4. engine: the `small` config (128M) for 20 steps on one GPU in bf16 under ZeRO-3: bytes/s,
#    model TFLOP/s and MFU read back from its TensorBoard events;
# 5. layouts: `terrabyte bench engine --gpu`: MFU of slices of small and 1b (a few steps each).
# Results land in $OUT (kernels: gpu_check.md/json; bench_model.md; bench_context.md/json; train_small.md;
# bench_engine.md/json; ds_report.txt)
# for kernels/BENCHMARKS.md, pretrain/BENCHMARKS.md and the issues. A failing step does not stop
# the later ones; the exit code is the number of failed steps.
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"
out="${OUT:-$repo/gpu_check_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
failed=0
step() { printf '\n=== %s (%s)\n' "$*" "$(date +%T)"; }
# One budget for the whole check (CHECK_BUDGET_S, default 5 minutes after the install): each step
# runs for at most its own limit or what is left, whichever is less; a step with under 20 s left
# is skipped and counted as failed, so the script never runs past its budget by more than a step's
# clean-up.
budget_end=0
limit() {  # limit SECONDS: the timeout of the next step
  local left=$((budget_end - SECONDS))
  if [ "$left" -lt 20 ]; then echo 0; elif [ "$left" -lt "$1" ]; then echo "$left"; else echo "$1"; fi
}
run_limited() {  # run_limited SECONDS command...: under the budget; a skipped or failed step counts
  local t; t=$(limit "$1"); shift
  if [ "$t" -eq 0 ]; then echo "skipped: the check's budget is spent"; failed=$((failed + 1)); return 1; fi
  timeout "$t" "$@" || { failed=$((failed + 1)); return 1; }
}

# the carried wheels, then this checkout (its folders become `terrabyte.*` only when installed)
site=/tmp/terrabyte_site
pip_install() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$@"; }
if [ -d .whl ]; then pip_install .whl/*.whl || exit 99; fi
pip_install --no-build-isolation . || exit 99
export PYTHONPATH="$site" PATH="$site/bin:$PATH"

budget_end=$((SECONDS + ${CHECK_BUDGET_S:-300}))
step "environment"
nvidia-smi -L
python3 -c "import torch, triton, deepspeed; print('torch', torch.__version__, 'triton', triton.__version__, 'deepspeed', deepspeed.__version__)" || failed=$((failed + 1))
ds_report > "$out/ds_report.txt" 2>&1 || true

step "kernels: correctness, then benchmark"
run_limited 80 python3 -m terrabyte.kernels.gpu_check --budget 60 --out "$out"

step "model: terrabyte bench model on the GPU"
run_limited 50 python3 -m terrabyte.pretrain.bench_model --device cuda --out "$out/bench_model.md"

step "long contexts: terrabyte bench context --gpu (longest context one GPU trains, the long_1g step)"
run_limited 90 python3 -m terrabyte.pretrain.bench_context --gpu --time-cap 60 --out "$out/bench_context.json" \
  > "$out/bench_context.md" 2> "$out/bench_context.log"
cat "$out/bench_context.md"

step "engine: small config, 20 steps, bf16, ZeRO-3, one GPU"
run_dir=/tmp/terrabyte_small
rm -rf "$run_dir"
run_limited 60 python3 -m terrabyte.launch.cli pretrain --config small --run.dir "$run_dir" \
  --train.steps 20 --train.global_batch 64 --train.micro_batch 8 --train.log_interval 10 \
  --train.eval_interval 20 --optim.warmup_steps 5 --checkpoint.interval 1000 \
  > "$out/train_small.log" 2>&1
tail -5 "$out/train_small.log"
python3 - "$run_dir" "$out/train_small.md" <<'PY' || failed=$((failed + 1))
import glob, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
run_dir, dest = sys.argv[1:]
ea = EventAccumulator(f"{run_dir}/tensorboard", size_guidance={"scalars": 0})
ea.Reload()
tags = ["train/loss", "train/bytes_per_second", "perf/model_tflops_per_rank", "perf/mfu", "perf/peak_memory_gib",
        "perf/loader_wait_fraction"]
have = [t for t in tags if t in ea.Tags()["scalars"]]
steps = sorted({e.step for t in have for e in ea.Scalars(t)})
lines = ["| step | " + " | ".join(have) + " |", "|---" * (len(have) + 1) + "|"]
for s in steps:
    row = {t: e.value for t in have for e in ea.Scalars(t) if e.step == s}
    lines.append(f"| {s} | " + " | ".join(f"{row[t]:.4g}" if t in row else "" for t in have) + " |")
table = "\n".join(lines) + "\n"
open(dest, "w").write(table)
print(table)
PY

step "layouts: terrabyte bench engine --gpu (MFU of small and 1b slices)"
run_limited 60 python3 -m terrabyte.launch.cli bench engine --gpu --steps 4 --warmup 2 --out "$out/bench_engine.json" \
  > "$out/bench_engine.md" 2> "$out/bench_engine.log"
cat "$out/bench_engine.md"

step "done: $failed failed step(s); results in $out"
ls -la "$out"
exit "$failed"
