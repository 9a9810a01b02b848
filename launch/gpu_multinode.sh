#!/usr/bin/env bash
# Multi-node GPU training of pmsn_jax: one process per node, each driving all of its node's GPUs.
#
#   under SLURM (inside sbatch/salloc, i.e. SLURM_JOB_ID is set, or with --slurm):
#       runs `srun` with one task per node; JAX reads the cluster from SLURM's variables.
#   --print-sbatch --nodes=N: prints a batch script that calls this script under SLURM.
#   anywhere else: run it once on every node with NNODES, NODE_RANK and COORDINATOR=host:port
#       in the environment; it passes --coordinator_address/--num_processes/--process_id.
#
# See launch/README.md for walkthroughs and `launch/gpu_multinode.sh --help` for the options.
#
# Environment, deliberately left alone:
# - XLA_PYTHON_CLIENT_MEM_FRACTION keeps JAX's default (preallocate 75% of each GPU): the
#   rest is what cuDNN and NCCL workspaces use, and nothing else shares these GPUs.
# - No NCCL_* settings: NCCL finds InfiniBand/RoCE and NVLink by itself, and the right
#   NCCL_SOCKET_IFNAME or NCCL_IB_HCA depend on the cluster. Export them before calling this
#   script if your cluster documents them; srun and exec pass the environment on.
# - TensorFlow (tf.data) is tensorflow-cpu, so it never claims a GPU.
set -euo pipefail

PROG=${0##*/}
# shellcheck source=launch/lib.sh
HERE=${BASH_SOURCE[0]%/*}  # no dirname: --help and --dry-run work with nothing on PATH
[[ $HERE == "${BASH_SOURCE[0]}" ]] && HERE=.
source "$HERE/lib.sh"
readonly PROG
case ${BASH_SOURCE[0]} in
  */*) REPO_ROOT=$(cd "${BASH_SOURCE[0]%/*}/.." && pwd) ;;
  *) REPO_ROOT=$(cd .. && pwd) ;;
esac
readonly REPO_ROOT
readonly VALUE_OPTIONS=" --config --workdir --nodes --gpus-per-node --cpus-per-task \
--job-name --python "

CONFIG=
WORKDIR=
NODES=
GPUS_PER_NODE=
CPUS_PER_TASK=
JOB_NAME=pmsn
# Relative to the repository root, where the command runs (configs/... are relative too).
PYTHON=.venv/bin/python
FORCE_SLURM=0
NO_SLURM=0
PRINT_SBATCH=0
DRY_RUN=0
EXTRA_ARGS=()

usage() {
  emit <<EOF
Usage: $PROG --config=CONFIG[:ARG] --workdir=DIR [options] [-- TRAINING ARGS...]

Modes:
  SLURM (SLURM_JOB_ID set, or --slurm)
      srun --ntasks-per-node=1 python -m pmsn_jax.main ...; run it from the batch script or
      the salloc shell, not under srun.
  --print-sbatch --nodes=N
      print a batch script (whole nodes, SIGTERM 300 s before the time limit, requeue) that
      runs this script under SLURM; submit it with sbatch. Nothing runs.
  plain (no SLURM, or --no-slurm)
      run once per node with NNODES (node count), NODE_RANK (0..NNODES-1) and
      COORDINATOR (host:port of rank 0, reachable from every node) in the environment.

Options:
  --config CONFIG[:ARG]   config file relative to the repository root (required)
  --workdir DIR           checkpoints, metrics and DIR/export; shared by all nodes (required)
  --nodes N               SLURM node count (--print-sbatch: required; srun: default all)
  --gpus-per-node G       GPUs per node (default: SLURM_GPUS_ON_NODE, else 8)
  --cpus-per-task C       CPUs for each node's process under srun (default: SLURM_CPUS_ON_NODE)
  --job-name NAME         sbatch job name (default $JOB_NAME)
  --python PATH           interpreter, relative to the repository root (default $PYTHON)
  --slurm | --no-slurm    force SLURM or plain mode
  --dry-run               print the commands, quoted for bash, instead of running them
                          (like every option, before --)
  -h, --help              this help

Exit status: that of pmsn_jax.main (0 done, 2 user error; on SIGTERM see docs/reliability.md),
or of srun; 2 for a usage error of this script.
EOF
}

