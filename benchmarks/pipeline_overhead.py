"""Is the input pipeline ever the bottleneck? Train-step time with real data vs a cached batch.

  python benchmarks/pipeline_overhead.py [--config=configs/demo.py] [--steps=100]

Runs the jitted train step as training does, twice over --steps steps after a warm-up:
  real    each step takes the next batch of pipeline.train_batches (uint8 views made on the
          host, put on the device 2 batches ahead by feeding.DevicePrefetch), exactly the loop
          of train.py;
  cached  the same first batch, already on the device, every step.
Both share the 2 host cores (the pipeline's threads compete with XLA's), which is the point:
the issue's target is real / cached <= 1.1 for the demo. Best of --repeats per mode, modes
alternated. The last line is machine-readable:
  real_ms=<r> cached_ms=<c> ratio=<r/c>
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
from pmsn_jax import sharding, step, train  # noqa: E402
from pmsn_jax.data import feeding, pipeline, sources  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "configs", "demo.py"), "Experiment config.")
_STEPS = flags.DEFINE_integer("steps", 100, "Timed steps per repeat.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Repeats of each mode; the best is reported.")

def main(argv):
  del argv
  config = _CONFIG.value
  mesh = sharding.make_mesh(config.mesh)
  train_split, rows = train.load_pretraining_data(config)
  data = (train_split if isinstance(train_split, sources.TfdsImages)
          else train_split.subset(rows))  # as train.py: the long-tailed pretraining rows
  batches = pipeline.train_batches(data, config.data, global_batch_size=config.batch_size,
                                   seed=config.seed,
                                   batch_class_skew=config.data.batch_class_skew)
  train_step, state = step_setup.build_step(config, mesh)  # train.py's step
  prior = jax.device_put(step.prior_from_config(config), sharding.replicated(mesh))

  on_devices = feeding.DevicePrefetch(  # as train.py's loop takes each pipeline batch
      batches, lambda b: sharding.to_global({k: b[k] for k in step.BATCH_KEYS}, mesh))

  def real_batch():
    return dict(next(on_devices)[0], prior=prior)

  cached = real_batch()
  for _ in range(3):  # compile, warm the pipeline's threads
    state, metrics, _ = train_step(state, real_batch())
  jax.block_until_ready(metrics)
  best = {"real": float("inf"), "cached": float("inf")}
  for _ in range(_REPEATS.value):
    for mode in best:
      t = time.perf_counter()
      for _ in range(_STEPS.value):
        state, metrics, _ = train_step(state, real_batch() if mode == "real" else cached)
      jax.block_until_ready(metrics)
      best[mode] = min(best[mode], (time.perf_counter() - t) / _STEPS.value)
  on_devices.close()
  ratio = best["real"] / best["cached"]
  print(f"backend={jax.default_backend()} model={config.model.variant} "
        f"batch={config.batch_size} source={config.data.source} steps={_STEPS.value}")
  print(f"real_ms={best['real'] * 1e3:.1f} cached_ms={best['cached'] * 1e3:.1f} "
        f"ratio={ratio:.3f}")


if __name__ == "__main__":
  app.run(main)
