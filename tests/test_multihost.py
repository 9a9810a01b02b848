"""A real multi-process run: 2 processes x 4 CPU devices, connected by jax.distributed over
localhost (gloo collectives), train an FSDP-sharded model, checkpoint, export and evaluate, and
reach the same parameters as 1 process x 8 devices."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
from tests import subprocess_runs
from tests.subprocess_runs import ROOT

pytestmark = subprocess_runs.MARKS

OVERRIDES = [
    "--config=configs/demo.py:smoke", "--config.total_steps=4", "--config.log_every_steps=2",
    "--config.checkpoint_every_steps=4", "--config.batch_size=16", "--config.model.depth=2",
    "--config.mesh=(('data', 2), ('fsdp', 4), ('tensor', 1))", "--config.fsdp_min_size=1024",
    "--config.eval.max_train_examples=1000", "--config.eval.max_test_examples=500",
    "--config.eval.linear_epochs=1",
]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def start(workdir, devices, *extra):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  return subprocess.Popen([sys.executable, "-m", "pmsn_jax.main", f"--workdir={workdir}",
                           *OVERRIDES, *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def finish(proc):
  out, err = proc.communicate(timeout=900)
  assert proc.returncode == 0, err[-3000:]
  return out


def params(workdir):
  """The exported EMA target encoder (it depends on every parameter and the whole run). The
  export holds whole numpy arrays, so it reads back on any topology."""
  with ocp.StandardCheckpointer() as ckpt:
    return ckpt.restore(os.path.join(workdir, "export", "params"))


def test_two_processes_match_one(tmp_path):
  multi, single = tmp_path / "multi", tmp_path / "single"
  port = free_port()
  procs = [start(multi, 4, f"--coordinator_address=localhost:{port}", "--num_processes=2",
                 f"--process_id={i}") for i in range(2)]
  outs = [finish(p) for p in procs]
  finish_single = finish(start(single, 8))

  # Process 0 reports and writes metrics/eval/export; process 1 stays quiet.
  assert "over 2 process(es), 8 cpu device(s)" in outs[0] and "step 4/4" in outs[0]
  assert "k-NN top-1" in outs[0] and "step" not in outs[1] and "k-NN" not in outs[1]
  assert "over 1 process(es), 8 cpu device(s)" in finish_single
  with open(multi / "metrics.jsonl") as f:
    steps = [json.loads(line)["step"] for line in f if "loss" in line]
  assert steps == [2, 4]
  for name in ("eval.json", "export/model_config.json"):
    assert (multi / name).exists(), name

  # The global batch does not depend on the process count, so the runs agree (up to the
  # order of cross-process sums: Adam can turn that into ~lr on near-zero gradients).
  a = np.concatenate([np.ravel(x) for x in _leaves(params(multi))])
  b = np.concatenate([np.ravel(x) for x in _leaves(params(single))])
  assert a.shape == b.shape
  assert np.mean(np.abs(a - b) < 1e-5) > 0.98
  np.testing.assert_allclose(a, b, atol=4 * 3e-3)
  assert (multi / "checkpoints" / "4").is_dir()


def _leaves(tree):
  if isinstance(tree, dict):
    return [leaf for key in sorted(tree) for leaf in _leaves(tree[key])]
  return [np.asarray(tree)]
