"""Fault injection: the smoke config in subprocesses, stopped by SIGTERM or kill -9 (also while
an async save is in flight), fed NaNs and bad inputs. Each test is a guarantee listed in
docs/reliability.md."""

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

from pmsn_jax import preemption
from tests import subprocess_runs
from tests.subprocess_runs import ROOT

pytestmark = subprocess_runs.MARKS

STEPS = 12
BASE = ["--config=configs/demo.py:smoke", f"--config.total_steps={STEPS}",
        "--config.log_every_steps=1", "--config.checkpoint_every_steps=4",
        "--config.batch_size=32", "--config.model.depth=2", "--config.eval.enabled=False"]


def command(workdir, *extra):
  return [sys.executable, "-m", "pmsn_jax.main", f"--workdir={workdir}", *BASE, *extra]


def env():
  return dict(os.environ, XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="3")


def run(workdir, *extra):
  return subprocess.run(command(workdir, *extra), cwd=ROOT, env=env(), capture_output=True,
                        text=True, timeout=600)


def run_until(workdir, pattern: str, sig: int, *extra):
  """Starts a run, sends `sig` once `pattern` appears on stdout, returns (status, stdout)."""
  proc = subprocess.Popen(command(workdir, *extra), cwd=ROOT, env=env(), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if pattern in line:
      proc.send_signal(sig)
      break
  out, err = proc.communicate(timeout=600)
  return proc.returncode, "".join(lines) + out, err


def checkpoints(workdir):
  directory = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def params(workdir, step=STEPS):
  with ocp.StandardCheckpointer() as ckpt:
    state = ckpt.restore(os.path.join(workdir, "checkpoints", str(step), "default"))
  return [np.asarray(x) for x in _leaves(state["params"])] + [
      np.asarray(x) for x in _leaves(state["target"])]


def _leaves(tree):
  if isinstance(tree, dict):
    return [leaf for key in sorted(tree) for leaf in _leaves(tree[key])]
  return [tree]


def assert_same_params(a, b):
  for x, y in zip(params(a), params(b)):
    np.testing.assert_allclose(x, y, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("straight")
  done = run(workdir)
  assert done.returncode == 0, done.stderr[-2000:]
  return workdir


def test_sigterm_saves_exits_143_and_resumes_exactly(straight, tmp_path):
  status, out, err = run_until(tmp_path, "step 5/", signal.SIGTERM)
  assert status == preemption.EXIT_STATUS, err[-2000:]
  stopped = checkpoints(tmp_path)[-1]
  assert 5 <= stopped < STEPS and f"step {stopped}" in err
  assert run(tmp_path).returncode == 0
  assert_same_params(straight, tmp_path)
  # Same examples in the same order: the per-step losses match the uninterrupted run's.
  def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}
  resumed, reference = losses(tmp_path), losses(straight)
  for step_ in range(stopped + 1, STEPS + 1):
    assert resumed[step_] == pytest.approx(reference[step_], abs=1e-6)


def test_kill_9_during_async_save_leaves_a_restorable_checkpoint(straight, tmp_path):
  # Step 8's line is printed right before its async save starts: killing then lands during
  # the save (or just before it); either way the newest complete step must restore.
  status, _, _ = run_until(tmp_path, "step 8/", signal.SIGKILL)
  assert status == -signal.SIGKILL
  assert checkpoints(tmp_path)[-1] in (4, 8)
  done = run(tmp_path)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "resuming from" in done.stdout
  assert not [n for n in os.listdir(os.path.join(tmp_path, "checkpoints")) if "tmp" in n]
  assert_same_params(straight, tmp_path)


def test_partial_checkpoint_directory_is_ignored_and_removed(straight, tmp_path):
  # A run that got as far as checkpoint 4 and died writing 8 (Orbax writes a step to a
  # temporary directory and renames it when complete).
  tmp_path = tmp_path / "run"
  shutil.copytree(straight, tmp_path)
  for step_ in (8, 12):
    shutil.rmtree(os.path.join(tmp_path, "checkpoints", str(step_)))
  partial = os.path.join(tmp_path, "checkpoints", "8.orbax-checkpoint-tmp-1234567890")
  os.makedirs(os.path.join(partial, "default"))
  with open(os.path.join(partial, "default", "junk"), "w") as f:
    f.write("half a save")
  done = run(tmp_path)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "resuming from" in done.stdout and not os.path.exists(partial)
  assert_same_params(straight, tmp_path)


def test_nan_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
  assert run(tmp_path, "--config.total_steps=4").returncode == 0
  before = params(tmp_path, 4)
  # An absurd learning rate (not a shape key) drives the resumed run to inf/NaN.
  done = run(tmp_path, "--config.optim.lr=1e30", "--config.optim.start_lr=1e30")
  assert done.returncode == 2
  assert done.stderr.startswith("error: non-finite") and "at step " in done.stderr
  assert len(done.stderr.strip().splitlines()) == 1
  assert checkpoints(tmp_path) == [4]
  for x, y in zip(before, params(tmp_path, 4)):
    np.testing.assert_array_equal(x, y)


def snapshot(workdir):
  out = {}
  for base, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(base, name)
      with open(path, "rb") as f:
        out[path] = f.read()
  return out


@pytest.mark.parametrize("extra,message", [
    (["--config.model.width=48"], "differs in ['model.width']"),
    (["--config.data.focal_size=21"], "focal_size"),
    (["--config.loss.temperature=-1"], "loss.temperature"),
    (["--config.mesh=(('data', 3),)"], "config.mesh"),
    (["--config.lossx.prior=uniform"], "did you mean 'loss"),
    (["--config.data.source=idx:/no/such/dir"], "/no/such/dir"),
])
def test_bad_input_is_one_line_and_changes_nothing(straight, extra, message):
  before = snapshot(straight)
  done = run(straight, *extra)
  assert done.returncode == 2, done.stderr[-2000:]
  assert done.stderr.startswith("error: ") and message in done.stderr
  assert len(done.stderr.strip().splitlines()) == 1
  assert snapshot(straight) == before


def test_unwritable_workdir_is_one_line(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  done = run(blocker / "run")
  assert done.returncode == 2 and "is not writable" in done.stderr
  assert len(done.stderr.strip().splitlines()) == 1
