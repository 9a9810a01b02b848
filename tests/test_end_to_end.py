"""End-to-end: demo.py:smoke trains, evaluates, exports, and a rerun resumes."""

import json
import os
import subprocess
import sys

import numpy as np

from pmsn_jax import load_encoder
from tests import subprocess_runs
from tests.subprocess_runs import ROOT

pytestmark = subprocess_runs.MARKS


def run_main(workdir, *overrides):
  # One CPU device, like the README's demo; JAX logs every compilation (on stderr).
  env = dict(os.environ, XLA_FLAGS="", JAX_LOG_COMPILES="1")
  proc = subprocess.run(
      [sys.executable, "-m", "pmsn_jax.main", "--config=configs/demo.py:smoke",
       f"--workdir={workdir}", *overrides],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def run_evaluate(*args):
  return subprocess.run([sys.executable, "-m", "pmsn_jax.evaluate", *args], cwd=ROOT,
                        env=dict(os.environ, XLA_FLAGS=""), capture_output=True, text=True,
                        timeout=600)


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_smoke_trains_evaluates_exports_and_resumes(tmp_path):
  workdir = tmp_path / "smoke"
  first = run_main(workdir, "--config.profile_steps=2")

  train_rows = [r for r in read_metrics(workdir) if "loss" in r]
  assert [r["step"] for r in train_rows] == [4, 8, 12]
  assert train_rows[-1]["loss"] < train_rows[0]["loss"]
  assert all(np.isfinite(r["loss"]) for r in train_rows)
  for row in train_rows:  # the host's input figures (data/feeding.py), each log step
    assert row["input_wait_ms"] >= 0 and 0 <= row["input_wait_pct"] <= 100
    assert row["host_img_per_s"] > 0 and row["input_slowest_host"] == 0
  assert "step 12/12" in first.stdout and "input wait" in first.stdout and "k-NN top-1" in first.stdout
  # The step is compiled once, up front, and never again (12 steps, 2 checkpoints, eval).
  assert first.stderr.count("Compiling jit(train_step)") == 1

  with open(workdir / "eval.json") as f:
    result = json.load(f)
  for key in ("knn_top1", "knn_lt_top1", "linear_top1", "random_init_knn_top1",
              "random_init_knn_lt_top1", "per_class_top1", "groups", "step"):
    assert key in result, key
  assert result["step"] == 12 and len(result["per_class_top1"]) == 10
  assert result["features"] == "cls"
  assert set(result["groups"]) == {"many", "medium", "few"}
  assert 0.1 < result["knn_top1"] <= 1.0  # far above chance (10%) even after 12 steps
  with open(workdir / "config.json") as f:
    assert json.load(f)["model"]["variant"] == "mu/7"
  assert sorted(os.listdir(workdir / "checkpoints")) == ["12", "6"]
  assert "trained parameters (online: " in first.stdout
  # A jax.profiler trace of steps 2-3, where TensorBoard's Profile tab looks.
  assert "profile of steps 2-3" in first.stdout
  assert list((workdir / "plugins" / "profile").glob("*/*.xplane.pb"))
  assert any(n.startswith("events") for n in os.listdir(workdir / "tensorboard"))

  features = load_encoder(str(workdir / "export"))(np.zeros((2, 28, 28, 1), np.uint8))
  assert features.shape == (2, 128)

  # The evaluate CLI on the run's newest checkpoint (read-only) gives training's own numbers.
  rescored = run_evaluate(f"--checkpoint={workdir}", "--config=configs/demo.py:smoke",
                          "--random_init")
  assert rescored.returncode == 0, rescored.stderr[-3000:]
  with open(workdir / "eval_step_12_cls.json") as f:
    again = json.load(f)
  for key in ("knn_top1", "knn_lt_top1", "linear_top1", "random_init_knn_top1",
              "per_class_top1", "groups", "lowshot", "step"):
    assert again[key] == result[key], key
  assert again["checkpoint"] == str(workdir)
  with open(workdir / "eval.json") as f:
    assert json.load(f) == result  # training's own result is left as it was
  wrong = run_evaluate(f"--checkpoint={workdir}/checkpoints/6", "--config=configs/demo.py")
  assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
  assert [line for line in wrong.stderr.splitlines() if line.startswith("error:")] == [
      f"error: {workdir} was trained with a config that differs in ['model.hidden_dim', "
      "'model.num_prototypes', 'data.num_focal']; pass the training config (and its "
      "--config.* overrides)"]

  # Same command with a longer horizon: resumes from step 12, does not restart.
  second = run_main(workdir, "--config.total_steps=16")
  assert "step 16/16" in second.stdout and "step 4/" not in second.stdout
  steps = [r["step"] for r in read_metrics(workdir) if "loss" in r]
  assert steps == [4, 8, 12, 16]
  assert "16" in os.listdir(workdir / "checkpoints")


def test_init_from_an_export_warm_starts_a_new_run(tmp_path):
  """--config.init_from through pmsn_jax.main: the new run starts from the export's encoder,
  head and prototypes (warm_start.py; its weights are tested in tests/test_warm_start.py)."""
  first = tmp_path / "first"
  run_main(first, "--config.total_steps=2", "--config.eval.enabled=False")
  second = run_main(tmp_path / "second", f"--config.init_from={first}/export",
                    "--config.total_steps=2", "--config.eval.enabled=False")
  assert f"warm start from {first}/export" in second.stdout
  assert "loaded encoders, heads, prototypes;" in second.stdout  # a training export has them
  assert "step 2/2" in second.stdout
