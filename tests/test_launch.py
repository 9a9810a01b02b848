"""The launch scripts, without cloud or GPUs: launch/tpu_vm.sh and launch/gpu_multinode.sh.

Both run with --dry-run under a PATH holding nothing but tripwires named gcloud, srun, sbatch and
python, which record any call: the printed commands are checked word by word (each line parsed
back with shlex, the ssh --command script a second time), and nothing may have run. The scripts
that `tpu_vm.sh` sends to the workers (setup, preflight, run, stop, status, watch's probe) are
then run here, by bash and by a POSIX sh, in a scratch home directory against a stub trainer and
stub build tools. `tpu_vm.sh`'s own loops (queued-resource wait, pre-flight, watch) run against a
fake gcloud that records its arguments and answers describe and watch's probe from a script.
"""
from __future__ import annotations

import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TPU_VM = ROOT / "launch" / "tpu_vm.sh"
GPU = ROOT / "launch" / "gpu_multinode.sh"
BASH = shutil.which("bash") or "/bin/bash"  # resolved here: the scripts get a bare PATH

TPU = ["--name=my-tpu", "--zone=us-central2-b"]
CONFIG = "configs/pmsn_vits16_inat18.py:msn"
WORKDIR = "gs://my-bucket/pmsn s16/Bob's run"
EXTRA = """--config.note=it's a "quoted" $HOME arg"""
LIBTPU_INDEX = "https://storage.googleapis.com/jax-releases/libtpu_releases.html"
TRIPWIRES = ("gcloud", "srun", "sbatch", "python", "python3")


@pytest.fixture
def tripwire(tmp_path):
  """A PATH directory whose programs only record that they ran; returns (dir, record file)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  record = tmp_path / "executed"
  for name in TRIPWIRES:
    _write_script(bin_dir / name, f'echo "$0 $*" >> {shlex.quote(str(record))}\n')
  return bin_dir, record


def _write_script(path: pathlib.Path, body: str) -> None:
  path.write_text(f"#!{BASH}\n{body}")
  path.chmod(0o755)


def _run(script, *args, path, env=None, cwd=None):
  """Runs a launch script with only PATH (and `env`) in its environment: no SLURM_* leaks in."""
  return subprocess.run([BASH, str(script), *map(str, args)], env={"PATH": str(path), **(env or {})},
                        cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                        timeout=30, check=False)


def _dry_run(script, *args, tripwire, env=None, comments=False):
  """--dry-run: returns the printed commands, each split back into words; nothing may run.
  Lines starting with "#" (when the next commands run) are left out unless `comments`."""
  bin_dir, record = tripwire
  result = _run(script, "--dry-run", *args, path=bin_dir, env=env)  # before any "--"
  assert result.returncode == 0, result.stderr
  assert result.stderr == ""
  assert not record.exists(), f"dry run executed: {record.read_text()}"
  lines = result.stdout.splitlines()
  if comments:
    return lines
  return [shlex.split(line) for line in lines if not line.startswith("#")]


def _remote(words):
  """The --command= script of a gcloud ssh command line, and that script split into words as
  the worker's shell splits it (operators such as ; && >> are words of their own)."""
  [command] = [w.removeprefix("--command=") for w in words if w.startswith("--command=")]
  lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
  lexer.whitespace_split = True
  return command, list(lexer)


def _contains(words, sequence):
  n = len(sequence)
  return any(words[i:i + n] == sequence for i in range(len(words) - n + 1))


def _assert_usage_error(result):
  assert result.returncode == 2, (result.stdout, result.stderr)
  assert result.stdout == ""
  assert len(result.stderr.splitlines()) == 1, result.stderr
  assert "error:" in result.stderr


# ------------------------------------------------------------------------------ tpu_vm.sh


@pytest.mark.parametrize("flag", ["--spot", "--preemptible", None])
def test_create(tripwire, flag):
  args = ["create", *TPU, "--project=my project", "--accelerator-type=v4-32"]
  [words] = _dry_run(TPU_VM, *args, *([flag] if flag else []), tripwire=tripwire)
  assert words == ["gcloud", "compute", "tpus", "tpu-vm", "create", "my-tpu",
                   "--zone=us-central2-b", "--project=my project", "--accelerator-type=v4-32",
                   "--version=tpu-ubuntu2204-base", *([flag] if flag else [])]


@pytest.mark.parametrize("subcommand", ["setup", "run", "stop", "status"])
def test_ssh_subcommands_reach_every_worker(tripwire, subcommand):
  lines = _dry_run(TPU_VM, subcommand, *TPU, "--repo=https://example.com/pmsn_jax.git",
                   f"--config={CONFIG}", f"--workdir={WORKDIR}", "--ssh-arg=--internal-ip",
                   "--accelerator-type=v4-32", tripwire=tripwire)
  ssh = lines[-1]
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
  assert "--worker=all" in ssh and "--zone=us-central2-b" in ssh and "--internal-ip" in ssh
  if subcommand == "status":
    assert lines[0][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "my-tpu"]


