"""Throughput and MFU of the jitted PMSN train step on this machine.

  python benchmarks/train_step.py --config=configs/demo.py [--steps=20] [--config.batch_size=..]

Prints img/s of the train step alone (synthetic batches already on device, so the input
pipeline is not measured), model FLOPs per image from XLA's cost analysis of a fully unrolled
lowering (a scan body would be counted once), this machine's f32 matmul peak measured in the
same process, and MFU = achieved FLOP/s / peak. The last line is machine-readable:
  img_per_s=<x> gflops_per_img=<y> peak_gflops=<z> mfu=<m>
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from pmsn_jax import sharding, step  # noqa: E402
from pmsn_jax.models import vit  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config.", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps (after 2 warm-up steps).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timing repeats; the best is reported.")


def matmul_peak_gflops(n: int = 2048, reps: int = 10) -> float:
  """Best f32 matmul throughput of this backend in GFLOP/s (square n x n x n products)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  mm = jax.jit(lambda x, y: x @ y)
  mm(a, b).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    mm(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best / 1e9


def synthetic_batch(config) -> dict[str, np.ndarray]:
  d, b = config.data, config.batch_size
  rng = np.random.default_rng(0)
  view = lambda *shape: rng.standard_normal((b, *shape), dtype=np.float32)  # noqa: E731
  return {"target": view(d.image_size, d.image_size, d.channels),
          "anchor": view(d.image_size, d.image_size, d.channels),
          "focal": view(d.num_focal, d.focal_size, d.focal_size, d.channels)}


def build_step(config, mesh, vit_cfg):
  graphdef, tx, scheds, create_state = step.build(config, vit_cfg)
  abstract = jax.eval_shape(create_state)
  shardings = sharding.state_shardings(abstract, mesh)
  state = jax.jit(create_state, out_shardings=shardings)()
  fn = jax.jit(step.make_train_step(graphdef, tx, scheds, step.prior_from_config(config), config),
               in_shardings=(shardings, sharding.batch_sharding(mesh)),
               out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
  return fn, state


def main(argv):
  del argv
  config = _CONFIG.value
  mesh = sharding.make_mesh(config.mesh)
  batch = sharding.to_global(synthetic_batch(config), mesh)
  vit_cfg = vit.vit_config_from(config.model, config.data.image_size, config.data.channels)

  # FLOPs from an unrolled lowering (no compile needed for the cost analysis).
  unrolled_fn, unrolled_state = build_step(
      config, mesh, dataclasses.replace(vit_cfg, scan_unroll=vit_cfg.depth))
  flops = unrolled_fn.lower(unrolled_state, batch).cost_analysis()["flops"]
  gflops_per_img = flops / config.batch_size / 1e9
  del unrolled_fn, unrolled_state

  fn, state = build_step(config, mesh, vit_cfg)
  t = time.perf_counter()
  compiled = fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - t
  for _ in range(2):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  best = float("inf")
  for _ in range(_REPEATS.value):
    t = time.perf_counter()
    for _ in range(_STEPS.value):
      state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    best = min(best, (time.perf_counter() - t) / _STEPS.value)
  img_per_s = config.batch_size / best
  peak = matmul_peak_gflops()
  mfu = img_per_s * gflops_per_img / peak
  print(f"backend={jax.default_backend()} devices={jax.device_count()} "
        f"model={config.model.variant} batch={config.batch_size} compile_s={compile_s:.1f} "
        f"step_ms={best * 1e3:.1f}")
  print(f"img_per_s={img_per_s:.2f} gflops_per_img={gflops_per_img:.3f} "
        f"peak_gflops={peak:.1f} mfu={mfu:.3f}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
