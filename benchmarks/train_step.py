"""Throughput and MFU of the jitted PMSN train step on this machine.

  python benchmarks/train_step.py --config=configs/demo.py [--steps=20] [--config.batch_size=..]

Prints img/s of the train step alone (synthetic batches already on device, so the input
pipeline is not measured), model FLOPs per image from XLA's cost analysis of a fully unrolled
lowering (a scan body would be counted once), this machine's matmul peak in the config's
compute dtype measured in the same process (or --peak_gflops, e.g. a datasheet figure:
989400 for H100/H200 dense bf16), and MFU = achieved FLOP/s / peak. Remat's recomputation is
not counted as model FLOPs (the FLOPs come from the config with remat off).
The last line is machine-readable:
  img_per_s=<x> gflops_per_img=<y> peak_gflops=<z> mfu=<m>
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import step_setup  # noqa: E402  (benchmarks/, beside this file)
from pmsn_jax import host_setup, sharding  # noqa: E402
from pmsn_jax.models import vit  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config.", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps (after 2 warm-up steps).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timing repeats; the best is reported.")
_CPU_TUNING = flags.DEFINE_bool("cpu_tuning", True, "As pmsn_jax.main's flag: Eigen dots and "
                                 "huge-page malloc (host_setup.tune_cpu) before JAX starts.")
_PEAK = flags.DEFINE_float("peak_gflops", 0.0, "Peak to divide by; 0: measure it here.")
_GFLOPS = flags.DEFINE_float(
    "gflops_per_img", 0.0, "Model GFLOPs per image; 0: XLA's cost analysis of an unrolled "
    "lowering here (some GPU backends give none: pass the CPU figure of the same config).")


def matmul_peak_gflops(dtype="float32", reps: int = 10) -> float:
  """Best matmul throughput of this backend in GFLOP/s (square n x n x n products)."""
  n = 2048 if jax.default_backend() == "cpu" else 8192
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  mm = jax.jit(lambda x, y: x @ y)
  mm(a, b).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    mm(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best / 1e9


def main(argv):
  del argv
  if _CPU_TUNING.value:
    host_setup.tune_cpu()  # as `python -m pmsn_jax.main` runs; JAX has not started yet
  config = _CONFIG.value
  mesh = sharding.make_mesh(config.mesh)
  batch = step_setup.to_devices(step_setup.random_host_batch(config), mesh)

  gflops_per_img = _GFLOPS.value
  if not gflops_per_img:  # FLOPs from the lowering (no compile needed).
    unrolled_fn, unrolled_state = step_setup.build_step(config, mesh, for_flop_count=True)
    analysis = unrolled_fn.lower(unrolled_state, batch).cost_analysis()
    if not analysis:
      raise SystemExit(f"{jax.default_backend()} gives no cost analysis of a lowering: pass "
                       "--gflops_per_img (run this config on CPU to get it).")
    gflops_per_img = analysis["flops"] / config.batch_size / 1e9
    del unrolled_fn, unrolled_state

  fn, state = step_setup.build_step(config, mesh)
  t = time.perf_counter()
  compiled = fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - t
  for _ in range(2):
    state, metrics, _ = compiled(state, batch)
  jax.block_until_ready(metrics)
  best = float("inf")
  for _ in range(_REPEATS.value):
    t = time.perf_counter()
    for _ in range(_STEPS.value):
      state, metrics, _ = compiled(state, batch)
    jax.block_until_ready(metrics)
    best = min(best, (time.perf_counter() - t) / _STEPS.value)
  img_per_s = config.batch_size / best
  dtype = vit.vit_config_from(config).dtype  # "auto" resolved for this backend
  measured_peak = matmul_peak_gflops(dtype)
  peak = _PEAK.value or measured_peak
  mfu = img_per_s * gflops_per_img / peak
  memory = compiled.memory_analysis()
  temp_mib = getattr(memory, "temp_size_in_bytes", 0) / 2 ** 20
  print(f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} "
        f"devices={jax.device_count()} model={config.model.variant} "
        f"batch={config.batch_size} dtype={dtype} remat={config.model.remat} "
        f"compile_s={compile_s:.1f} step_ms={best * 1e3:.1f} temp_mib={temp_mib:.0f} "
        f"measured_matmul_peak_gflops={measured_peak:.1f} "
        f"mfu_vs_measured={img_per_s * gflops_per_img / measured_peak:.3f}")
  print(f"img_per_s={img_per_s:.2f} gflops_per_img={gflops_per_img:.3f} "
        f"peak_gflops={peak:.1f} mfu={mfu:.3f}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