def test_setup_commands(tripwire):
  [ssh] = _dry_run(TPU_VM, "setup", *TPU, "--repo=https://example.com/a repo.git",
                   "--ref=release 1", tripwire=tripwire)
  command, words = _remote(ssh)
  assert _contains(words, ["git", "clone", "-q", "https://example.com/a repo.git", "pmsn_jax"])
  assert _contains(words, ["git", "fetch", "-q", "origin", "release 1", ";"])
  assert _contains(words, ["make", "setup", "PYTHON=python3.11", ";"])
  assert _contains(words, [".venv/bin/pip", "install", "-q", "-U", "jax[tpu]==$jax_version",
                           "-f", LIBTPU_INDEX])
  assert command.startswith("set -e;")


def test_run_quotes_workdir_and_extra_args(tripwire):
  [ssh] = _dry_run(TPU_VM, "run", *TPU, f"--config={CONFIG}", f"--workdir={WORKDIR}",
                   "--skip-preflight", "--", EXTRA, "--config.batch_size=1024",
                   tripwire=tripwire)
  _, words = _remote(ssh)
  start = words.index("nohup")
  assert words[start:start + 12] == [
      "nohup", ".venv/bin/python", "-u", "-m", "pmsn_jax.main", f"--config={CONFIG}",
      f"--workdir={WORKDIR}", EXTRA, "--config.batch_size=1024", "<", "/dev/null", "&"]
  # A subshell waits for training, records its exit status, and sends all output to the log.
  assert _contains(words, ["&", "echo", "$!", ">", "$HOME/pmsn_run.pid", ";", "wait", "$!", ";",
                           "echo", "$?", ">", "$HOME/pmsn_run.exit", ")", ">>",
                           "$HOME/pmsn_run.log"])


def _kind(words):
  """What a gcloud command line does: create, describe, delete (qr-... for a queued resource),
  or for ssh which worker script it sends: setup, preflight, run, stop, status or probe."""
  assert words[:3] == ["gcloud", "compute", "tpus"], words
  if words[4] != "ssh":
    return ("qr-" if words[3] == "queued-resources" else "") + words[4]
  command, _ = _remote(words)
  for marker, kind in (("pmsn_jax.aot", "preflight"), ("pmsn-training:", "probe"),
                       ("make setup", "setup"), ("nohup", "run"), ("kill -TERM", "stop")):
    if marker in command:
      return kind
  return "status"


def _aot_words(ssh):
  _, words = _remote(ssh)
  start = words.index(".venv/bin/python")
  return words[start:]


@pytest.mark.parametrize("accelerator_type, topology", [
    ("v4-8", "v4:2x2x1"), ("v4-32", "v4:2x2x4"), ("v4-128", "v4:4x4x4"),
    ("v5litepod-4", "v5e:2x2"), ("v5litepod-8", "v5e:2x4"), ("v5litepod-16", "v5e:4x4"),
    ("v5litepod-256", "v5e:16x16"), ("v5p-8", "v5p:2x2x1"), ("v5p-32", "v5p:2x2x4"),
    ("v6e-16", "v6e:4x4")])
def test_run_preflight_then_training(tripwire, accelerator_type, topology):
  preflight, run = _dry_run(TPU_VM, "run", *TPU, f"--accelerator-type={accelerator_type}",
                            f"--config={CONFIG}", f"--workdir={WORKDIR}", "--", EXTRA,
                            "--config.batch_size=1024", "--allow_config_change",
                            "--config.seed", "3", tripwire=tripwire)
  assert "--worker=0" in preflight and "--worker=all" in run
  assert (_kind(preflight), _kind(run)) == ("preflight", "run")
  # The config and its --config.* overrides, not the other training flags.
  assert _aot_words(preflight) == [
      ".venv/bin/python", "-m", "pmsn_jax.aot", f"--config={CONFIG}", f"--topology={topology}",
      EXTRA, "--config.batch_size=1024", "--config.seed", "3"]
  command, words = _remote(preflight)
  assert command.startswith("cd pmsn_jax ||")


def test_topology_flag_overrides_accelerator_type(tripwire):
  [preflight] = _dry_run(TPU_VM, "preflight", *TPU, "--accelerator-type=v3-8",
                         "--topology=v4:4x4x8", f"--config={CONFIG}", tripwire=tripwire)
  assert _aot_words(preflight) == [".venv/bin/python", "-m", "pmsn_jax.aot",
                                   f"--config={CONFIG}", "--topology=v4:4x4x8"]


@pytest.mark.parametrize("flag", ["--spot", "--reserved", None])
def test_create_queued(tripwire, flag):
  lines = _dry_run(TPU_VM, "create", "--queued", *TPU, "--project=my project",
                   "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite",
                   *([flag] if flag else []), tripwire=tripwire, comments=True)
  create, comment, describe = lines
  location = ["--zone=us-central2-b", "--project=my project"]
  assert shlex.split(create) == [
      "gcloud", "compute", "tpus", "queued-resources", "create", "my-tpu", *location,
      "--node-id=my-tpu", "--accelerator-type=v5litepod-16",
      "--runtime-version=v2-alpha-tpuv5-lite", *([flag] if flag else [])]
  assert comment.startswith("# every 60 s until ACTIVE")
  assert shlex.split(describe) == ["gcloud", "compute", "tpus", "queued-resources", "describe",
                                   "my-tpu", *location, "--format=value(state.state)"]


