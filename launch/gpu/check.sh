#!/usr/bin/env bash
# Every GPU check of the project in one call of at most 8 minutes (CHECK_BUDGET_S, default 450 s
# from the start, install included), for the first session with a GPU machine:
#
#   here:  bash launch/gpu/prepare_wheels.sh
#   there: bash launch/gpu/check.sh            (device tool: carry [".whl"], timeout_s 540)
#   CPU rehearsal (CI): bash launch/gpu/check.sh --cpu   (OUT=<its own folder>)
#
# Steps, by value; each runs under `timeout` for the lesser of its limit and what is left, writes its
# table as it goes, and summary.md is rewritten after every step (a cut-short check still returns
# what it had):
#   1. environment: versions, nvidia-smi, `python -m deepspeed.env_report`, the device's ceilings
#      (bf16 matmul TFLOP/s, memory copy GB/s: python -m terrabyte.launch.check ceilings);
#   2. kernels: correctness of the sparse attention (bf16/fp16/fp32, fwd+bwd, vs the reference),
#      then its times at 8K/32K/128K against FlexAttention and dense causal SDPA (ms);
#   3. engine: `terrabyte bench engine --gpu`: MFU of small and a 1b slice, bf16, with and without
#      ZeRO-3, against the datasheet peak and the ceiling measured in step 1;
#   4. long context: `terrabyte bench context --gpu`: one long_1g step at exactly 2^30 bytes (time,
#      peak memory against the --dry-run estimate), then doubling while time is left;
#   5. a short `small` training run (no samples, few validation sequences) read back from TensorBoard.
# $OUT gets exactly summary.md, summary.json and logs.tgz (every log): 3 of the 8 files that come back.
# The exit code is the number of failed or skipped steps (a step that exits 0 without a table row
# counts as failed).
set -uo pipefail
mode=gpu
case "${1:-}" in
  --cpu) mode=cpu ;;
  "") ;;
  *) echo "usage: bash launch/gpu/check.sh [--cpu]" >&2; exit 2 ;;
esac
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"
out="${OUT:-$repo/gpu_check_out}"
[ "$mode" = cpu ] && out="${OUT:-$repo/gpu_check_cpu_out}"
mkdir -p "$out"
work="$(mktemp -d "${TMPDIR:-/tmp}/terrabyte_check.XXXXXX")"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 mode work
budget_end=$((SECONDS + ${CHECK_BUDGET_S:-$([ "$mode" = cpu ] && echo 600 || echo 450)}))
n=0
title="GPU check ($mode) $(date -u '+%Y-%m-%d %H:%M UTC')"
[ "$mode" = cpu ] && title="CPU rehearsal of the GPU check (not GPU numbers) $(date -u '+%Y-%m-%d %H:%M UTC')"

summarize() {
  timeout 60 python3 -m terrabyte.launch.check summary --work "$work" --out "$out" --title "$title" \
    >> "$work/summary.log" 2>&1 || echo "summary failed (see logs.tgz: summary.log)"
  tar -czf "$out/logs.tgz" -C "$work" --exclude=./train_small --exclude=./shim . 2>/dev/null || true
}

# step NAME LIMIT_S COMMAND...: the command's stdout is its table (NN_name.md), stdout and stderr
# together its log (NN_name.log); exit 200: skipped for want of time
step() {
  local name=$1 want=$2; shift 2
  n=$((n + 1))
  local id; id=$(printf '%02d' "$n")
  local left=$((budget_end - SECONDS)) rc t0=$SECONDS
  local lim=$want; [ "$left" -lt "$lim" ] && lim=$left
  printf '\n=== %s: %s (limit %s s, %s s left) %s\n' "$id" "$name" "$lim" "$left" "$(date +%T)"
  if [ "$lim" -lt 15 ]; then
    rc=200
    echo "skipped: the check's budget is spent" | tee "$work/${id}_${name}.log"
  else
    # a shell function of this script runs in a child bash (timeout runs programs only)
    if declare -F "$1" > /dev/null; then set -- bash -c "$(declare -f "$1"); $1"; fi
    timeout -k 10 "$lim" "$@" > >(tee "$work/${id}_${name}.md" >> "$work/${id}_${name}.log") 2>> "$work/${id}_${name}.log"
    rc=$?
    sleep 0.2  # the tee behind the process substitution flushes
    tail -n 5 "$work/${id}_${name}.log" | grep -v '^|' || true
  fi
  printf '%s\t%s\t%s\t%s\t%s\n' "$id" "$name" "$rc" "$((SECONDS - t0))" "$lim" >> "$work/steps.tsv"
  summarize
}

