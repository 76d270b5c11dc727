#!/usr/bin/env bash
# Set up a virtual environment (once) and run Terrabyte from a fresh clone.
#
#   bash launch/quickstart.sh pretrain [--section.key VALUE ...]   default pretraining run
#   bash launch/quickstart.sh test [pytest args]                   the test suite
#
# TERRABYTE_VENV picks the environment (default: .venv in the repository). An existing torch is
# kept; with none installed, a machine without an NVIDIA GPU gets the CPU build (torch==2.13.0),
# because a bare `pip install torch` would pull a multi-GB CUDA build.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
venv="${TERRABYTE_VENV:-$repo/.venv}"
log() { printf '[quickstart] %s\n' "$*" >&2; }

setup_python() {
  if [ ! -x "$venv/bin/python" ]; then
    log "creating $venv"
    python3 -m venv "$venv"
  fi
  # shellcheck disable=SC1091
  . "$venv/bin/activate"
  if ! python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      log "installing torch (CUDA build: an NVIDIA GPU is present)"
      pip install -q torch
    else
      log "installing torch==2.13.0 (CPU build)"
      pip install -q torch==2.13.0
    fi
  fi
  stamp="$venv/.terrabyte-installed"
  if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ] || ! python -c "import terrabyte.pretrain" 2>/dev/null; then
    log "installing terrabyte (editable) with its dependencies"
    # the installed torch is pinned for this install, so no extra's dependency can swap the build
    pip install -q -e ".[dev,mpi,bench,eval]" "torch==$(python -c 'import torch; print(torch.__version__)')"
    touch "$stamp"
  fi
  # DeepSpeed compiles its CPU shared-memory collective op on first use (~2 min on 2 cores); do it
  # now, once, into the same cache the trainer uses, instead of in the middle of the first run.
  if ! python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    python - <<'PY' 2>/dev/null || log "DeepSpeed CPU op prebuild failed; it will be built on first use"
import logging, os
os.environ.setdefault("DS_ACCELERATOR", "cpu")
logging.disable(logging.WARNING)
from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder
ShareMemCommBuilder().load(verbose=False)
PY
  fi
}

setup_system_tools() {
  # Command-line tools the tests drive for real: zstd (shards), SLURM + munge (cluster tests).
  local missing=()
  command -v zstd >/dev/null || missing+=(zstd)
  command -v slurmctld >/dev/null || missing+=(slurmctld slurmd slurm-client munge)
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      log "installing ${missing[*]}"
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
      log "missing system tools: ${missing[*]} (install them with your package manager)"
    fi
  fi
}

cmd="${1:-pretrain}"
shift || true
case "$cmd" in
  pretrain)
    setup_python
    exec terrabyte pretrain "$@"
    ;;
  test)
    setup_system_tools
    setup_python
    if [ $# -eq 0 ]; then set -- tests; fi
    # two test files at a time (pytest-xdist): the multi-process tests spend much of their time
    # waiting on their own ranks, launchers and SLURM, so one file alone leaves the cores idle;
    # whole files per worker keep module fixtures (the SLURM cluster, shared runs) in one process
    exec python -m pytest -q -p no:cacheprovider -n "${TERRABYTE_TEST_WORKERS:-2}" --dist loadfile "$@"
    ;;
  *)
    echo "usage: bash launch/quickstart.sh pretrain|test [args]" >&2
    exit 2
    ;;
esac
