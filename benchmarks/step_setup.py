"""The train step as train.py builds it, and a random batch of its inputs: what the step
benchmarks (train_step.py, pipeline_overhead.py, ab_trees.py; step_breakdown.py's batch) time.

ab_trees.py imports this module afresh for each source tree it compares, with that tree's
`pmsn_jax` first on the path, so `build_step` builds that tree's step. `to_devices` and
`build_step` use only sharding, vit.vit_config_from and step.build / make_train_step, so trees
older than this file work too.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from pmsn_jax import sharding, step
from pmsn_jax.models import vit


def random_host_batch(config, seed: int = 0) -> dict[str, np.ndarray]:
  """A global batch of step.abstract_batch's shapes on the host: uniformly random uint8 views
  (or standard-normal float ones, for trees older than the uint8 pipeline) and photometric
  random numbers, labels in [0, 10) and the config's cluster prior."""
  rng = np.random.default_rng(seed)
  batch = {}
  for key, spec in step.abstract_batch(config).items():
    if key == "prior":
      batch[key] = step.prior_from_config(config).astype(spec.dtype)
    elif spec.dtype == np.uint8:
      batch[key] = rng.integers(0, 256, spec.shape, dtype=spec.dtype)
    elif np.issubdtype(spec.dtype, np.integer):
      batch[key] = rng.integers(0, 10, spec.shape, dtype=spec.dtype)
    elif key == "photometric":
      batch[key] = rng.random(spec.shape, dtype=spec.dtype)
    else:
      batch[key] = rng.standard_normal(spec.shape, dtype=spec.dtype)
  return batch


def to_devices(host_batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """As train.py feeds the step: views and labels split over the batch axes, prior replicated."""
  batch = sharding.to_global({k: v for k, v in host_batch.items() if k != "prior"}, mesh)
  batch["prior"] = jax.device_put(host_batch["prior"], sharding.replicated(mesh))
  return batch


def build_step(config, mesh, *, for_flop_count: bool = False):
  """-> (jitted train step, its sharded initial state), as train.py shards and jits them.

  for_flop_count: blocks fully unrolled and no remat, so that XLA's cost analysis of the
  lowering counts every block once (it counts a scan body once, and remat's recomputation)."""
  vit_cfg = vit.vit_config_from(config)
  if for_flop_count:
    vit_cfg = dataclasses.replace(vit_cfg, scan_unroll=vit_cfg.depth, remat=False)
  graphdef, tx, scheds, create_state = step.build(config, vit_cfg)
  shardings = sharding.state_shardings(jax.eval_shape(create_state), mesh,
                                       config.partition_rules, config.fsdp_min_size)
  state = jax.jit(create_state, out_shardings=shardings)()
  replicated = sharding.replicated(mesh)
  fn = jax.jit(step.make_train_step(graphdef, tx, scheds, config),
               out_shardings=(shardings, replicated, replicated), donate_argnums=0)
  return fn, state
