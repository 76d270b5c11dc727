#!/bin/bash
# Terrabyte pretraining job, written by `terrabyte slurm`. Regenerate it rather than editing the
# counts by hand: the #SBATCH lines and the settings below are rendered from the same flags.
#
{{sbatch_lines}}
#
# How it runs: one srun task per node starts `terrabyte launch --run`, which starts torchrun (or
# `deepspeed --no_ssh`) for that node's ranks; the master is the first node of the allocation, the
# port derives from the job id. Preemption: SLURM sends USR1 to this shell {{signal_seconds}} s before the
# time limit (--signal=B:USR1@...); it is forwarded to the ranks, which checkpoint at the next step
# and exit 75; this script then requeues the job, and the requeued job resumes from
# <run dir>/checkpoints/latest. Chained jobs instead (`terrabyte slurm --array K`): the next array
# task resumes from the same checkpoint.
set -uo pipefail

# ---- settings rendered by `terrabyte slurm` ------------------------------------------------
{{settings}}
# --------------------------------------------------------------------------------------------

log() { printf '[terrabyte-slurm %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { printf 'terrabyte-slurm: error: %s\n' "$*" >&2; exit 2; }

restart="${SLURM_RESTART_COUNT:-0}"
log "job ${SLURM_JOB_ID} restart ${restart} on ${SLURM_JOB_NODELIST}: ${TB_NODES} node(s) x ${TB_PROCS_PER_NODE} rank(s), ${TB_LAUNCHER}"

# A different node count (e.g. `sbatch --nodes` on the command line) would leave ranks waiting
# for nodes that never come.
if [ "${SLURM_JOB_NUM_NODES:-}" != "${TB_NODES}" ]; then
  die "the allocation has ${SLURM_JOB_NUM_NODES:-?} node(s) but this script was written for ${TB_NODES}: regenerate it with terrabyte slurm --nodes ${SLURM_JOB_NUM_NODES:-N}"
fi
cd "${TB_WORKDIR}" || die "working directory ${TB_WORKDIR} is missing on $(hostname)"

# The virtual environment must exist on every node before any rank starts.
venv_check='if [ ! -f "$1/bin/activate" ] || [ ! -x "$1/bin/python" ]; then
  echo "terrabyte-slurm: error: virtual environment $1 not found on $(hostname) (create it there or pass terrabyte slurm --venv)" >&2
  exit 2
fi'
if ! srun --nodes="${TB_NODES}" --ntasks="${TB_NODES}" --ntasks-per-node=1 bash -c "${venv_check}" venv-check "${TB_VENV}"; then
  die "virtual environment ${TB_VENV} is missing on a node (see above); no rank was started"
fi
# shellcheck disable=SC1091
. "${TB_VENV}/bin/activate"

MASTER_ADDR="$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)"
MASTER_PORT=$(( TB_PORT_BASE + SLURM_JOB_ID % TB_PORT_RANGE ))
export MASTER_ADDR MASTER_PORT PYTHONUNBUFFERED=1
mkdir -p "${TB_LOG_DIR}"
hostfile="${TB_LOG_DIR}/hostfile-${SLURM_JOB_ID}"
scontrol show hostnames "${SLURM_JOB_NODELIST}" | sed "s/\$/ slots=${TB_PROCS_PER_NODE}/" > "${hostfile}"
log "master ${MASTER_ADDR}:${MASTER_PORT}, run dir ${TB_RUN_DIR}"

# USR1 (from --signal, or `scancel --batch --signal=USR1`) or TERM reaching this shell: relay it to
# the training step as USR2. SLURM delivers a step signal to every process of the step; only the
# per-node `terrabyte launch --run` acts on USR2 (all below it ignore it) and sends each rank one
# USR1, so no rank gets a second signal while it exits. The ranks checkpoint at the next step
# boundary and exit 75.
step_pid=""
forward_stop() {
  log "received $1: asking the ranks to checkpoint and stop"
  if [ -n "${step_pid}" ]; then kill -USR2 "${step_pid}" 2>/dev/null; fi
}
trap 'forward_stop USR1' USR1
trap 'forward_stop TERM' TERM

# srun does not inherit --cpus-per-task from the job (Slurm >= 22.05): pass it on, or every rank of
# a node would share one CPU.
cpus=()
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then cpus=(--cpus-per-task="${SLURM_CPUS_PER_TASK}"); fi
node_cmd='exec terrabyte launch --node-rank "${SLURM_NODEID}" "$@"'
srun --nodes="${TB_NODES}" --ntasks="${TB_NODES}" --ntasks-per-node=1 "${cpus[@]}" \
  bash -c "${node_cmd}" node \
  --launcher "${TB_LAUNCHER}" --nodes "${TB_NODES}" --gpus-per-node "${TB_PROCS_PER_NODE}" \
  --hostfile "${hostfile}" --master-addr "${MASTER_ADDR}" --master-port "${MASTER_PORT}" \
  --rdzv-id "${SLURM_JOB_ID}" --rdzv-timeout "${TB_RDZV_TIMEOUT}" --run \
  -- "${TB_TRAIN_ARGS[@]}" &
step_pid=$!
# `wait` returns early when a trapped signal arrives; wait again until the step is really gone.
while kill -0 "${step_pid}" 2>/dev/null; do wait "${step_pid}"; done
wait "${step_pid}"
rc=$?

if [ "${rc}" -eq 0 ]; then
  log "training finished"
  exit 0
elif [ "${rc}" -eq "${TB_EXIT_PREEMPTED}" ]; then
  if [ "${TB_REQUEUE}" = 1 ]; then
    log "ranks checkpointed and stopped (exit ${rc}): requeueing job ${SLURM_JOB_ID}"
    scontrol requeue "${SLURM_JOB_ID}" || die "scontrol requeue ${SLURM_JOB_ID} failed; resubmit this script to resume"
  else
    log "ranks checkpointed and stopped (exit ${rc}): the next array task resumes"
  fi
  exit 0
fi
log "training failed with exit code ${rc}"
exit "${rc}"