def test_delete_and_status_queued(tripwire):
  [delete] = _dry_run(TPU_VM, "delete", "--queued", *TPU, tripwire=tripwire)
  assert delete == ["gcloud", "compute", "tpus", "queued-resources", "delete", "my-tpu",
                    "--zone=us-central2-b", "--force", "--quiet"]
  lines = _dry_run(TPU_VM, "status", "--queued", *TPU, tripwire=tripwire)
  assert [_kind(words) for words in lines] == ["qr-describe", "describe", "status"]


@pytest.mark.parametrize("queued", [False, True])
def test_watch_dry_run_shows_every_step(tripwire, queued):
  args = ["watch", *TPU, "--accelerator-type=v4-32", "--spot", "--repo=https://example.com/r.git",
          f"--config={CONFIG}", f"--workdir={WORKDIR}", "--max-restarts=3",
          *(["--queued"] if queued else []), "--", "--config.batch_size=1024"]
  lines = _dry_run(TPU_VM, *args, tripwire=tripwire)
  qr = "qr-" if queued else ""
  wait = [f"{qr}describe"] if queued else []  # polled until ACTIVE
  assert [_kind(words) for words in lines] == [
      f"{qr}describe", f"{qr}delete", f"{qr}create", *wait, "setup", "preflight", "run",
      f"{qr}describe", "probe",  # the poll
      f"{qr}delete", f"{qr}create", *wait, "setup", "run",  # after a preemption
      "stop", "run"]  # after a failure on a live slice
  assert "--topology=v4:2x2x4" in _aot_words(lines[4 + len(wait)])
  text = "\n".join(_dry_run(TPU_VM, *args, tripwire=tripwire, comments=True))
  assert "at most 3 restarts" in text
  # watch's stop ends what SIGTERM does not end within --wait.
  assert "kill -KILL" in _remote(lines[-2])[0]


@pytest.mark.parametrize("extra, worker, lines", [([], "0", "100"),
                                                  (["--worker=3", "--lines", "20"], "3", "20")])
def test_logs_tails_one_worker(tripwire, extra, worker, lines):
  [ssh] = _dry_run(TPU_VM, "logs", *TPU, *extra, tripwire=tripwire)
  assert f"--worker={worker}" in ssh
  assert _remote(ssh)[1] == ["tail", "-n", lines, "-F", "$HOME/pmsn_run.log"]


def test_stop_sends_sigterm(tripwire):
  [ssh] = _dry_run(TPU_VM, "stop", *TPU, "--wait=30", tripwire=tripwire)
  _, words = _remote(ssh)
  assert _contains(words, ["kill", "-TERM", "$pid", ";"])
  assert _contains(words, ["[", "$waited", "-ge", "30", "]"])


def test_delete(tripwire):
  # A dry run neither asks nor needs --yes.
  [words] = _dry_run(TPU_VM, "delete", *TPU, tripwire=tripwire)
  assert words == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "my-tpu",
                   "--zone=us-central2-b", "--quiet"]


def test_delete_without_terminal_needs_yes(tripwire):
  bin_dir, record = tripwire
  _assert_usage_error(_run(TPU_VM, "delete", *TPU, path=bin_dir))
  assert not record.exists()


@pytest.mark.parametrize("args", [
    ["frobnicate", *TPU],
    [*TPU],
    ["create", "--zone=us-central2-b", "--accelerator-type=v4-32"],  # no --name
    ["create", "--name=my-tpu", "--accelerator-type=v4-32"],  # no --zone
    ["create", *TPU],  # no --accelerator-type
    ["create", *TPU, "--accelerator-type=v4-32", "--spot", "--preemptible"],
    ["setup", *TPU],  # no --repo
    ["run", *TPU, f"--workdir={WORKDIR}"],  # no --config
    ["run", *TPU, f"--config={CONFIG}", "--workdir=/local/dir"],  # not gs://
    ["logs", *TPU, "--worker=all"],
    ["logs", *TPU, "--bogus"],
    ["logs", *TPU, "--name"],  # no value
    ["logs", "stop", *TPU],
    ["run", *TPU, f"--config={CONFIG}", f"--workdir={WORKDIR}"],  # no type/topology/skip
    ["run", *TPU, f"--config={CONFIG}", f"--workdir={WORKDIR}", "--accelerator-type=v3-8"],
    ["run", *TPU, f"--config={CONFIG}", f"--workdir={WORKDIR}", "--accelerator-type=v4-24"],
    ["preflight", *TPU, f"--config={CONFIG}", "--topology=2x2x4"],
    ["preflight", *TPU, "--accelerator-type=v4-32"],  # no --config
    ["create", *TPU, "--accelerator-type=v4-32", "--queued", "--preemptible"],
    ["create", *TPU, "--accelerator-type=v4-32", "--spot", "--reserved"],
    ["watch", *TPU, "--accelerator-type=v4-32", f"--config={CONFIG}", f"--workdir={WORKDIR}"],
    ["watch", *TPU, "--repo=r", f"--config={CONFIG}", f"--workdir={WORKDIR}"],  # no type
    ["watch", *TPU, "--accelerator-type=v4-32", "--repo=r", f"--config={CONFIG}",
     "--workdir=/local/dir"],
    ["watch", *TPU, "--max-restarts=many"],
    ["watch", *TPU, "--poll=-1"],
    ["create", *TPU, "--queue-timeout=1h"],
    ["create", *TPU, "--queued"],  # no --accelerator-type
    ["logs", *TPU, "--queued=yes"],  # a flag without a value
])
def test_tpu_usage_errors(tripwire, args):
  bin_dir, record = tripwire
  _assert_usage_error(_run(TPU_VM, "--dry-run", *args, path=bin_dir))
  assert not record.exists()


