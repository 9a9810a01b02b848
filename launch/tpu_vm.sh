#!/usr/bin/env bash
# Create a Cloud TPU VM (one host or a pod slice, directly or as a queued resource), set up
# pmsn_jax on every worker, check that the train step fits before training starts, start and
# stop training on all workers at once, read the log, delete the VM; or `watch`: all of that in
# a loop that recreates the slice after a preemption and resumes until training is done. See
# launch/README.md for a walkthrough and `launch/tpu_vm.sh --help` for the options.
#
# It runs on a laptop as well as in Cloud Shell, so it sticks to bash 3.2 (macOS): no
# associative arrays, and empty arrays are expanded as ${a[@]+"${a[@]}"} because `set -u` in
# bash < 4.4 calls a bare "${a[@]}" of an empty array unbound.
set -euo pipefail

PROG=${0##*/}
HERE=${BASH_SOURCE[0]%/*}  # no dirname: --help and --dry-run work with nothing on PATH
[[ $HERE == "${BASH_SOURCE[0]}" ]] && HERE=.
# shellcheck source=launch/lib.sh
source "$HERE/lib.sh"
readonly PROG
readonly SUBCOMMANDS="create setup preflight run watch logs stop delete status"
# Options that take a value (as --opt=VALUE or --opt VALUE).
readonly VALUE_OPTIONS=" --name --zone --project --accelerator-type --version --repo --ref \
--config --workdir --worker --lines --wait --remote-dir --python --ssh-arg --topology \
--max-restarts --poll --queue-timeout "
# Files on each worker, written as $HOME/... so that the worker's shell expands them.
# shellcheck disable=SC2016
readonly REMOTE_LOG='"$HOME/pmsn_run.log"' REMOTE_PID='"$HOME/pmsn_run.pid"' \
  REMOTE_EXIT='"$HOME/pmsn_run.exit"'
readonly LIBTPU_INDEX=https://storage.googleapis.com/jax-releases/libtpu_releases.html
# What the training-state probe (`watch`, on worker 0) prints before its answer.
readonly PROBE_TAG="pmsn-training:"
# `watch` gives up after this many polls in a row that could not read training's state.
readonly MAX_UNREACHABLE=10

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
TOPOLOGY=
SKIP_PREFLIGHT=0
QUEUED=0
SPOT=0
PREEMPTIBLE=0
RESERVED=0
MAX_RESTARTS=10
POLL_S=60
QUEUE_TIMEOUT_S=7200
DELETE_WHEN_DONE=0
YES=0
DRY_RUN=0
SSH_ARGS=()
EXTRA_ARGS=()
LOCATION=()
# Set by the functions below (bash 3.2 functions return no arrays): a gcloud command line, the
# --config.* training arguments, a query's output and exit status, the slice's state, ...
CMD=()
OVERRIDES=()
OUT=
RC=0
STATE=
TRAINING=
UP=0
FRESH=0
OUTCOME=
WHY=

usage() {
  emit <<EOF
Usage: $PROG SUBCOMMAND --name=TPU --zone=ZONE [options] [-- TRAINING ARGS...]

Subcommands (ssh ones reach every worker with --worker=all, except logs and preflight):
  create    gcloud compute tpus tpu-vm create (needs --accelerator-type); with --queued,
            gcloud compute tpus queued-resources create, then waits until it is ACTIVE
  setup     on every worker: apt packages if missing, git clone/fetch --repo at --ref,
            make setup PYTHON=$PYTHON, then jax[tpu] at the version pinned in requirements.txt
  preflight on worker 0: python -m pmsn_jax.aot --config=... --topology=... [--config.* ARGS]:
            compiles the train step for the slice's topology (from --accelerator-type, or
            --topology) and checks it fits per-chip HBM; exit 3 if it does not
  run       preflight (unless --skip-preflight), then on every worker: nohup python -m
            pmsn_jax.main --config=... --workdir=gs://... [TRAINING ARGS] in the background, log
            ~/pmsn_run.log, pid ~/pmsn_run.pid, exit status ~/pmsn_run.exit once it ends.
            Rerunning the same command resumes from the newest checkpoint in the workdir.
  watch     create the slice if it does not exist, setup, preflight, run, then poll every
            --poll seconds until training exits 0. When the slice is lost (PREEMPTED,
            TERMINATED, queued resource SUSPENDED) it deletes and recreates it, sets it up and
            runs again, resuming from the workdir's checkpoint; when training exits non-zero on
            a live slice it stops what is left and runs again; at most --max-restarts times.
            Needs --accelerator-type, --repo, --config and a gs:// --workdir. If training
            already runs on the slice it only watches. Ctrl-C leaves training running.
  logs      tail -F the log of worker --worker (default 0); Ctrl-C to leave
  stop      SIGTERM to the training process on every worker, so it checkpoints and exits;
            waits up to --wait seconds (default $WAIT_S) for it to exit
  status    the VM's state (READY, PREEMPTED, ...; with --queued first the queued resource's)
            and whether training runs on each worker
  delete    delete the VM (with --queued: the queued resource and its VM); asks first unless
            --yes; the gs:// workdir is kept

Options (one set may be reused for every subcommand; options it does not use are ignored):
  --name NAME             TPU VM name, and the queued resource's with --queued (required)
  --zone ZONE             zone, e.g. us-central2-b (required)
  --project PROJECT       GCP project (default: gcloud's configured one)
  --accelerator-type T    e.g. v4-32 (create, watch; preflight/run/watch derive the topology)
  --version V             runtime version (create; default $VERSION)
  --spot | --preemptible | --reserved
                          a Spot / preemptible VM, or one from your reservation (create,
                          watch; --queued takes --spot or --reserved)
  --queued                create as a queued resource and wait until ACTIVE; status, delete
                          and watch then use the queued resource (create, watch, status, delete)
  --queue-timeout SECONDS how long to wait for ACTIVE (or READY) (default $QUEUE_TIMEOUT_S; 0: no limit)
  --repo URL              git URL to clone on the workers (setup, watch)
  --ref REF               branch, tag or full commit to check out (setup; default: the
                          remote's default branch). A commit keeps all workers on one version.
  --python PYTHON         interpreter for the virtualenv (setup; default $PYTHON)
  --remote-dir DIR        checkout on each worker, relative to home (default $REMOTE_DIR)
  --config CONFIG[:ARG]   config file, relative to the checkout (preflight, run, watch)
  --workdir gs://...      checkpoints, metrics and WORKDIR/export (run, watch)
  --topology T            topology for the pre-flight, e.g. v4:2x2x4 (default: from
                          --accelerator-type: v4-32 -> v4:2x2x4, v5litepod-16 -> v5e:4x4, ...)
  --skip-preflight        start training without the pre-flight (run, watch)
  --max-restarts N        restarts watch makes before it gives up (default $MAX_RESTARTS)
  --poll SECONDS          how often watch and --queued look at the state (default $POLL_S)
  --delete-when-done      watch deletes the slice once training exited 0
  --worker N              worker for logs (default 0)
  --lines N               lines of history logs prints first (default $LINES)
  --wait SECONDS          how long stop waits for training to exit (default $WAIT_S); watch
                          sends SIGKILL after that
  --ssh-arg ARG           extra gcloud ssh flag, repeatable (e.g. --ssh-arg=--internal-ip)
  --yes                   delete without asking
  --dry-run               print every command, quoted for bash, instead of running it; lines
                          starting with # say when the ones after them run (like every option,
                          before --)
  -h, --help              this help

Exit status: that of the last gcloud command; 2 for a usage error; a failed pre-flight's
(3: the train step does not fit); watch: 0 once training exited 0, 1 when it gave up.
EOF
}

# Runs a command, or with --dry-run only prints it. Either way the exact words are shown.
run_cmd() {
  if ((DRY_RUN)); then
    quote_cmd "$@"
    return
  fi
  need "$1"
  printf '+ %s\n' "$(quote_cmd "$@")" >&2
  "$@"
}

need() {
  command -v "$1" >/dev/null || die "$1 not found on PATH (install the Google Cloud CLI)"
}

# Runs a query quietly: its output (stdout and stderr) in OUT, its exit status in RC.
query() {
  need "$1"
  RC=0
  OUT=$("$@" 2>&1) || RC=$?
}

# With --dry-run, a "# ..." line that says when the commands after it run.
plan() {
  if ((DRY_RUN)); then printf '# %s\n' "$*"; fi
}

# A progress line on stderr, with the time (UTC).
note() {
  printf '%s %s: %s\n' "$(date -u +%H:%M:%S 2>/dev/null)" "$PROG" "$*" >&2
}

# One line on stderr and exit status $1 (die is the same with status 2).
fail() {
  printf '%s: error: %s\n' "$PROG" "$2" >&2
  exit "$1"
}

# Joins shell statements with "; " into the one-line script that ssh --command runs.
join_statements() {
  local script='' statement
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
      --reserved) RESERVED=1 ;;
      --queued) QUEUED=1 ;;
      --skip-preflight) SKIP_PREFLIGHT=1 ;;
      --delete-when-done) DELETE_WHEN_DONE=1 ;;
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
    --topology) TOPOLOGY=$2 ;;
    --max-restarts) MAX_RESTARTS=$2 ;;
    --poll) POLL_S=$2 ;;
    --queue-timeout) QUEUE_TIMEOUT_S=$2 ;;
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
  require_uint --max-restarts "$MAX_RESTARTS"
  require_uint --poll "$POLL_S"
  require_uint --queue-timeout "$QUEUE_TIMEOUT_S"
  # Base 10 from here on: (( )) would read 08 as a bad octal number.
  MAX_RESTARTS=$((10#$MAX_RESTARTS)) POLL_S=$((10#$POLL_S))
  QUEUE_TIMEOUT_S=$((10#$QUEUE_TIMEOUT_S))
  LOCATION=(--zone="$ZONE")
  [[ -z $PROJECT ]] || LOCATION+=(--project="$PROJECT")
}

# The topology that pmsn_jax.aot takes (as jax.experimental.topologies names it) of a standard
# slice: v4 and v5p accelerator types count TensorCores (2 per chip, so v4-32 is 16 chips,
# 2x2x4), v5litepod (v5e) and v6e count chips. Fails for any other type.
topology_of() {
  local generation=${1%-*} count=${1##*-} shapes entry
  case $generation in
    v4 | v5p)
      shapes="8:2x2x1 16:2x2x2 32:2x2x4 64:2x4x4 128:4x4x4 256:4x4x8 512:4x8x8 1024:8x8x8 \
2048:8x8x16 4096:8x16x16"
      ;;
    v5litepod | v6e)
      shapes="1:1x1 4:2x2 8:2x4 16:4x4 32:4x8 64:8x8 128:8x16 256:16x16"
      [[ $generation == v6e ]] || generation=v5e
      ;;
    *) return 1 ;;
  esac
  for entry in $shapes; do
    if [[ ${entry%%:*} == "$count" ]]; then
      printf '%s:%s' "$generation" "${entry#*:}"
      return 0
    fi
  done
  return 1
}

# Sets TOPOLOGY for the pre-flight (preflight; run and watch unless --skip-preflight).
resolve_topology() {
  if [[ -n $TOPOLOGY ]]; then
    [[ $TOPOLOGY =~ ^[a-z0-9]+:[0-9]+(x[0-9]+)+$ ]] ||
      die "--topology must look like v4:2x2x4 or v5e:4x4, not '$TOPOLOGY'"
    return
  fi
  [[ -n $ACCELERATOR_TYPE ]] || die "$SUBCOMMAND checks first that the train step fits the \
slice: give --accelerator-type (e.g. v4-32) or --topology (e.g. v4:2x2x4), or --skip-preflight"
  TOPOLOGY=$(topology_of "$ACCELERATOR_TYPE") || die "no topology known for accelerator type \
'$ACCELERATOR_TYPE': pass --topology (e.g. v4:2x2x4 for a v4-32) or --skip-preflight"
}

check_create_options() {
  [[ -n $ACCELERATOR_TYPE ]] || die "$SUBCOMMAND needs --accelerator-type (e.g. v4-32)"
  ((SPOT + PREEMPTIBLE + RESERVED < 2)) || die "choose one of --spot, --preemptible and --reserved"
  ((!QUEUED || !PREEMPTIBLE)) || die "a queued resource takes --spot or --reserved, not --preemptible"
}

check_run_options() {
  [[ -n $CONFIG ]] || die "$SUBCOMMAND needs --config (e.g. configs/pmsn_vits16_inat18.py)"
  [[ -n $WORKDIR ]] || die "$SUBCOMMAND needs --workdir"
  # Every worker must see the same checkpoints, and so must a VM recreated after preemption.
  [[ $WORKDIR == gs://* ]] || die "--workdir must be a gs:// path that every worker shares"
}

# ------------------------------------------------------------------------ gcloud command lines

ssh_cmd() {  # ssh_cmd WORKER REMOTE_SCRIPT
  CMD=(gcloud compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker="$1" --command="$2")
  CMD+=(${SSH_ARGS[@]+"${SSH_ARGS[@]}"})
}

tpu_ssh() {  # tpu_ssh WORKER REMOTE_SCRIPT
  ssh_cmd "$@"
  run_cmd "${CMD[@]}"
}

create_cmd() {
  if ((QUEUED)); then
    CMD=(gcloud compute tpus queued-resources create "$NAME" "${LOCATION[@]}" --node-id="$NAME"
      --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$VERSION")
  else
    CMD=(gcloud compute tpus tpu-vm create "$NAME" "${LOCATION[@]}"
      --accelerator-type="$ACCELERATOR_TYPE" --version="$VERSION")
  fi
  if ((SPOT)); then CMD+=(--spot); fi
  if ((PREEMPTIBLE)); then CMD+=(--preemptible); fi
  if ((RESERVED)); then CMD+=(--reserved); fi
}

# The node's state, or with --queued the queued resource's.
describe_cmd() {
  if ((QUEUED)); then
    CMD=(gcloud compute tpus queued-resources describe "$NAME" "${LOCATION[@]}"
      --format='value(state.state)')
  else
    CMD=(gcloud compute tpus tpu-vm describe "$NAME" "${LOCATION[@]}" --format='value(state)')
  fi
}

# --quiet: gcloud would ask again. --force: the queued resource's VM goes with it.
delete_cmd() {
  if ((QUEUED)); then
    CMD=(gcloud compute tpus queued-resources delete "$NAME" "${LOCATION[@]}" --force --quiet)
  else
    CMD=(gcloud compute tpus tpu-vm delete "$NAME" "${LOCATION[@]}" --quiet)
  fi
}

# ---------------------------------------------------------------------- scripts for the workers

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

cd_checkout() {
  # shellcheck disable=SC2016  # expanded on the worker
  printf '%s' "cd $(printf '%q' "$REMOTE_DIR") || { echo \"\$(hostname): no checkout, run setup first\" >&2; exit 1; }"
}

refuse_if_training() {
  # shellcheck disable=SC2016  # expanded on the worker
  printf '%s' 'if [ "$alive" = 1 ]; then echo "$(hostname): training already runs (pid $pid); stop it first" >&2; exit 1; fi'
}

setup_script() {
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
  # shellcheck disable=SC2016  # $need, $(hostname)... are expanded on the worker
  join_statements \
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
    'echo "$(hostname): setup done, jax $(.venv/bin/python -c "import jax; print(jax.__version__)")"'
}

# Sets OVERRIDES: the --config.KEY=VALUE (or --config.KEY VALUE) words of the training
# arguments, which the pre-flight gets as well.
config_overrides() {
  OVERRIDES=()
  local i=0 n=${#EXTRA_ARGS[@]}
  while ((i < n)); do
    if [[ ${EXTRA_ARGS[i]} == --config.* ]]; then
      OVERRIDES+=("${EXTRA_ARGS[i]}")
      if [[ ${EXTRA_ARGS[i]} != *=* ]] && ((i + 1 < n)) && [[ ${EXTRA_ARGS[i + 1]} != -* ]]; then
        OVERRIDES+=("${EXTRA_ARGS[i + 1]}")
        i=$((i + 1))
      fi
    fi
    i=$((i + 1))
  done
}

# On worker 0, before training starts: its exit status is pmsn_jax.aot's (0 fits, 3 does not
# fit, 2 bad input). libtpu is there (setup installs jax[tpu]), and the chips are free.
preflight_script() {
  config_overrides
  local aot
  aot=$(quote_cmd .venv/bin/python -m pmsn_jax.aot --config="$CONFIG" --topology="$TOPOLOGY" \
    ${OVERRIDES[@]+"${OVERRIDES[@]}"})
  # shellcheck disable=SC2016  # expanded on the worker
  join_statements \
    "$(cd_checkout)" \
    "$(alive_check)" \
    "$(refuse_if_training)" \
    "echo \"\$(hostname): pre-flight: does the train step compile and fit on $TOPOLOGY?\"" \
    "$aot"
}

# Starts training in the background on each worker. A subshell waits for it and writes its exit
# status to ~/pmsn_run.exit; it and training ignore SIGHUP (trap, nohup) and have no terminal, so
# the ssh session can end (or drop) without taking training with it. The script returns once
# the pid file is written, so that a status or stop right after it sees training.
run_script() {
  local train
  # -u: unbuffered, so the log shows progress as it happens and the last lines before a crash.
  train=$(quote_cmd .venv/bin/python -u -m pmsn_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
    ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"})
  # shellcheck disable=SC2016  # $(hostname), $pid, $!, $? are expanded on the worker
  join_statements \
    "$(cd_checkout)" \
    "$(alive_check)" \
    "$(refuse_if_training)" \
    "rm -f $REMOTE_PID $REMOTE_EXIT" \
    "echo \"=== \$(date -u) start on \$(hostname) ===\" >> $REMOTE_LOG" \
    "( trap '' HUP; nohup $train < /dev/null & echo \$! > $REMOTE_PID; wait \$!; echo \$? > $REMOTE_EXIT ) >> $REMOTE_LOG 2>&1 < /dev/null & n=0" \
    "while [ ! -s $REMOTE_PID ] && [ \$n -lt 100 ]; do sleep 0.1; n=\$((n + 1)); done" \
    "echo \"\$(hostname): training started (pid \$(cat $REMOTE_PID)), log in ~/pmsn_run.log\""
}

# SIGTERM, then wait up to --wait seconds; $1=1 (watch): SIGKILL after that instead of failing.
stop_script() {
  local on_timeout
  # shellcheck disable=SC2016  # expanded on the worker
  if (($1)); then
    on_timeout="echo \"\$(hostname): pid \$pid still runs after $WAIT_S s, SIGKILL\" >&2; kill -KILL \"\$pid\"; sleep 1; break"
  else
    on_timeout="echo \"\$(hostname): pid \$pid still runs after $WAIT_S s\" >&2; exit 1"
  fi
  # shellcheck disable=SC2016  # $pid, $waited, $(hostname) are expanded on the worker
  join_statements \
    "$(alive_check)" \
    'if [ "$alive" = 0 ]; then echo "$(hostname): no training running"; exit 0; fi' \
    'kill -TERM "$pid"' \
    "echo \"\$(hostname): sent SIGTERM to \$pid, waiting up to $WAIT_S s for it to exit\"" \
    'waited=0' \
    "while $(is_training '"$pid"'); do if [ \"\$waited\" -ge $WAIT_S ]; then $on_timeout; fi; sleep 1; waited=\$((waited + 1)); done" \
    'echo "$(hostname): training exited"'
}

status_script() {
  # shellcheck disable=SC2016  # expanded on the worker
  join_statements \
    "$(alive_check)" \
    "if [ \"\$alive\" = 1 ]; then echo \"\$(hostname): training runs (pid \$pid)\"; elif [ -s $REMOTE_EXIT ]; then echo \"\$(hostname): no training running (the last run exited with status \$(cat $REMOTE_EXIT))\"; else echo \"\$(hostname): no training running\"; fi"
}

# watch's question to worker 0: one line "pmsn-training: running", "... exited N" or "... gone"
# (no process and no exit status: never started, or the VM restarted). A process that just
# ended gets a second to have its exit status written.
probe_script() {
  # shellcheck disable=SC2016  # expanded on the worker
  join_statements \
    "$(alive_check)" \
    "if [ \"\$alive\" = 0 ] && [ ! -s $REMOTE_EXIT ]; then sleep 1; fi" \
    "if [ \"\$alive\" = 1 ]; then echo \"$PROBE_TAG running\"; elif [ -s $REMOTE_EXIT ]; then echo \"$PROBE_TAG exited \$(cat $REMOTE_EXIT)\"; else echo \"$PROBE_TAG gone\"; fi"
}

# ------------------------------------------------------------------------------------ actions

# Sets STATE: the node's state (READY, PREEMPTED, ...) or with --queued the queued resource's
# (ACTIVE, SUSPENDED, ...); ABSENT if it does not exist; UNKNOWN if gcloud could not tell.
slice_state() {
  describe_cmd
  query "${CMD[@]}"
  local last=${OUT##*$'\n'}
  if ((RC == 0)) && [[ $last =~ ^[A-Z_]+$ ]]; then
    STATE=$last
  elif ((RC != 0)) && [[ $OUT == *NOT_FOUND* ]]; then
    STATE=ABSENT
  else
    STATE=UNKNOWN
    note "could not read the state of $NAME: ${last:-gcloud exit status $RC}"
  fi
}

# Sets TRAINING (watch): running, exited N, gone, or unknown (ssh failed).
training_state() {
  ssh_cmd 0 "$(probe_script)"
  query "${CMD[@]}"
  TRAINING=unknown
  local line
  while IFS= read -r line; do
    case $line in
      "$PROBE_TAG "*) TRAINING=${line#"$PROBE_TAG "} ;;
    esac
  done <<<"$OUT"
}

# Queued resources only: polls until ACTIVE; one line and exit 1 on FAILED, SUSPENDED or after
# --queue-timeout seconds (the request then stays in the queue). $1=1 (watch): returns on
# SUSPENDING or SUSPENDED (preempted as soon as it came up), for watch to count and recreate.
wait_active() {
  describe_cmd
  if ((DRY_RUN)); then
    plan "every $POLL_S s until ACTIVE (FAILED or SUSPENDED: stop; at most $QUEUE_TIMEOUT_S s, 0: no limit):"
    quote_cmd "${CMD[@]}"
    return
  fi
  local start=$SECONDS last=
  while :; do
    slice_state
    if (($1)) && [[ $STATE == SUSPENDING || $STATE == SUSPENDED ]]; then return; fi
    case $STATE in
      ACTIVE) note "queued resource $NAME is ACTIVE"; return ;;
      FAILED | SUSPENDED | ABSENT)
        fail 1 "queued resource $NAME is $STATE, not ACTIVE (gcloud compute tpus queued-resources describe $NAME --zone=$ZONE tells why)" ;;
    esac
    if [[ $STATE != "$last" ]]; then
      note "queued resource $NAME is $STATE, waiting until it is ACTIVE"
      last=$STATE
    fi
    if ((QUEUE_TIMEOUT_S && SECONDS - start >= QUEUE_TIMEOUT_S)); then
      fail 1 "queued resource $NAME is still $STATE after $QUEUE_TIMEOUT_S s; it stays queued (status --queued shows it, delete --queued removes it)"
    fi
    sleep "$POLL_S"
  done
}

create_slice() {  # create_slice WATCH (0 or 1, passed to wait_active)
  create_cmd
  run_cmd "${CMD[@]}"
  if ((QUEUED)); then wait_active "$1"; fi
}

delete_slice() {
  delete_cmd
  run_cmd "${CMD[@]}"
}

run_preflight() {
  local rc=0
  tpu_ssh 0 "$(preflight_script)" || rc=$?
  case $rc in
    0) ((DRY_RUN)) || note "pre-flight passed: the train step compiles for $TOPOLOGY and fits" ;;
    3) fail 3 "pre-flight: the train step does not fit per-chip HBM on $TOPOLOGY (see above); training not started" ;;
    2) fail 2 "pre-flight: pmsn_jax.aot rejected its input (see above); training not started" ;;
    *) fail "$rc" "pre-flight failed with exit status $rc; training not started (--skip-preflight starts it without)" ;;
  esac
}

# watch: makes sure the slice is READY (ACTIVE with --queued): creates it if it is absent,
# deletes and recreates it if it was lost, waits while it is in between (CREATING, SUSPENDING,
# ...). Sets UP=1 once it is, FRESH=1 if it (re)created it; UP=0 if the new slice is lost at
# once. (A status, not a return value: `if bring_up` would turn `set -e` off inside it.)
bring_up() {
  local start=$SECONDS last=
  UP=0 FRESH=0
  while :; do
    slice_state
    case $STATE in
      READY | ACTIVE) UP=1; return ;;
      ABSENT | PREEMPTED | TERMINATED | SUSPENDED | FAILED)
        ((!FRESH)) || return 0
        if [[ $STATE == ABSENT ]]; then
          note "$NAME does not exist: creating it"
        else
          note "$NAME is $STATE: deleting and recreating it"
          delete_slice
        fi
        create_slice 1
        FRESH=1
        start=$SECONDS
        continue
        ;;
    esac
    if [[ $STATE != "$last" ]]; then
      note "$NAME is $STATE: waiting"
      last=$STATE
    fi
    if ((QUEUE_TIMEOUT_S && SECONDS - start >= QUEUE_TIMEOUT_S)); then
      fail 1 "$NAME is still $STATE after $QUEUE_TIMEOUT_S s"
    fi
    sleep "$POLL_S"
  done
}

# watch: polls every --poll seconds until training ends or the slice is lost. Sets OUTCOME
# (done, lost or failed) and WHY.
monitor() {
  local unreachable=0 last
  while :; do
    sleep "$POLL_S"
    slice_state
    case $STATE in
      READY | ACTIVE) ;;
      ABSENT | PREEMPTED | TERMINATED | SUSPENDING | SUSPENDED | FAILED | DELETING)
        OUTCOME=lost WHY="$NAME is $STATE"
        return
        ;;
      *) continue ;;  # UNKNOWN, REPAIRING, RESTARTING...: ask again at the next poll
    esac
    training_state
    case $TRAINING in
      running) unreachable=0 ;;
      "exited 0") OUTCOME="done" WHY="training exited 0"; return ;;
      exited* | gone)
        OUTCOME=failed WHY="training $TRAINING on worker 0"
        [[ $TRAINING != gone ]] || WHY="training is gone from worker 0 without an exit status"
        return
        ;;
      *)
        unreachable=$((unreachable + 1))
        last=${OUT##*$'\n'}
        note "could not read training's state on worker 0 ($unreachable of $MAX_UNREACHABLE): $last"
        ((unreachable < MAX_UNREACHABLE)) ||
          fail 1 "could not read training's state on worker 0 of $NAME $MAX_UNREACHABLE times in a row; it may still run (status shows it)"
        ;;
    esac
  done
}

# watch --dry-run: the commands in the order watch runs them, with "#" lines for its branches.
watch_plan() {
  plan "the slice's state:"
  describe_cmd
  quote_cmd "${CMD[@]}"
  plan "if it is lost (PREEMPTED, TERMINATED, SUSPENDED, FAILED):"
  delete_slice
  plan "if it was lost or is absent:"
  create_slice 1
  plan "unless training already runs on worker 0 (then only watch it):"
  tpu_ssh all "$(setup_script)"
  if ((!SKIP_PREFLIGHT)); then
    plan "once:"
    run_preflight
  fi
  tpu_ssh all "$(run_script)"
  plan "every $POLL_S s, the slice's state and, while it is READY/ACTIVE, training's on worker 0:"
  describe_cmd
  quote_cmd "${CMD[@]}"
  tpu_ssh 0 "$(probe_script)"
  if ((DELETE_WHEN_DONE)); then
    plan "training exited 0: delete the slice, exit 0"
    delete_slice
  else
    plan "training exited 0: exit 0 (exited 2, a user error: exit 1)"
  fi
  plan "the slice is lost: delete it, create it, set it up, run (at most $MAX_RESTARTS restarts in all):"
  delete_slice
  create_slice 1
  tpu_ssh all "$(setup_script)"
  tpu_ssh all "$(run_script)"
  plan "training exited non-zero on a live slice: end what is left on every worker, run:"
  tpu_ssh all "$(stop_script 1)"
  tpu_ssh all "$(run_script)"
}

# ---------------------------------------------------------------------------------- subcommands

cmd_create() {
  check_create_options
  create_slice 0
}

cmd_setup() {
  [[ -n $REPO ]] || die "setup needs --repo (the git URL to clone on the workers)"
  tpu_ssh all "$(setup_script)"
}

cmd_preflight() {
  [[ -n $CONFIG ]] || die "preflight needs --config (e.g. configs/pmsn_vits16_inat18.py)"
  resolve_topology
  run_preflight
}

cmd_run() {
  check_run_options
  if ((!SKIP_PREFLIGHT)); then
    resolve_topology
    run_preflight
  fi
  tpu_ssh all "$(run_script)"
}

cmd_watch() {
  check_run_options
  check_create_options
  [[ -n $REPO ]] || die "watch needs --repo (it sets up every slice it creates)"
  if ((!SKIP_PREFLIGHT)); then resolve_topology; fi
  if ((DRY_RUN)); then
    watch_plan
    return
  fi
  local restarts=0 checked=$SKIP_PREFLIGHT first=1
  while :; do
    bring_up
    if ((UP)); then
      TRAINING=
      if ((first && !FRESH)); then training_state; fi
      if [[ $TRAINING == running ]]; then
        note "training already runs on $NAME: watching it"
        checked=1  # it runs, so it fits: a restart goes without the pre-flight
      else
        # A slice that was there already may hold training processes that outlived the run on
        # worker 0 (a crash, a watch that was interrupted); they would keep the chips.
        if ((!FRESH)); then tpu_ssh all "$(stop_script 1)"; fi
        if ((FRESH || first)); then tpu_ssh all "$(setup_script)"; fi
        if ((!checked)); then
          run_preflight
          checked=1
        fi
        tpu_ssh all "$(run_script)"
      fi
      monitor
    else
      OUTCOME=lost WHY="$NAME was lost again right after it was created"
    fi
    first=0
    case $OUTCOME in
      "done")
        note "training finished (exit status 0) after $restarts restarts"
        if ((DELETE_WHEN_DONE)); then delete_slice; fi
        return 0
        ;;
      failed)
        [[ $TRAINING != "exited 2" ]] ||
          fail 1 "training stopped with a user error (exit status 2; logs shows it): not restarting"
        ;;
    esac
    ((restarts < MAX_RESTARTS)) || fail 1 "$WHY; giving up after $MAX_RESTARTS restarts"
    restarts=$((restarts + 1))
    note "$WHY: restart $restarts of $MAX_RESTARTS"
    # Training may end on SIGTERM a little before the slice shows PREEMPTED.
    if [[ $OUTCOME == failed ]]; then sleep "$POLL_S"; fi
  done
}

cmd_logs() {
  tpu_ssh "$WORKER" "tail -n $LINES -F $REMOTE_LOG"
}

cmd_stop() {
  tpu_ssh all "$(stop_script 0)"
}

cmd_status() {
  if ((QUEUED)); then
    run_cmd gcloud compute tpus queued-resources describe "$NAME" "${LOCATION[@]}" \
      --format='value(state.state)'
  fi
  run_cmd gcloud compute tpus tpu-vm describe "$NAME" "${LOCATION[@]}" \
    --format='value(state)'
  tpu_ssh all "$(status_script)"
}

cmd_delete() {
  local what="TPU VM $NAME"
  ((!QUEUED)) || what="queued resource $NAME and its TPU VM"
  if ((!DRY_RUN && !YES)); then
    [[ -t 0 ]] || die "delete asks for confirmation; pass --yes when there is no terminal"
    local answer
    read -r -p "Delete $what in $ZONE? Its disks are lost; gs:// workdirs stay. [y/N] " answer
    [[ $answer == [yY] || $answer == [yY][eE][sS] ]] || { echo "not deleted" >&2; exit 1; }
  fi
  delete_slice
}

main() {
  parse_args "$@"
  validate
  "cmd_$SUBCOMMAND"
}

main "$@"