# --------------------------------------------------------------------------- install
# The project first, then the carried wheels, into two folders (one --target would let the second
# install replace the first's bin/ and lose its commands); commands run as `python -m`, never from
# bin/. If the project does not install, run from the checkout: terrabyte/ made of links.
if [ "$mode" = gpu ]; then
  site=/tmp/terrabyte_site wheels=/tmp/terrabyte_wheels
  pip_to() { local dest=$1; shift; timeout 120 python3 -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target "$dest" "$@"; }
  if pip_to "$site" --no-build-isolation . > "$work/install.log" 2>&1; then
    echo "project installed into $site"
  else
    echo "project install failed (see logs.tgz: install.log); running from the checkout"
    site=/tmp/terrabyte_shim; rm -rf "$site"; mkdir -p "$site/terrabyte"
    for d in pretrain kernels data_pipeline launch configs; do ln -s "$repo/$d" "$site/terrabyte/$d"; done
  fi
  if [ -d .whl ]; then
    pip_to "$wheels" .whl/*.whl >> "$work/install.log" 2>&1 || echo "wheel install failed (see logs.tgz: install.log)"
  fi
  export PYTHONPATH="$site:$wheels${PYTHONPATH:+:$PYTHONPATH}"
elif ! python3 -c "import terrabyte.pretrain" 2>/dev/null; then
  shim="$work/shim"; mkdir -p "$shim/terrabyte"
  for d in pretrain kernels data_pipeline launch configs; do ln -s "$repo/$d" "$shim/terrabyte/$d"; done
  export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
fi

# --------------------------------------------------------------------------- steps
env_step() {
  python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__)" >&2
  if [ "$mode" = gpu ]; then
    nvidia-smi -L >&2 || true
    timeout 60 python3 -m deepspeed.env_report > "$work/ds_report.log" 2>&1 || echo "deepspeed env_report failed" >&2
    python3 -m terrabyte.launch.check ceilings --json "$work/ceilings.json"
  else
    python3 -m terrabyte.launch.check ceilings --cpu --json "$work/ceilings.json"
  fi
}
ceiling() { python3 -c "import json,sys; print(round(json.load(open(sys.argv[1]))['matmul_tflops'], 1))" "$work/ceilings.json" 2>/dev/null; }

if [ "$mode" = gpu ]; then
  step environment 60 env_step
  step kernels 170 python3 -m terrabyte.kernels.tools.gpu_check --budget 150 --out "$work/kernels"
  c=$(ceiling)
  step engine 100 python3 -m terrabyte.launch.cli bench engine --gpu --steps 4 --warmup 2 \
    --out "$work/engine.json" ${c:+--ceiling-tflops "$c"}
  step long_context 130 python3 -m terrabyte.launch.cli bench context --gpu --budget 110 --time-cap 100 \
    --out "$work/long_context.json"
  train_args="--config small --train.steps 12 --train.global_batch 16 --train.micro_batch 8 --train.log_interval 2
    --train.eval_interval 12 --train.sample_bytes 0 --data.val_sequences 8 --optim.warmup_steps 4"
else
  step environment 60 env_step
  step kernels 200 env TRITON_INTERPRET=1 python3 -m terrabyte.kernels.tools.gpu_check --device cpu --out "$work/kernels"
  step engine 150 python3 -m terrabyte.launch.cli bench engine --gpu --device cpu --steps 2 --warmup 1 \
    --out "$work/engine.json"
  step long_context 100 python3 -m terrabyte.launch.cli bench context --longest --device cpu --config long_cpu \
    --first 32K --budget 30 --time-cap 80 --out "$work/long_context.json"
  train_args="--config tiny --train.steps 2 --train.global_batch 2 --train.micro_batch 1 --train.log_interval 1
    --train.eval_interval 2 --train.sample_bytes 0 --data.val_sequences 2 --optim.warmup_steps 1"
fi
train_step() {
  local run_dir="$work/train_small"
  # shellcheck disable=SC2086  # train_args: words
  python3 -m terrabyte.launch.cli pretrain $train_args --run.dir "$run_dir" --checkpoint.interval 1000 >&2 || return $?
  python3 -m terrabyte.launch.check tensorboard "$run_dir"
}
export train_args
step train_small 150 train_step

summarize
failed=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['failed'])" "$out/summary.json" 2>/dev/null || echo 99)
printf '\n=== done: %s failed or skipped step(s); %s holds: %s\n' "$failed" "$out" "$(ls "$out" | tr '\n' ' ')"
cat "$out/summary.md"
rm -rf "$work"
exit "$failed"