def test_tpu_without_gcloud(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  for subcommand in ("create", "setup", "preflight", "run", "watch", "logs", "stop", "status",
                     "delete"):
    result = _run(TPU_VM, subcommand, *TPU, "--accelerator-type=v4-32", "--repo=r",
                  f"--config={CONFIG}", f"--workdir={WORKDIR}", "--dry-run", path=empty)
    assert result.returncode == 0 and "gcloud" in result.stdout, result.stderr
  for args in (["logs", *TPU], ["watch", *TPU, "--accelerator-type=v4-32", "--repo=r",
                                 f"--config={CONFIG}", f"--workdir={WORKDIR}"]):
    result = _run(TPU_VM, *args, path=empty)  # a real run says what is missing
    assert result.returncode == 2 and "gcloud not found" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_help(tmp_path):
  for script in (TPU_VM, GPU):
    result = _run(script, "--help", path=tmp_path)
    assert result.returncode == 0 and "Usage:" in result.stdout and "--dry-run" in result.stdout


# ---------------------------------------------------------------------- gpu_multinode.sh

GPU_ARGS = [f"--config={CONFIG}", f"--workdir={WORKDIR}"]


@pytest.mark.parametrize("rank", ["0", "1"])
def test_plain_env_passes_distributed_flags(tripwire, rank):
  env = {"NNODES": "2", "NODE_RANK": rank, "COORDINATOR": "10.0.0.1:12345"}
  cd, train = _dry_run(GPU, *GPU_ARGS, "--", EXTRA, tripwire=tripwire, env=env)
  assert cd == ["cd", str(ROOT)]
  assert train == [".venv/bin/python", "-u", "-m", "pmsn_jax.main", f"--config={CONFIG}",
                   f"--workdir={WORKDIR}", "--coordinator_address=10.0.0.1:12345",
                   "--num_processes=2", f"--process_id={rank}", EXTRA]


def test_slurm_detected_from_environment(tripwire):
  env = {"SLURM_JOB_ID": "42", "SLURM_GPUS_ON_NODE": "4", "SLURM_CPUS_ON_NODE": "64",
         "NNODES": "2", "NODE_RANK": "1", "COORDINATOR": "ignored:1"}
  cd, srun = _dry_run(GPU, *GPU_ARGS, "--", EXTRA, tripwire=tripwire, env=env)
  assert cd == ["cd", str(ROOT)]
  # All of the node's GPUs, not JAX's SLURM default of GPU number SLURM_LOCALID.
  assert srun == ["env", "JAX_LOCAL_DEVICE_IDS=0,1,2,3", "srun", "--ntasks-per-node=1",
                  "--kill-on-bad-exit=1", "--cpus-per-task=64", ".venv/bin/python", "-u", "-m",
                  "pmsn_jax.main", f"--config={CONFIG}", f"--workdir={WORKDIR}", EXTRA]


def test_slurm_flag(tripwire):
  _, srun = _dry_run(GPU, "--slurm", "--nodes=2", *GPU_ARGS, tripwire=tripwire)
  assert srun[:6] == ["env", "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7", "srun",
                      "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--nodes=2"]
  assert not any(w.startswith("--process_id") for w in srun)


def test_no_slurm_inside_an_allocation(tripwire):
  env = {"SLURM_JOB_ID": "42", "NNODES": "2", "NODE_RANK": "0", "COORDINATOR": "n0:1234"}
  _, train = _dry_run(GPU, "--no-slurm", *GPU_ARGS, tripwire=tripwire, env=env)
  assert train[0] == ".venv/bin/python" and "--process_id=0" in train


def test_print_sbatch(tripwire):
  bin_dir, record = tripwire
  result = _run(GPU, "--print-sbatch", "--nodes=2", *GPU_ARGS, "--", EXTRA, path=bin_dir)
  assert result.returncode == 0, result.stderr
  assert not record.exists()
  lines = result.stdout.splitlines()
  assert lines[0] == "#!/bin/bash"
  for directive in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--exclusive",
                    "--signal=TERM@300", "--requeue"):
    assert f"#SBATCH {directive}" in lines
  assert shlex.split(lines[-2]) == ["cd", str(ROOT)]
  assert shlex.split(lines[-1]) == [
      "exec", "launch/gpu_multinode.sh", "--slurm", "--gpus-per-node=8", f"--config={CONFIG}",
      f"--workdir={WORKDIR}", "--", EXTRA]


