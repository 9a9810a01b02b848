#!/usr/bin/env bash
# Create a Cloud TPU VM (one host or a pod slice), set up pmsn_jax on every worker, start and
# stop training on all workers at once, read the log, delete the VM. See launch/README.md for a
# walkthrough and `launch/tpu_vm.sh --help` for the options.
#
# It runs on a laptop as well as in Cloud Shell, so it sticks to bash 3.2 (macOS): no
# associative arrays, and empty arrays are expanded as ${a[@]+"${a[@]}"} because `set -u` in
# bash < 4.4 calls a bare "${a[@]}" of an empty array unbound.
set -euo pipefail

PROG=${0##*/}
# shellcheck source=launch/lib.sh
HERE=${BASH_SOURCE[0]%/*}  # no dirname: --help and --dry-run work with nothing on PATH
[[ $HERE == "${BASH_SOURCE[0]}" ]] && HERE=.
source "$HERE/lib.sh"
readonly PROG
readonly SUBCOMMANDS="create setup run logs stop delete status"
# Options that take a value (as --opt=VALUE or --opt VALUE).
readonly VALUE_OPTIONS=" --name --zone --project --accelerator-type --version --repo --ref \
--config --workdir --worker --lines --wait --remote-dir --python --ssh-arg "
# Files on each worker, written as $HOME/... so that the worker's shell expands them.
# shellcheck disable=SC2016
readonly REMOTE_LOG='"$HOME/pmsn_run.log"' REMOTE_PID='"$HOME/pmsn_run.pid"'
readonly LIBTPU_INDEX=https://storage.googleapis.com/jax-releases/libtpu_releases.html

SUBCOMMAND=
NAME=
ZONE=
PROJECT=
ACCELERATOR_TYPE=
# The runtime for v4 and older; v5e, v5p and v6e want v2-alpha-tpuv5-lite, v2-alpha-tpuv5 and
# v2-alpha-tpuv6e (https://cloud.google.com/tpu/docs/runtimes).
VERSION=tpu-ubuntu2204-base
REPO=
REF=
CONFIG=
WORKDIR=
WORKER=0
LINES=100
WAIT_S=600
REMOTE_DIR=pmsn_jax
# The package needs Python >= 3.11; the Ubuntu 22.04 TPU images ship 3.10 as python3.
PYTHON=python3.11
SPOT=0
PREEMPTIBLE=0
YES=0
DRY_RUN=0
SSH_ARGS=()
EXTRA_ARGS=()
LOCATION=()

usage() {
  emit <<EOF
Usage: $PROG SUBCOMMAND --name=TPU --zone=ZONE [options] [-- TRAINING ARGS...]

Subcommands (ssh ones reach every worker with --worker=all, except logs):
  create   gcloud compute tpus tpu-vm create (needs --accelerator-type)
  setup    on every worker: apt packages if missing, git clone/fetch --repo at --ref,
           make setup PYTHON=$PYTHON, then jax[tpu] at the version pinned in requirements.txt
  run      on every worker: nohup python -m pmsn_jax.main --config=... --workdir=gs://...
           [TRAINING ARGS] in the background, log ~/pmsn_run.log, pid ~/pmsn_run.pid.
           Rerunning the same command resumes from the newest checkpoint in the workdir.
  logs     tail -F the log of worker --worker (default 0); Ctrl-C to leave
  stop     SIGTERM to the training process on every worker, so it checkpoints and exits;
           waits up to --wait seconds (default $WAIT_S) for it to exit
  status   the VM's state (READY, PREEMPTED, ...) and whether training runs on each worker
  delete   delete the VM (asks first unless --yes; the gs:// workdir is kept)

Options (one set may be reused for every subcommand; options it does not use are ignored):
  --name NAME             TPU VM name (required)
  --zone ZONE             zone, e.g. us-central2-b (required)
  --project PROJECT       GCP project (default: gcloud's configured one)
  --accelerator-type T    e.g. v4-32 (create)
  --version V             runtime version (create; default $VERSION)
  --spot | --preemptible  create a Spot / preemptible VM (create)
  --repo URL              git URL to clone on the workers (setup)
  --ref REF               branch, tag or full commit to check out (setup; default: the
                          remote's default branch). A commit keeps all workers on one version.
  --python PYTHON         interpreter for the virtualenv (setup; default $PYTHON)
  --remote-dir DIR        checkout on each worker, relative to home (default $REMOTE_DIR)
  --config CONFIG[:ARG]   config file, relative to the checkout (run)
  --workdir gs://...      checkpoints, metrics and WORKDIR/export (run)
  --worker N              worker for logs (default 0)
  --lines N               lines of history logs prints first (default $LINES)
  --wait SECONDS          how long stop waits for training to exit (default $WAIT_S)
  --ssh-arg ARG           extra gcloud ssh flag, repeatable (e.g. --ssh-arg=--internal-ip)
  --yes                   delete without asking
  --dry-run               print every command, quoted for bash, instead of running it
                          (like every option, before --)
  -h, --help              this help

Exit status: that of the last gcloud command; 2 for a usage error.
EOF
}

# Runs a command, or with --dry-run only prints it. Either way the exact words are shown.
run_cmd() {
  if ((DRY_RUN)); then
    quote_cmd "$@"
    return
  fi
  command -v "$1" >/dev/null || die "$1 not found on PATH (install the Google Cloud CLI)"
  printf '+ %s\n' "$(quote_cmd "$@")" >&2
  "$@"
}

# Joins shell statements with "; " into the one-line script that ssh --command runs.
join_statements() {
  local script= statement
  for statement in "$@"; do
    script+="$statement; "
  done
  printf '%s' "${script%; }"
}

parse_args() {
  while (($#)); do
    case $1 in
      --) shift; EXTRA_ARGS=("$@"); return ;;
      -h | --help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1 ;;
      --spot) SPOT=1 ;;
      --preemptible) PREEMPTIBLE=1 ;;
      -y | --yes) YES=1 ;;
      --*=*) set_option "${1%%=*}" "${1#*=}" ;;
      --*)
        [[ $VALUE_OPTIONS == *" $1 "* ]] || die "unknown option $1"
        (($# >= 2)) || die "option $1 needs a value"
        set_option "$1" "$2"
        shift
        ;;
      -*) die "unknown option $1" ;;
      *)
        [[ -z $SUBCOMMAND ]] || die "unexpected argument '$1' (training arguments go after --)"
        SUBCOMMAND=$1
        ;;
    esac
    shift
  done
}

set_option() {
  case $1 in
    --name) NAME=$2 ;;
    --zone) ZONE=$2 ;;
    --project) PROJECT=$2 ;;
    --accelerator-type) ACCELERATOR_TYPE=$2 ;;
    --version) VERSION=$2 ;;
    --repo) REPO=$2 ;;
    --ref) REF=$2 ;;
    --config) CONFIG=$2 ;;
    --workdir) WORKDIR=$2 ;;
    --worker) WORKER=$2 ;;
    --lines) LINES=$2 ;;
    --wait) WAIT_S=$2 ;;
    --remote-dir) REMOTE_DIR=$2 ;;
    --python) PYTHON=$2 ;;
    --ssh-arg) SSH_ARGS+=("$2") ;;
    *) die "unknown option $1" ;;
  esac
}

require_uint() {  # require_uint OPTION VALUE
  [[ $2 =~ ^[0-9]+$ ]] || die "$1 must be a whole number, not '$2'"
}

validate() {
  [[ -n $SUBCOMMAND ]] || die "missing subcommand (one of: $SUBCOMMANDS); see --help"
  [[ " $SUBCOMMANDS " == *" $SUBCOMMAND "* ]] ||
    die "unknown subcommand '$SUBCOMMAND' (one of: $SUBCOMMANDS)"
  [[ -n $NAME ]] || die "--name is required"
  [[ -n $ZONE ]] || die "--zone is required"
  require_uint --worker "$WORKER"
  require_uint --lines "$LINES"
  require_uint --wait "$WAIT_S"
  LOCATION=(--zone="$ZONE")
  [[ -z $PROJECT ]] || LOCATION+=(--project="$PROJECT")
}

tpu_ssh() {  # tpu_ssh WORKER REMOTE_SCRIPT
  local cmd=(gcloud compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker="$1"
    --command="$2")
  cmd+=(${SSH_ARGS[@]+"${SSH_ARGS[@]}"})
  run_cmd "${cmd[@]}"
}

# A remote test that process $1 is a training process. Its command line is checked, not just
# `kill -0`: a stale pid file may name a reused pid, and an unreaped zombie still answers kill -0.
is_training() {
  printf '[ -n %s ] && ps -o args= -p %s 2>/dev/null | grep -q pmsn_jax.main' "$1" "$1"
}

# Remote statements that set $pid from the pid file and $alive to 1 if it still trains.
alive_check() {
  # shellcheck disable=SC2016  # expanded on the worker
  printf '%s' "pid=\$(cat $REMOTE_PID 2>/dev/null || true); alive=0; " \
    "if $(is_training '"$pid"'); then alive=1; fi"
}

cmd_create() {
  [[ -n $ACCELERATOR_TYPE ]] || die "create needs --accelerator-type (e.g. v4-32)"
  ((SPOT + PREEMPTIBLE < 2)) || die "choose one of --spot and --preemptible"
  local cmd=(gcloud compute tpus tpu-vm create "$NAME" "${LOCATION[@]}"
    --accelerator-type="$ACCELERATOR_TYPE" --version="$VERSION")
  if ((SPOT)); then cmd+=(--spot); fi
  if ((PREEMPTIBLE)); then cmd+=(--preemptible); fi
  run_cmd "${cmd[@]}"
}

cmd_setup() {
  [[ -n $REPO ]] || die "setup needs --repo (the git URL to clone on the workers)"
  local py dir checkout
  py=$(printf '%q' "$PYTHON")
  dir=$(printf '%q' "$REMOTE_DIR")
  # Detached at what was just fetched, so a rerun of setup moves every worker to the new ref.
  # Separate statements, not `a && b`: `set -e` ignores a failure on the left of &&.
  if [[ -n $REF ]]; then
    checkout=$(join_statements "git fetch -q origin $(printf '%q' "$REF")" \
      'git checkout -q --detach FETCH_HEAD')
  else
    checkout=$(join_statements 'git fetch -q origin' 'git checkout -q --detach origin/HEAD')
  fi
  local script
  # shellcheck disable=SC2016  # $need, $(hostname)... are expanded on the worker
  script=$(join_statements \
    'set -e' \
    'need=' \
    'command -v git >/dev/null || need="$need git"' \
    'command -v make >/dev/null || need="$need make"' \
    "$py -c 'import ensurepip' 2>/dev/null || need=\"\$need $py $py-venv\"" \
    'if [ -n "$need" ]; then sudo apt-get -q -o DPkg::Lock::Timeout=600 update; sudo apt-get -q -y -o DPkg::Lock::Timeout=600 install $need; fi' \
    "[ -d $dir/.git ] || git clone -q $(printf '%q' "$REPO") $dir" \
    "cd $dir" \
    "$checkout" \
    'echo "$(hostname): at $(git log -1 --format="%h %s")"' \
    "make setup PYTHON=$py" \
    "jax_version=\$(sed -n 's/^jax==//p' requirements.txt)" \
    '[ -n "$jax_version" ] || { echo "$(hostname): no jax== pin in requirements.txt" >&2; exit 1; }' \
    ".venv/bin/pip install -q -U \"jax[tpu]==\$jax_version\" -f $LIBTPU_INDEX" \
    'echo "$(hostname): setup done, jax $(.venv/bin/python -c "import jax; print(jax.__version__)")"')
  tpu_ssh all "$script"
}

cmd_run() {
  [[ -n $CONFIG ]] || die "run needs --config (e.g. configs/pmsn_vits16_inat18.py)"
  [[ -n $WORKDIR ]] || die "run needs --workdir"
  # Every worker must see the same checkpoints, and so must a VM recreated after preemption.
  [[ $WORKDIR == gs://* ]] || die "--workdir must be a gs:// path that every worker shares"
  local train script
  # -u: unbuffered, so the log shows progress as it happens and the last lines before a crash.
  train=$(quote_cmd .venv/bin/python -u -m pmsn_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
    ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"})
  # nohup and no terminal: the ssh session can end (or drop) without taking training with it.
  # shellcheck disable=SC2016  # $(hostname), $pid, $! are expanded on the worker
  script=$(join_statements \
    "cd $(printf '%q' "$REMOTE_DIR") || { echo \"\$(hostname): no checkout, run setup first\" >&2; exit 1; }" \
    "$(alive_check)" \
    'if [ "$alive" = 1 ]; then echo "$(hostname): training already runs (pid $pid); stop it first" >&2; exit 1; fi' \
    "echo \"=== \$(date -u) start on \$(hostname) ===\" >> $REMOTE_LOG" \
    "nohup $train >> $REMOTE_LOG 2>&1 < /dev/null & echo \$! > $REMOTE_PID" \
    'echo "$(hostname): training started (pid $!), log in ~/pmsn_run.log"')
  tpu_ssh all "$script"
}

cmd_logs() {
  tpu_ssh "$WORKER" "tail -n $LINES -F $REMOTE_LOG"
}

cmd_stop() {
  local script
  # shellcheck disable=SC2016  # $pid, $waited, $(hostname) are expanded on the worker
  script=$(join_statements \
    "$(alive_check)" \
    'if [ "$alive" = 0 ]; then echo "$(hostname): no training running"; exit 0; fi' \
    'kill -TERM "$pid"' \
    "echo \"\$(hostname): sent SIGTERM to \$pid, waiting up to $WAIT_S s for it to exit\"" \
    'waited=0' \
    "while $(is_training '"$pid"'); do if [ \"\$waited\" -ge $WAIT_S ]; then echo \"\$(hostname): pid \$pid still runs after $WAIT_S s\" >&2; exit 1; fi; sleep 1; waited=\$((waited + 1)); done" \
    'echo "$(hostname): training exited"')
  tpu_ssh all "$script"
}

cmd_status() {
  run_cmd gcloud compute tpus tpu-vm describe "$NAME" "${LOCATION[@]}" \
    --format='value(state)'
  local script
  # shellcheck disable=SC2016  # expanded on the worker
  script=$(join_statements \
    "$(alive_check)" \
    'if [ "$alive" = 1 ]; then echo "$(hostname): training runs (pid $pid)"; else echo "$(hostname): no training running"; fi')
  tpu_ssh all "$script"
}

cmd_delete() {
  if ((!DRY_RUN && !YES)); then
    [[ -t 0 ]] || die "delete asks for confirmation; pass --yes when there is no terminal"
    local answer
    read -r -p "Delete TPU VM $NAME in $ZONE? Its disks are lost; gs:// workdirs stay. [y/N] " \
      answer
    [[ $answer == [yY] || $answer == [yY][eE][sS] ]] || { echo "not deleted" >&2; exit 1; }
  fi
  # --quiet: gcloud would ask again.
  run_cmd gcloud compute tpus tpu-vm delete "$NAME" "${LOCATION[@]}" --quiet
}

main() {
  parse_args "$@"
  validate
  "cmd_$SUBCOMMAND"
}

main "$@"
