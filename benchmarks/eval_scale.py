"""k-NN evaluation at iNaturalist 2018 scale, on synthetic features: one device vs a sharded bank.

  python benchmarks/eval_scale.py [--bank=437513] [--queries=24426] [--dim=384]
      [--classes=8142] [--devices=8] [--chunk=1024] [--k=20]

Why: issue 25 asks whether the k-NN evaluation holds at iNat18's size (437,513 train images,
24,426 validation images, 8142 classes, ViT-S/16 features of width 384). This measures
knn.knn_classify (the bank on one device) and knn.knn_classify_sharded (the bank split over
--devices devices) on the same synthetic problem, each in its own subprocess so that its peak
resident memory (resource.getrusage ru_maxrss) and its XLA_FLAGS device count are its own:
  * devices=1, knn_classify: the current single-device path;
  * devices=N, knn_classify_sharded over a mesh of the N devices (fake CPU devices here,
    --xla_force_host_platform_device_count=N; on a CPU host they share the same cores, so this
    shows the cost of the split and the memory, not a speed-up).
Features: 8142 class centres plus Gaussian noise, train labels long-tailed (power law, the
largest class ~1000 images and the smallest a handful, as in iNat18), 3 queries per class (iNat18's
validation split is balanced). Wall time covers bank placement, compiles and all chunks, not
the synthetic data generation; peak RSS includes the host copies of the features (bank: N x D
float32 = 672 MB at full size). The predictions of the runs are compared (a hash of each).

The last line is machine-readable JSON:
  {"bank": .., "queries": .., "dim": .., "classes": .., "k": .., "chunk": ..,
   "runs": [{"devices": .., "fn": .., "wall_s": .., "peak_rss_mib": .., "top1": ..,
   "preds_sha1": ..}, ..], "predictions_equal": true|false}
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
  # Power law over class rank: counts ~ rank^-1.1 (max/min ~ 10^4 at 8142 classes); every
  # class gets at least one train row when bank >= classes, the rest are drawn.
  probs = np.arange(1, classes + 1, dtype=np.float64) ** -1.1
  probs /= probs.sum()
  base = np.arange(min(bank, classes))
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
  import numpy as np  # pylint: disable=import-outside-toplevel
  from pmsn_jax import sharding  # pylint: disable=import-outside-toplevel
  from pmsn_jax.evals import knn  # pylint: disable=import-outside-toplevel
  train, train_labels, test, test_labels = synthetic(args.bank, args.queries, args.dim,
                                                     args.classes)
  if len(jax.devices()) != args.child_devices:
    raise SystemExit(f"expected {args.child_devices} devices, got {len(jax.devices())}")
  kw = dict(num_classes=args.classes, k=args.k, chunk_size=args.chunk)
  start = time.perf_counter()
  if args.child_fn == "knn_classify":
    preds = knn.knn_classify(train, train_labels, test, **kw)
  else:
    mesh = sharding.make_mesh((("data", -1),))
    preds = knn.knn_classify_sharded(train, train_labels, test, mesh=mesh, **kw)
  wall = time.perf_counter() - start
  return {"devices": args.child_devices, "fn": args.child_fn, "wall_s": round(wall, 2),
          "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
          "top1": round(float(np.mean(preds == test_labels)), 4),
          "preds_sha1": hashlib.sha1(np.ascontiguousarray(preds).tobytes()).hexdigest()[:12]}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--bank", type=int, default=437_513, help="train rows (iNat18: 437,513)")
  parser.add_argument("--queries", type=int, default=24_426, help="queries (iNat18 val: 24,426)")
  parser.add_argument("--dim", type=int, default=384, help="feature width (ViT-S: 384)")
  parser.add_argument("--classes", type=int, default=8142, help="classes (iNat18: 8142)")
  parser.add_argument("--devices", type=int, default=8, help="devices of the sharded run")
  parser.add_argument("--chunk", type=int, default=1024, help="queries per jitted call")
  parser.add_argument("--k", type=int, default=20)
  parser.add_argument("--child_fn", choices=["knn_classify", "knn_classify_sharded"],
                      help=argparse.SUPPRESS)
  parser.add_argument("--child_devices", type=int, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child_fn:
    print(json.dumps(child(args)))
    return
  for name in ("bank", "queries", "dim", "classes", "devices", "chunk", "k"):
    if getattr(args, name) < 1:
      raise SystemExit(f"--{name} must be >= 1, got {getattr(args, name)}")
  runs = []
  for devices, fn in ((1, "knn_classify"), (args.devices, "knn_classify_sharded")):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], f"--child_fn={fn}",
           f"--child_devices={devices}"]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    runs.append(json.loads(out.strip().splitlines()[-1]))
    r = runs[-1]
    print(f"{fn:22s} devices={devices}  wall {r['wall_s']:8.2f} s  peak RSS "
          f"{r['peak_rss_mib']:6d} MiB  top-1 {r['top1']:.4f}  preds {r['preds_sha1']}",
          flush=True)
  print(json.dumps({"bank": args.bank, "queries": args.queries, "dim": args.dim,
                    "classes": args.classes, "k": args.k, "chunk": args.chunk, "runs": runs,
                    "predictions_equal": len({r["preds_sha1"] for r in runs}) == 1}))


if __name__ == "__main__":
  main()
