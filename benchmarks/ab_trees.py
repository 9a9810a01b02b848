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

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config.", lock_config=True)
_A = flags.DEFINE_string("a", None, "Root of the first tree (the baseline).")
_B = flags.DEFINE_string("b", None, "Root of the second tree.")
_PAIRS = flags.DEFINE_integer("pairs", 10, "Timed steps per tree (after 2 warm-up steps each).")


def import_package(root: str):
  """-> (step, sharding, vit) modules of the pmsn_jax under `root`, a copy of their own."""
  for name in [m for m in sys.modules if m == "pmsn_jax" or m.startswith("pmsn_jax.")]:
    del sys.modules[name]  # the other tree's modules stay alive through the references kept
  sys.path.insert(0, os.path.abspath(root))
  try:
    from pmsn_jax import sharding, step  # pylint: disable=import-outside-toplevel
    from pmsn_jax.models import vit  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.pop(0)
  if not os.path.abspath(step.__file__).startswith(os.path.abspath(root)):
    raise SystemExit(f"--a/--b={root}: pmsn_jax was imported from {step.__file__} instead.")
  return step, sharding, vit


def compiled_step(root: str, config, batch_arrays):
  """The tree's train step, compiled as train.py compiles it, with its state and batch."""
  step, sharding, vit = import_package(root)
  mesh = sharding.make_mesh(config.mesh)
  batch = sharding.to_global({k: v for k, v in batch_arrays.items() if k != "prior"}, mesh)
  batch["prior"] = step.prior_from_config(config)
  graphdef, tx, scheds, create_state = step.build(config, vit.vit_config_from(config))
  state = create_state()
  fn = step.make_train_step(graphdef, tx, scheds, config)
  compiled = jax.jit(fn, donate_argnums=0).lower(state, batch).compile()
  return compiled, state, batch


def main(argv):
  del argv
  config = _CONFIG.value
  d, b = config.data, config.batch_size
  rng = np.random.default_rng(0)
  view = lambda *shape: rng.standard_normal((b, *shape), dtype=np.float32)  # noqa: E731
  arrays = {"target": view(d.image_size, d.image_size, d.channels),
            "anchor": view(d.image_size, d.image_size, d.channels),
            "focal": view(d.num_focal, d.focal_size, d.focal_size, d.channels),
            "label": rng.integers(0, 10, b, dtype=np.int32)}
  runs = {}
  for name, root in (("a", _A.value), ("b", _B.value)):
    compiled, state, batch = compiled_step(root, config, arrays)
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
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from pmsn_jax import host_setup  # noqa: E402
  host_setup.exec_with_huge_page_malloc()
  flags.mark_flags_as_required(["config", "a", "b"])
  app.run(main)