@pytest.mark.parametrize("env, args", [
    ({}, GPU_ARGS),  # no SLURM, no NNODES/NODE_RANK/COORDINATOR
    ({"NNODES": "2", "NODE_RANK": "2", "COORDINATOR": "n0:1"}, GPU_ARGS),
    ({"NNODES": "0", "NODE_RANK": "0", "COORDINATOR": "n0:1"}, GPU_ARGS),
    ({"NNODES": "2", "NODE_RANK": "0", "COORDINATOR": "n0"}, GPU_ARGS),
    ({"NNODES": "2", "NODE_RANK": "0", "COORDINATOR": "n0:1"}, [f"--config={CONFIG}"]),
    ({"NNODES": "2", "NODE_RANK": "0", "COORDINATOR": "n0:1"}, [*GPU_ARGS, "--bogus"]),
    ({"NNODES": "2", "NODE_RANK": "0", "COORDINATOR": "n0:1"}, [*GPU_ARGS, "stray"]),
    ({}, ["--print-sbatch", *GPU_ARGS]),  # no --nodes
    ({}, ["--slurm", "--no-slurm", *GPU_ARGS]),
    ({}, ["--slurm", "--gpus-per-node=0", *GPU_ARGS]),
])
def test_gpu_usage_errors(tripwire, env, args):
  bin_dir, record = tripwire
  _assert_usage_error(_run(GPU, "--dry-run", *args, path=bin_dir, env=env))
  assert not record.exists()


def test_gpu_runs_nothing_in_dry_run(tripwire):
  bin_dir, record = tripwire
  python = bin_dir / "python"
  for env, mode in (({"NNODES": "1", "NODE_RANK": "0", "COORDINATOR": "n0:1"}, []),
                    ({}, ["--slurm"])):
    lines = _dry_run(GPU, *mode, f"--python={python}", *GPU_ARGS, tripwire=tripwire, env=env)
    assert str(python) in lines[-1]
  assert not record.exists()


def test_scripts_parse_and_lint():
  for script in (TPU_VM, GPU):
    subprocess.run([BASH, "-n", str(script)], check=True)
    assert os.access(script, os.X_OK)
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck not installed")
  # -x from the repository root follows `source launch/lib.sh`; info-level notes are not failures.
  subprocess.run(["shellcheck", "-x", "--severity=warning", str(TPU_VM), str(GPU)], check=True,
                 cwd=ROOT)


# ------------------------------------------ tpu_vm.sh's own loops, against a fake gcloud

WATCH = ["--accelerator-type=v4-32", "--repo=https://example.com/r.git", f"--config={CONFIG}",
         f"--workdir={WORKDIR}", "--poll=0"]
AOT_MESSAGE = "pmsn_jax.aot: needs 21.3 GiB of 16 GiB HBM per chip; lower batch_size"

# Records each call (one line, words quoted for bash); `describe` answers the next line of
# $FAKE/states (the last one repeats; ABSENT: NOT_FOUND), watch's probe the next line of
# $FAKE/training (ssh-fails: exit 255), the pre-flight exits with the status in $FAKE/aot_status.
FAKE_GCLOUD = r"""
printf '%q ' "$@" >> "$FAKE/calls"; echo >> "$FAKE/calls"
next_line() {
  first=$(head -n 1 "$FAKE/$1")
  if [ "$(wc -l < "$FAKE/$1")" -gt 1 ]; then tail -n +2 "$FAKE/$1" > "$FAKE/$1.rest"; mv "$FAKE/$1.rest" "$FAKE/$1"; fi
  printf '%s
' "$first"
}
case $4 in
  describe)
    state=$(next_line states)
    if [ "$state" = ABSENT ]; then
      echo "ERROR: (gcloud.compute.tpus.$3.describe) NOT_FOUND: Resource '$5' was not found" >&2
      exit 1
    fi
    echo "SSH: a warning on stderr" >&2
    echo "$state" ;;
  ssh)
    case "$*" in
      *pmsn_jax.aot*)
        status=$(cat "$FAKE/aot_status" 2>/dev/null || echo 0)
        [ "$status" = 0 ] || echo "AOT_MESSAGE" >&2
        exit "$status" ;;
      *pmsn-training:*)
        echo "SSH: Attempting to connect to worker 0..." >&2
        answer=$(next_line training)
        if [ "$answer" = ssh-fails ]; then echo "ssh: connect to host 10.0.0.2: timed out" >&2; exit 255; fi
        echo "pmsn-training: $answer" ;;
    esac ;;
esac
""".replace("AOT_MESSAGE", AOT_MESSAGE)


