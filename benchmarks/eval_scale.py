"""The evaluation suite's evaluators at iNaturalist 2018 scale, on synthetic features: the
k-NN, the linear probe and low-shot, each on the features as the suite holds them (a
row-sharded global array), on 1 device and on --devices devices.

  python benchmarks/eval_scale.py [--bank=437513] [--queries=24426] [--dim=384]
      [--classes=8142] [--devices=8] [--chunk=1024] [--k=20] [--linear_epochs=2]
      [--linear_batch=256] [--shots=1,2] [--lowshot_splits=1] [--only_devices=N]

Why: the suite must hold at iNat18's size (437,513 train images, 24,426 validation images, 8142
classes, ViT-S/16 features of width 384), with the train features split over the devices. Each
device count runs in its own subprocess, so that its peak resident memory
(resource.getrusage ru_maxrss) and its XLA_FLAGS device count are its own. With N > 1 the
devices are fake CPU devices sharing the same cores: the run shows the memory split and that
nothing changes, not a speed-up.

Per run, in order (wall times include compiles; not the synthetic data generation):
  * layout: the features as the suite holds them (features.SplitFeatures: rows over the batch
    axes, each real row keyed by its row number), made from host arrays;
  * knn: knn.knn_sharded of every query against the whole bank (predictions hashed: the runs
    must agree exactly);
  * linear: linear.train_probe_sharded for --linear_epochs epochs of global batch
    --linear_batch (the per-epoch time projects the 100-epoch protocol), then predict;
  * lowshot: lowshot.lowshot_from for --shots over --lowshot_splits splits, the rows drawn
    from the sharded features (features.SplitFeatures.take).
Features: 8142 class centres plus Gaussian noise, train labels long-tailed (power law, the
largest class ~1000 images and the smallest a handful, as in iNat18), 3 queries per class
(iNat18's validation split is balanced). Peak RSS includes the host copies of the features
(bank: N x D float32 = 672 MB at full size).

The last line is machine-readable JSON:
  {"bank": .., ..., "runs": [{"devices": .., "layout_s": .., "knn_s": .., "knn_top1": ..,
   "knn_sha1": .., "linear_s": .., "linear_epoch_s": .., "linear_top1": .., "lowshot_s": ..,
   "lowshot": {..}, "peak_rss_mib": ..}, ..], "knn_predictions_equal": true|false}
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def synthetic(bank: int, queries: int, dim: int, classes: int, seed: int = 0):
  """(train features, long-tailed train labels, query features, query labels), float32."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  # Power law over class rank: counts ~ rank^-1.1; every class gets at least two train rows
  # (iNat18's minimum) when bank >= 2 x classes, the rest are drawn.
  probs = np.arange(1, classes + 1, dtype=np.float64) ** -1.1
  probs /= probs.sum()
  base = np.arange(min(bank, 2 * classes)) % classes
  train_labels = np.concatenate([base, rng.choice(classes, bank - base.size, p=probs)])
  train_labels = rng.permutation(train_labels).astype(np.int32)
  test_labels = (np.arange(queries) % classes).astype(np.int32)
  centres = rng.standard_normal((classes, dim), dtype=np.float32)
  train = centres[train_labels] + 1.5 * rng.standard_normal((bank, dim), dtype=np.float32)
  test = centres[test_labels] + 1.5 * rng.standard_normal((queries, dim), dtype=np.float32)
  return train, train_labels, test, test_labels


