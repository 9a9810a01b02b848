"""GFLOP/s of one ViT block's dense-layer matmuls, in JAX (XLA:CPU) or in PyTorch.

  python benchmarks/block_gemms.py --framework=jax [--model=Ti] [--tokens=4296]
  $TORCH_VENV/bin/python benchmarks/block_gemms.py --framework=torch --model=Ti

For each of qkv, proj, fc1 and fc2 it times the forward product X·W, and the two backward
products dY·Wᵀ (input gradient) and Xᵀ·dY (weight gradient), each alone, as the framework
runs them with two threads (JAX: this package's XLA flags; PyTorch: torch.set_num_threads(2)).
The default --tokens is the Ti/16 and S/16 official-views step's online encoder: 8 anchors of
1 + 166 tokens (224 px, 15% of patches dropped) and 80 focal crops of 1 + 36 (96 px). Run it
under both frameworks, alternately, to see whether the train step's gap (or lead) is in the
matmuls or elsewhere. The last line is machine-readable: total_ms=<sum of the 12 products>.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

WIDTH = {"Ti": 192, "S": 384, "B": 768}  # ViT widths (models/vit.py's VARIANTS)


def best_seconds(run, sync, reps: int) -> float:
  """Best of 3 timings of `reps` back-to-back calls of `run`, after one warm-up call."""
  sync(run())
  best = float("inf")
  for _ in range(3):
    start = time.perf_counter()
    for _ in range(reps):
      out = run()
    sync(out)
    best = min(best, (time.perf_counter() - start) / reps)
  return best


def products(framework: str, m: int, k: int, n: int):
  """-> {name: zero-argument callable} of the three products of an [m,k]·[k,n] dense layer,
  and the function that waits for a result."""
  if framework == "jax":
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:  # called once per layer: put the repository on the path once
      sys.path.insert(0, root)
    import pmsn_jax  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    import jax  # pylint: disable=import-outside-toplevel
    keys = jax.random.split(jax.random.key(0), 3)
    x, w, dy = (jax.random.normal(key, shape) for key, shape in
                zip(keys, [(m, k), (k, n), (m, n)]))
    # Operands passed as arguments: captured arrays would be constants XLA folds at compile.
    fwd, d_x, d_w = (jax.jit(f) for f in (lambda a, b: a @ b, lambda a, b: a @ b.T,
                                          lambda a, b: a.T @ b))
    return ({"fwd": lambda: fwd(x, w), "dX": lambda: d_x(dy, w), "dW": lambda: d_w(x, dy)},
            lambda out: out.block_until_ready())
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(2)
  torch.set_grad_enabled(False)
  x, w, dy = torch.randn(m, k), torch.randn(n, k), torch.randn(m, n)  # nn.Linear's layout
  return {"fwd": lambda: torch.nn.functional.linear(x, w), "dX": lambda: dy @ w,
          "dW": lambda: dy.t() @ x}, lambda out: None


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--framework", choices=["jax", "torch"], default="jax")
  parser.add_argument("--model", choices=sorted(WIDTH), default="Ti")
  parser.add_argument("--tokens", type=int, default=4296, help="rows of X")
  parser.add_argument("--reps", type=int, default=30, help="products per timing")
  args = parser.parse_args()
  d, m = WIDTH[args.model], args.tokens
  total = 0.0
  print(f"framework={args.framework} model={args.model} tokens={m}")
  for layer, (k, n) in {"qkv": (d, 3 * d), "proj": (d, d), "fc1": (d, 4 * d),
                        "fc2": (4 * d, d)}.items():
    runs, sync = products(args.framework, m, k, n)
    gflop = 2 * m * k * n / 1e9
    seconds = {name: best_seconds(run, sync, args.reps) for name, run in runs.items()}
    total += sum(seconds.values())
    print(f"{layer:5s} " + "  ".join(f"{name} {gflop / s:6.1f} GFLOP/s ({s * 1e3:.2f} ms)"
                                      for name, s in seconds.items()))
  print(f"total_ms={total * 1e3:.2f}")


if __name__ == "__main__":
  main()