@pytest.fixture
def fake_gcloud(tmp_path):
  """Returns run(*args, states=[...], training=[...], aot_status=0) -> (result, kinds of the
  gcloud calls made)."""
  bin_dir = tmp_path / "fake_bin"
  bin_dir.mkdir()
  _write_script(bin_dir / "gcloud", FAKE_GCLOUD)
  fake = tmp_path / "fake"
  fake.mkdir()

  def run(*args, states=("READY",), training=("running",), aot_status=0):
    (fake / "states").write_text("".join(f"{s}\n" for s in states))
    (fake / "training").write_text("".join(f"{t}\n" for t in training))
    (fake / "aot_status").write_text(f"{aot_status}\n")
    (fake / "calls").write_text("")
    result = _run(TPU_VM, *args, path=f"{bin_dir}:/usr/bin:/bin", env={"FAKE": str(fake)})
    calls = [["gcloud", *shlex.split(line)] for line in (fake / "calls").read_text().splitlines()]
    return result, [_kind(words) for words in calls]

  return run


@pytest.mark.parametrize("status, message", [(3, "does not fit per-chip HBM on v4:2x2x4"),
                                             (2, "rejected its input")])
def test_failed_preflight_stops_before_training(fake_gcloud, status, message):
  result, calls = fake_gcloud("run", *TPU, *WATCH, aot_status=status)
  assert result.returncode == status
  assert calls == ["preflight"]
  last, = result.stderr.splitlines()[-1:]
  assert AOT_MESSAGE in result.stderr and message in last and "training not started" in last
  result, calls = fake_gcloud("watch", *TPU, *WATCH, states=["ABSENT", "READY"],
                              aot_status=status)
  assert result.returncode == status
  assert calls == ["describe", "create", "describe", "setup", "preflight"]


def test_skip_preflight(fake_gcloud):
  result, calls = fake_gcloud("run", *TPU, f"--config={CONFIG}", f"--workdir={WORKDIR}",
                              "--skip-preflight", aot_status=3)
  assert result.returncode == 0, result.stderr
  assert calls == ["run"]


def test_queued_create_waits_until_active(fake_gcloud):
  args = ["create", "--queued", "--spot", *TPU, "--accelerator-type=v4-32", "--poll=0"]
  result, calls = fake_gcloud(*args, states=["ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING",
                                             "ACTIVE"])
  assert result.returncode == 0, result.stderr
  assert calls == ["qr-create"] + ["qr-describe"] * 4
  assert "is ACTIVE" in result.stderr.splitlines()[-1]
  for state in ("FAILED", "SUSPENDED"):
    result, calls = fake_gcloud(*args, states=["ACCEPTED", state])
    assert result.returncode == 1 and calls == ["qr-create", "qr-describe", "qr-describe"]
    last = result.stderr.splitlines()[-1]
    assert last.startswith("tpu_vm.sh: error: queued resource my-tpu is " + state), last


def test_queued_create_times_out(fake_gcloud):
  result, _ = fake_gcloud("create", "--queued", *TPU, "--accelerator-type=v4-32", "--poll=1",
                          "--queue-timeout=1", states=["WAITING_FOR_RESOURCES"])
  assert result.returncode == 1
  assert "still WAITING_FOR_RESOURCES after 1 s; it stays queued" in result.stderr


def test_watch_recreates_after_preemption_and_stops_on_success(fake_gcloud):
  states = ["ABSENT", "READY",  # created
            "READY", "PREEMPTED",  # polls: training runs, then the slice is gone
            "PREEMPTED", "READY",  # deleted and created again
            "READY", "READY"]  # polls
  result, calls = fake_gcloud("watch", *TPU, *WATCH, "--spot", states=states,
                              training=["running", "running", "exited 0"])
  assert result.returncode == 0, result.stderr
  assert calls == ["describe", "create", "describe", "setup", "preflight", "run",
                   "describe", "probe", "describe",
                   "describe", "delete", "create", "describe", "setup", "run",
                   "describe", "probe", "describe", "probe"]
  assert "training finished (exit status 0) after 1 restarts" in result.stderr


def test_watch_queued_recreates_after_suspension(fake_gcloud):
  states = ["ACTIVE",  # there already, training not running: set up and run
            "SUSPENDING", "SUSPENDING", "SUSPENDED",  # preempted
            "WAITING_FOR_RESOURCES", "ACTIVE",  # queued again
            "ACTIVE", "ACTIVE"]
  result, calls = fake_gcloud("watch", "--queued", "--spot", *TPU, *WATCH,
                              "--delete-when-done", states=states,
                              training=["exited 143", "exited 0"])
  assert result.returncode == 0, result.stderr
  assert calls == ["qr-describe", "probe", "stop", "setup", "preflight", "run",
                   "qr-describe",  # SUSPENDING: lost
                   "qr-describe", "qr-describe", "qr-delete", "qr-create", "qr-describe",
                   "qr-describe", "qr-describe", "setup", "run",
                   "qr-describe", "probe", "qr-delete"]