def child(args) -> dict:
  """One measurement, in this process (its XLA_FLAGS were set by the parent)."""
  sys.path.insert(0, _ROOT)
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from pmsn_jax import sharding  # pylint: disable=import-outside-toplevel
  from pmsn_jax.evals import classwise, features, knn, linear, lowshot  # pylint: disable=C0415
  train, train_labels, test, test_labels = synthetic(args.bank, args.queries, args.dim,
                                                     args.classes)
  if len(jax.devices()) != args.child_devices:
    raise SystemExit(f"expected {args.child_devices} devices, got {len(jax.devices())}")
  out = {"devices": args.child_devices}
  rss = lambda: round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # noqa: E731

  start = time.perf_counter()
  mesh = sharding.make_mesh((("data", -1),))
  split = features.SplitFeatures.from_host(train, train_labels, mesh)
  values, labels = split.values, split.labels
  weights = jnp.where(split.keys >= 0, 1.0, 0.0)
  jax.block_until_ready(weights)
  out.update(layout_s=round(time.perf_counter() - start, 2),
             rows_per_device=values.addressable_shards[0].data.shape[0])

  start = time.perf_counter()
  preds = knn.knn_sharded(split.values, split.labels, split.keys, test, mesh=mesh,
                          num_classes=args.classes, k=args.k, chunk_size=args.chunk)[0]
  out.update(knn_s=round(time.perf_counter() - start, 2),
             knn_top1=round(classwise.top1(preds, test_labels), 4),
             knn_sha1=hashlib.sha1(np.ascontiguousarray(preds).tobytes()).hexdigest()[:12],
             knn_peak_rss_mib=rss())

  if args.linear_epochs:
    start = time.perf_counter()
    params = linear.train_probe_sharded(values, labels, weights, mesh=mesh,
                                        num_classes=args.classes, epochs=1,
                                        batch_size=args.linear_batch, learning_rate=6.4)
    first = time.perf_counter() - start  # one epoch, with its compile
    if args.linear_epochs > 1:
      start = time.perf_counter()
      params = linear.train_probe_sharded(values, labels, weights, mesh=mesh,
                                          num_classes=args.classes, epochs=args.linear_epochs,
                                          batch_size=args.linear_batch, learning_rate=6.4)
      per_epoch = (time.perf_counter() - start) / args.linear_epochs
    else:
      per_epoch = first
    pred = linear.predict(params, test)
    out.update(linear_first_epoch_s=round(first, 2), linear_epoch_s=round(per_epoch, 2),
               linear_top1=round(classwise.top1(pred, test_labels), 4),
               linear_peak_rss_mib=rss())

  if args.shots:
    start = time.perf_counter()
    pool = split.order
    result = lowshot.lowshot_from(split.host_labels[pool], lambda rows: split.take(pool[rows]),
                                  test, test_labels, num_classes=args.classes,
                                  shots=args.shots, splits=args.lowshot_splits)
    out.update(lowshot_s=round(time.perf_counter() - start, 2),
               lowshot={k: round(v["mean"], 4) for k, v in result.items()},
               lowshot_peak_rss_mib=rss())
  out["peak_rss_mib"] = rss()
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--bank", type=int, default=437_513, help="train rows (iNat18: 437,513)")
  parser.add_argument("--queries", type=int, default=24_426, help="queries (iNat18 val: 24,426)")
  parser.add_argument("--dim", type=int, default=384, help="feature width (ViT-S: 384)")
  parser.add_argument("--classes", type=int, default=8142, help="classes (iNat18: 8142)")
  parser.add_argument("--devices", type=int, default=8, help="devices of the sharded run")
  parser.add_argument("--chunk", type=int, default=1024, help="queries per jitted k-NN call")
  parser.add_argument("--k", type=int, default=20)
  parser.add_argument("--linear_epochs", type=int, default=2, help="0: no linear probe")
  parser.add_argument("--linear_batch", type=int, default=256,
                      help="global batch (eval.linear_batch_size)")
  parser.add_argument("--shots", type=lambda s: tuple(int(k) for k in s.split(",") if k),
                      default=(1, 2), help="low-shot images per class (iNat18 has 2 in its "
                      "rarest classes); '' for none")
  parser.add_argument("--lowshot_splits", type=int, default=1)
  parser.add_argument("--only_devices", type=int, help="run this device count only")
  parser.add_argument("--child_devices", type=int, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child_devices:
    print(json.dumps(child(args)))
    return
  for name in ("bank", "queries", "dim", "classes", "devices", "chunk", "k", "linear_batch",
               "lowshot_splits"):
    if getattr(args, name) < 1:
      raise SystemExit(f"--{name} must be >= 1, got {getattr(args, name)}")
  runs = []
  for devices in [args.only_devices] if args.only_devices else [1, args.devices]:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:],
           f"--child_devices={devices}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
      raise SystemExit(f"devices={devices} failed:\n{proc.stderr[-3000:]}")
    runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    r = runs[-1]
    print(f"devices={devices}: {r['rows_per_device']} bank rows per device; layout "
          f"{r['layout_s']} s; k-NN {r['knn_s']} s (top-1 {r['knn_top1']}, preds "
          f"{r['knn_sha1']}, peak RSS {r['knn_peak_rss_mib']} MiB)", flush=True)
    if "linear_epoch_s" in r:
      print(f"  linear probe: first epoch {r['linear_first_epoch_s']} s (with compile), then "
            f"{r['linear_epoch_s']} s per epoch (100 epochs ~ {100 * r['linear_epoch_s'] / 60:.0f}"
            f" min); top-1 {r['linear_top1']}; peak RSS {r['linear_peak_rss_mib']} MiB",
            flush=True)
    if "lowshot_s" in r:
      print(f"  low-shot {args.shots} x {args.lowshot_splits} split(s): {r['lowshot_s']} s, "
            f"top-1 {r['lowshot']}; peak RSS {r['lowshot_peak_rss_mib']} MiB", flush=True)
  print(json.dumps({"bank": args.bank, "queries": args.queries, "dim": args.dim,
                    "classes": args.classes, "k": args.k, "chunk": args.chunk,
                    "linear_epochs": args.linear_epochs, "linear_batch": args.linear_batch,
                    "shots": list(args.shots), "lowshot_splits": args.lowshot_splits,
                    "runs": runs,
                    "knn_predictions_equal": len({r["knn_sha1"] for r in runs}) == 1}))


if __name__ == "__main__":
  main()
