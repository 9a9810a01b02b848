"""Step time of two source trees of pmsn_jax, measured in one process, steps alternated.

  git worktree add /tmp/base <rev>
  python benchmarks/ab_trees.py --a=/tmp/base --b=. --config=benchmarks/configs/vit_ti16_official.py

On a shared machine whose speed drifts by +-10-25% between processes, a change worth a few
percent is lost between two benchmark runs. Here both trees' packages are imported into one
process (each under its own copy of the `pmsn_jax` modules), both steps are compiled on the same
synthetic batch, and their steps alternate (ABBA order), so drift hits both alike. Prints each
tree's median step time and the median of the paired per-step ratios b/a (< 1: b is faster).
"""

from __future__ import annotations

import os
import sys
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))
_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config.", lock_config=True)
_A = flags.DEFINE_string("a", None, "Root of the first tree (the baseline).")
_B = flags.DEFINE_string("b", None, "Root of the second tree.")
_PAIRS = flags.DEFINE_integer("pairs", 10, "Timed steps per tree (after 2 warm-up steps each).")


def import_tree(root: str):
  """-> benchmarks/step_setup.py (of this tree) bound to the pmsn_jax under `root`, both
  imported afresh: a copy of that tree's modules of its own."""
  for name in [m for m in sys.modules
               if m in ("pmsn_jax", "step_setup") or m.startswith("pmsn_jax.")]:
    del sys.modules[name]  # the other tree's modules stay alive through the references kept
  sys.path.insert(0, os.path.abspath(root))
  try:
    import step_setup  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.pop(0)
  if not os.path.abspath(step_setup.step.__file__).startswith(os.path.abspath(root)):
    raise SystemExit(f"--a/--b={root}: pmsn_jax was imported from {step_setup.step.__file__} "
                     "instead.")
  return step_setup


def compiled_step(root: str, config, host_batch):
  """The tree's train step, built and compiled as train.py does, with its state and batch."""
  step_setup = import_tree(root)
  mesh = step_setup.sharding.make_mesh(config.mesh)
  batch = step_setup.to_devices(host_batch, mesh)
  fn, state = step_setup.build_step(config, mesh)
  return fn.lower(state, batch).compile(), state, batch


def main(argv):
  del argv
  config = _CONFIG.value
  b = config.batch_size
  host_batch = import_tree(os.path.dirname(_HERE)).random_host_batch(config)  # this tree's
  runs = {}
  for name, root in (("a", _A.value), ("b", _B.value)):
    compiled, state, batch = compiled_step(root, config, host_batch)
    for _ in range(2):
      state, metrics, _ = compiled(state, batch)
    jax.block_until_ready(metrics)
    runs[name] = {"compiled": compiled, "state": state, "batch": batch, "times": []}
  for i in range(_PAIRS.value):
    for name in ("ab" if i % 2 == 0 else "ba"):
      run = runs[name]
      start = time.perf_counter()
      run["state"], metrics, _ = run["compiled"](run["state"], run["batch"])
      jax.block_until_ready(metrics)
      run["times"].append(time.perf_counter() - start)
  a, b_ = (np.array(runs[n]["times"]) for n in "ab")
  print(f"a={_A.value} median_ms={np.median(a) * 1e3:.0f} img_per_s={b / np.median(a):.2f}")
  print(f"b={_B.value} median_ms={np.median(b_) * 1e3:.0f} img_per_s={b / np.median(b_):.2f}")
  print(f"paired_ratio_b_over_a={np.median(b_ / a):.3f} pairs={_PAIRS.value}")


if __name__ == "__main__":
  # As `python -m pmsn_jax.main` runs: malloc setting, and Eigen's dots before JAX starts.
  sys.path.insert(0, os.path.dirname(_HERE))
  from pmsn_jax import host_setup  # noqa: E402
  host_setup.tune_cpu()
  flags.mark_flags_as_required(["config", "a", "b"])
  app.run(main)