def test_watch_queued_suspended_while_waiting_is_a_restart(fake_gcloud):
  # create --queued fails on SUSPENDED; watch counts it as a lost slice and queues again.
  states = ["ABSENT", "ACCEPTED", "SUSPENDED", "SUSPENDED", "SUSPENDED", "ACTIVE"]
  result, calls = fake_gcloud("watch", "--queued", *TPU, *WATCH, "--max-restarts=1",
                              states=states, training=["exited 0"])
  assert result.returncode == 0, result.stderr
  assert calls == ["qr-describe", "qr-create", "qr-describe", "qr-describe", "qr-describe",
                   "qr-describe", "qr-delete", "qr-create", "qr-describe", "qr-describe",
                   "setup", "preflight", "run", "qr-describe", "probe"]
  assert "lost again right after it was created: restart 1 of 1" in result.stderr


def test_watch_restarts_on_a_live_slice_and_attaches(fake_gcloud):
  # Training already runs: only watched. It fails (not a preemption): stop leftovers, run again.
  result, calls = fake_gcloud("watch", *TPU, *WATCH, states=["READY"],
                              training=["running", "running", "exited 1", "running", "exited 0"])
  assert result.returncode == 0, result.stderr
  assert calls == ["describe", "probe", "describe", "probe", "describe", "probe",
                   "describe", "stop", "run", "describe", "probe", "describe", "probe"]
  assert "already runs on my-tpu: watching it" in result.stderr


@pytest.mark.parametrize("training, restarts, runs, message", [
    (["running", "exited 2"], 5, 0, "user error (exit status 2"),
    (["running", "ssh-fails"], 5, 0, "could not read training's state on worker 0 of my-tpu 10 "
                                     "times in a row; it may still run"),
    (["running", "gone", "gone", "gone"], 2, 2, "training is gone from worker 0 without an exit "
                                                "status; giving up after 2 restarts"),
])
def test_watch_gives_up(fake_gcloud, training, restarts, runs, message):
  # The first probe finds training running (watch attaches), the next ones end it.
  result, calls = fake_gcloud("watch", *TPU, *WATCH, f"--max-restarts={restarts}",
                              states=["READY"], training=training)
  assert result.returncode == 1
  assert message in result.stderr.splitlines()[-1]
  assert calls.count("run") == calls.count("stop") == runs
  assert "preflight" not in calls


# ------------------------------------------------ the worker scripts, run here on stubs

SHELLS = [s for s in ("bash", "sh") if shutil.which(s)]


def _tpu_remote_script(tripwire, *args):
  return _remote(_dry_run(TPU_VM, *args, tripwire=tripwire)[-1])[0]


def _worker_shell(shell, script, home, path_prefix=None):
  """Runs a worker script as gcloud ssh would: the login shell, started in the home directory."""
  path = os.environ["PATH"] if path_prefix is None else f"{path_prefix}:{os.environ['PATH']}"
  return subprocess.run([shell, "-c", script], cwd=home, env={"HOME": str(home), "PATH": path},
                        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
                        check=False)


@pytest.fixture
def worker_home(tmp_path):
  """A home directory with a checkout whose .venv/bin/python is a stub trainer (exit status on
  SIGTERM from ~/term_status, default 0) or, for pmsn_jax.aot, a stub pre-flight (exit status
  from ~/aot_status, default 0); kills the trainer after."""
  home = tmp_path / "home"
  venv_bin = home / "pmsn_jax" / ".venv" / "bin"
  venv_bin.mkdir(parents=True)
  _write_script(venv_bin / "python", """case " $* " in *" pmsn_jax.aot "*)
  for arg; do echo "aot arg: $arg"; done
  exit "$(cat "$HOME/aot_status" 2>/dev/null || echo 0)";;
esac
trap 'echo "stub: SIGTERM"; exit "$(cat "$HOME/term_status" 2>/dev/null || echo 0)"' TERM
for arg; do echo "stub arg: $arg"; done
while :; do sleep 0.05; done
""")
  yield home
  pid_file = home / "pmsn_run.pid"
  if pid_file.exists():  # only the stub this test started
    try:
      os.kill(int(pid_file.read_text()), signal.SIGKILL)
    except (ProcessLookupError, ValueError):
      pass


