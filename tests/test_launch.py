"""The launch scripts, without cloud or GPUs: launch/tpu_vm.sh and launch/gpu_multinode.sh.

Both run with --dry-run under a PATH holding nothing but tripwires named gcloud, srun, sbatch and
python, which record any call: the printed commands are checked word by word (each line parsed
back with shlex, the ssh --command script a second time), and nothing may have run. The scripts
that `tpu_vm.sh` sends to the workers (setup, run, stop, status) are then run here, by bash and
by a POSIX sh, in a scratch home directory against a stub trainer and stub build tools.
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


def _dry_run(script, *args, tripwire, env=None):
  """--dry-run: returns the printed commands, each split back into words; nothing may run."""
  bin_dir, record = tripwire
  result = _run(script, "--dry-run", *args, path=bin_dir, env=env)  # before any "--"
  assert result.returncode == 0, result.stderr
  assert result.stderr == ""
  assert not record.exists(), f"dry run executed: {record.read_text()}"
  return [shlex.split(line) for line in result.stdout.splitlines()]


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
                   tripwire=tripwire)
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
  [ssh] = _dry_run(TPU_VM, "run", *TPU, f"--config={CONFIG}", f"--workdir={WORKDIR}", "--",
                   EXTRA, "--config.batch_size=1024", tripwire=tripwire)
  _, words = _remote(ssh)
  start = words.index("nohup")
  assert words[start:start + 13] == [
      "nohup", ".venv/bin/python", "-u", "-m", "pmsn_jax.main", f"--config={CONFIG}",
      f"--workdir={WORKDIR}", EXTRA, "--config.batch_size=1024", ">>", "$HOME/pmsn_run.log",
      "2", ">&"]
  assert _contains(words, ["&", "echo", "$!", ">", "$HOME/pmsn_run.pid"])


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
])
def test_tpu_usage_errors(tripwire, args):
  bin_dir, record = tripwire
  _assert_usage_error(_run(TPU_VM, "--dry-run", *args, path=bin_dir))
  assert not record.exists()


def test_tpu_without_gcloud(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  for subcommand in ("create", "setup", "run", "logs", "stop", "status", "delete"):
    result = _run(TPU_VM, subcommand, *TPU, "--accelerator-type=v4-32", "--repo=r",
                  f"--config={CONFIG}", f"--workdir={WORKDIR}", "--dry-run", path=empty)
    assert result.returncode == 0 and "gcloud" in result.stdout, result.stderr
  result = _run(TPU_VM, "logs", *TPU, path=empty)  # a real run says what is missing
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
  subprocess.run(["shellcheck", str(TPU_VM), str(GPU)], check=True)


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
  """A home directory with a checkout whose .venv/bin/python is a stub trainer; kills it after."""
  home = tmp_path / "home"
  venv_bin = home / "pmsn_jax" / ".venv" / "bin"
  venv_bin.mkdir(parents=True)
  _write_script(venv_bin / "python", """trap 'echo "stub: SIGTERM"; exit 0' TERM
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
                           "--", EXTRA)
  status = _tpu_remote_script(tripwire, "status", *TPU)
  stop = _tpu_remote_script(tripwire, "stop", *TPU, "--wait=5")
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

  stopped = _worker_shell(shell, stop, worker_home)
  assert stopped.returncode == 0 and "training exited" in stopped.stdout, stopped.stderr
  assert "stub: SIGTERM" in log.read_text()
  assert "no training running" in _worker_shell(shell, status, worker_home).stdout
  assert "no training running" in _worker_shell(shell, stop, worker_home).stdout


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