parse_args() {
  while (($#)); do
    case $1 in
      --) shift; EXTRA_ARGS=("$@"); return ;;
      -h | --help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1 ;;
      --slurm) FORCE_SLURM=1 ;;
      --no-slurm) NO_SLURM=1 ;;
      --print-sbatch) PRINT_SBATCH=1 ;;
      --*=*) set_option "${1%%=*}" "${1#*=}" ;;
      --*)
        [[ $VALUE_OPTIONS == *" $1 "* ]] || die "unknown option $1"
        (($# >= 2)) || die "option $1 needs a value"
        set_option "$1" "$2"
        shift
        ;;
      *) die "unexpected argument '$1' (training arguments go after --)" ;;
    esac
    shift
  done
}

set_option() {
  case $1 in
    --config) CONFIG=$2 ;;
    --workdir) WORKDIR=$2 ;;
    --nodes) NODES=$2 ;;
    --gpus-per-node) GPUS_PER_NODE=$2 ;;
    --cpus-per-task) CPUS_PER_TASK=$2 ;;
    --job-name) JOB_NAME=$2 ;;
    --python) PYTHON=$2 ;;
    *) die "unknown option $1" ;;
  esac
}

require_positive() {  # require_positive WHAT VALUE
  [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive whole number, not '$2'"
}

validate() {
  ((FORCE_SLURM + NO_SLURM < 2)) || die "choose one of --slurm and --no-slurm"
  [[ -n $CONFIG ]] || die "--config is required (e.g. configs/pmsn_vits16_inat18.py)"
  [[ -n $WORKDIR ]] || die "--workdir is required"
  [[ -z $NODES ]] || require_positive --nodes "$NODES"
  [[ -z $GPUS_PER_NODE ]] || require_positive --gpus-per-node "$GPUS_PER_NODE"
  [[ -z $CPUS_PER_TASK ]] || require_positive --cpus-per-task "$CPUS_PER_TASK"
  [[ $JOB_NAME =~ ^[A-Za-z0-9_.-]+$ ]] || die "--job-name may use letters, digits and _.- only"
}

# The training command, with the distributed flags given as arguments. -u: unbuffered output,
# so a log file shows progress as it happens and the last lines before a crash.
train_cmd() {
  TRAIN=("$PYTHON" -u -m pmsn_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
    ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"})
}

# "0,1,...,N-1"
device_ids() {
  local ids=0 i
  for ((i = 1; i < $1; i++)); do
    ids+=",$i"
  done
  printf '%s' "$ids"
}

# Under SLURM, jax.distributed.initialize() gives each process only the GPU numbered
# SLURM_LOCALID (JAX's one-process-per-GPU default for managed clusters): with one task per node
# that is GPU 0 alone. JAX_LOCAL_DEVICE_IDS, read by initialize() (jax 0.10.2,
# jax/_src/distributed.py), hands the process every GPU of its node instead.
slurm_cmd() {
  local gpus=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
  local cpus=${CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-}}
  require_positive "GPUs per node" "$gpus"
  # --kill-on-bad-exit: one node failing ends the others instead of leaving them blocked in a
  # collective until a timeout.
  CMD=(env "JAX_LOCAL_DEVICE_IDS=${JAX_LOCAL_DEVICE_IDS:-$(device_ids "$gpus")}"
    srun --ntasks-per-node=1 --kill-on-bad-exit=1)
  if [[ -n $NODES ]]; then CMD+=(--nodes="$NODES"); fi
  # A step's task gets one CPU unless told otherwise (confined to it where SLURM constrains
  # cores), which would starve the input pipeline.
  if [[ -n $cpus ]]; then CMD+=(--cpus-per-task="$cpus"); fi
  train_cmd
  CMD+=("${TRAIN[@]}")
}

plain_cmd() {
  [[ -n ${NNODES-} && -n ${NODE_RANK-} && -n ${COORDINATOR-} ]] ||
    die "set NNODES, NODE_RANK and COORDINATOR=host:port on every node (or run under SLURM)"
  require_positive NNODES "$NNODES"
  if ! [[ $NODE_RANK =~ ^[0-9]+$ ]] || ((10#$NODE_RANK >= NNODES)); then
    die "NODE_RANK must be a whole number below NNODES=$NNODES, not '$NODE_RANK'"
  fi
  [[ $COORDINATOR =~ ^[^[:space:]]+:[0-9]+$ ]] ||
    die "COORDINATOR must be host:port of the rank-0 node, not '$COORDINATOR'"
  train_cmd --coordinator_address="$COORDINATOR" --num_processes="$NNODES" \
    --process_id="$((10#$NODE_RANK))"
  CMD=("${TRAIN[@]}")
}

print_sbatch() {
  [[ -n $NODES ]] || die "--print-sbatch needs --nodes"
  local gpus=${GPUS_PER_NODE:-8}
  local launch=(launch/gpu_multinode.sh --slurm --gpus-per-node="$gpus" --config="$CONFIG"
    --workdir="$WORKDIR")
  if [[ $PYTHON != .venv/bin/python ]]; then launch+=(--python="$PYTHON"); fi
  if ((${#EXTRA_ARGS[@]})); then launch+=(-- "${EXTRA_ARGS[@]}"); fi
  emit <<EOF
#!/bin/bash
# Written by launch/gpu_multinode.sh --print-sbatch. Submit: sbatch [--partition=P --time=T] FILE
# Submitting it again after it ends resumes from the newest checkpoint in the workdir.
#SBATCH --job-name=$JOB_NAME
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$gpus
# Whole nodes: each node's one process feeds its GPUs from a tf.data pipeline that uses every core.
#SBATCH --exclusive
# SIGTERM to the training processes 300 s before the time limit so they can checkpoint and exit;
# at the limit itself SLURM allows only KillWait (30 s by default) between SIGTERM and SIGKILL.
#SBATCH --signal=TERM@300
# Where the cluster preempts by requeueing, the requeued job resumes from the checkpoint.
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail
cd $(printf '%q' "$REPO_ROOT")
exec $(quote_cmd "${launch[@]}")
EOF
}

# Runs CMD in the repository root, replacing this shell so that signals (SIGTERM from SLURM or
# a preemption) reach srun or the training process directly. $1: a program CMD needs on PATH.
run_in_repo() {
  if ((DRY_RUN)); then
    quote_cmd cd "$REPO_ROOT"
    quote_cmd "${CMD[@]}"
    return
  fi
  cd "$REPO_ROOT"
  [[ -z ${1-} ]] || command -v "$1" >/dev/null || die "$1 not found on PATH"
  # Under srun too: the other nodes see this checkout through the shared filesystem.
  [[ -x $PYTHON ]] || die "no $PYTHON in $REPO_ROOT: run make setup, then install jax[cuda12]"
  printf '+ %s\n' "$(quote_cmd "${CMD[@]}")" >&2
  exec "${CMD[@]}"
}

# SLURM mode: asked for, or inside a job (sbatch script or salloc shell) unless --no-slurm.
use_slurm() {
  ((FORCE_SLURM)) || { [[ -n ${SLURM_JOB_ID-} ]] && ((!NO_SLURM)); }
}

main() {
  parse_args "$@"
  validate
  if ((PRINT_SBATCH)); then
    print_sbatch
  elif use_slurm; then
    slurm_cmd
    run_in_repo srun
  else
    plain_cmd
    run_in_repo
  fi
}

main "$@"