@pytest.mark.skipif(shutil.which("ps") is None, reason="needs ps")
@pytest.mark.parametrize("shell", SHELLS)
def test_worker_run_status_stop(tripwire, worker_home, shell):
  run = _tpu_remote_script(tripwire, "run", *TPU, f"--config={CONFIG}", f"--workdir={WORKDIR}",
                           "--accelerator-type=v4-32", "--", EXTRA)
  status = _tpu_remote_script(tripwire, "status", *TPU)
  stop = _tpu_remote_script(tripwire, "stop", *TPU, "--wait=5")
  [probe] = [words for words in _dry_run(TPU_VM, "watch", *TPU, *WATCH, tripwire=tripwire)
             if _kind(words) == "probe"]
  probe = _remote(probe)[0]
  log = worker_home / "pmsn_run.log"

  started = _worker_shell(shell, run, worker_home)
  assert started.returncode == 0 and "training started" in started.stdout, started.stderr
  deadline = time.monotonic() + 5
  while EXTRA not in log.read_text() and time.monotonic() < deadline:
    time.sleep(0.05)
  args = [line.removeprefix("stub arg: ") for line in log.read_text().splitlines()
          if line.startswith("stub arg: ")]
  assert args == ["-u", "-m", "pmsn_jax.main", f"--config={CONFIG}", f"--workdir={WORKDIR}",
                  EXTRA]

  again = _worker_shell(shell, run, worker_home)
  assert again.returncode == 1 and "already runs" in again.stderr
  assert "training runs" in _worker_shell(shell, status, worker_home).stdout
  assert _worker_shell(shell, probe, worker_home).stdout == "pmsn-training: running\n"

  (worker_home / "term_status").write_text("143\n")
  stopped = _worker_shell(shell, stop, worker_home)
  assert stopped.returncode == 0 and "training exited" in stopped.stdout, stopped.stderr
  assert "stub: SIGTERM" in log.read_text()
  deadline = time.monotonic() + 5  # the waiting subshell writes the exit status
  while not (worker_home / "pmsn_run.exit").exists() and time.monotonic() < deadline:
    time.sleep(0.05)
  assert (worker_home / "pmsn_run.exit").read_text() == "143\n"
  assert "the last run exited with status 143" in _worker_shell(shell, status,
                                                                 worker_home).stdout
  assert _worker_shell(shell, probe, worker_home).stdout == "pmsn-training: exited 143\n"
  assert "no training running" in _worker_shell(shell, stop, worker_home).stdout


@pytest.mark.skipif(shutil.which("ps") is None, reason="needs ps")
@pytest.mark.parametrize("shell", SHELLS)
def test_worker_preflight(tripwire, worker_home, shell):
  preflight = _tpu_remote_script(tripwire, "preflight", *TPU, "--accelerator-type=v5litepod-16",
                                 f"--config={CONFIG}", "--", EXTRA, "--allow_config_change")
  result = _worker_shell(shell, preflight, worker_home)
  assert result.returncode == 0, result.stderr
  assert [line.removeprefix("aot arg: ") for line in result.stdout.splitlines()
          if line.startswith("aot arg: ")] == [
              "-m", "pmsn_jax.aot", f"--config={CONFIG}", "--topology=v5e:4x4", EXTRA]
  (worker_home / "aot_status").write_text("3\n")
  assert _worker_shell(shell, preflight, worker_home).returncode == 3


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
@pytest.mark.parametrize("shell", SHELLS)
def test_worker_setup(tripwire, tmp_path, shell):
  # The "remote" repository: a local git repository with a jax pin.
  origin = tmp_path / "origin repo"
  origin.mkdir()
  (origin / "requirements.txt").write_text("flax==0.12.8\njax==0.10.2\n")
  git = ["git", "-C", str(origin), "-c", "user.name=t", "-c", "user.email=t@t"]
  subprocess.run([*git, "init", "-q", "-b", "main"], check=True)
  subprocess.run([*git, "add", "."], check=True)
  subprocess.run([*git, "commit", "-q", "-m", "first"], check=True)
  commit = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()
  # Stub build tools: make creates a .venv whose pip records its arguments; sudo (apt) must
  # not be needed; python3.11 has ensurepip.
  stubs = tmp_path / "stubs"
  stubs.mkdir()
  calls = tmp_path / "calls"
  _write_script(stubs / "make", f"""echo "make $*" >> {shlex.quote(str(calls))}
mkdir -p .venv/bin
printf '#!{BASH}\\necho "pip $*" >> {shlex.quote(str(calls))}\\n' > .venv/bin/pip
printf '#!{BASH}\\necho 0.10.2\\n' > .venv/bin/python
chmod +x .venv/bin/pip .venv/bin/python
""")
  _write_script(stubs / "sudo", f'echo "sudo $*" >> {shlex.quote(str(calls))}; exit 1\n')
  _write_script(stubs / "python3.11", "exit 0\n")
  home = tmp_path / "home"
  home.mkdir()

  setup = _tpu_remote_script(tripwire, "setup", *TPU, f"--repo={origin}", "--ref=main")
  for _ in range(2):  # the second time fetches into the existing checkout
    result = _worker_shell(shell, setup, home, path_prefix=stubs)
    assert result.returncode == 0, result.stderr
    assert "setup done, jax 0.10.2" in result.stdout
  head = subprocess.run(["git", "-C", str(home / "pmsn_jax"), "rev-parse", "HEAD"], check=True,
                        capture_output=True, text=True).stdout.strip()
  assert head == commit
  assert calls.read_text().splitlines() == [
      "make setup PYTHON=python3.11",
      f"pip install -q -U jax[tpu]==0.10.2 -f {LIBTPU_INDEX}"] * 2
