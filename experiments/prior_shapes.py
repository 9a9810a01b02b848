"""How long-tailed is a power-law prior, next to the data's class distribution?

  python experiments/prior_shapes.py [--prototypes=16,32,64,256,1024] [--exponents=0.25,0.5,1,2]

Prints, per number of prototypes K and exponent tau_p, the effective number of prototypes
exp(H(pi)) of pi_k ∝ k^-tau_p and the head prototype's share; then the same for the class
distribution of long-tailed Fashion-MNIST at imbalance 10 / 100 / 1000 (the demo's
n_c = floor(6000 * ratio^(-c/9))). A prior whose effective number is close to K is close to
uniform: PMSN with it is MSN in all but name. NumPy only; instant.
"""

from __future__ import annotations

import argparse

import numpy as np


def power_law(k: int, exponent: float) -> np.ndarray:
  p = np.arange(1, k + 1, dtype=np.float64) ** -exponent
  return p / p.sum()


def effective_number(p) -> float:
  p = np.asarray(p, np.float64)
  p = p[p > 0] / p.sum()
  return float(np.exp(-(p * np.log(p)).sum()))


def class_distribution(ratio: float, classes: int = 10, head: int = 6000) -> np.ndarray:
  counts = np.floor(head * ratio ** (-np.arange(classes) / (classes - 1)))
  return counts / counts.sum()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--prototypes", default="16,32,64,256,1024")
  parser.add_argument("--exponents", default="0.25,0.5,1,2")
  args = parser.parse_args()
  try:
    ks = [int(k) for k in args.prototypes.split(",")]
    taus = [float(t) for t in args.exponents.split(",")]
  except ValueError as e:
    parser.error(f"{e}; give comma-separated numbers, e.g. --prototypes=16,64 --exponents=0.5,1")
  if min(ks) < 1 or min(taus) < 0:
    parser.error("--prototypes must be >= 1 and --exponents >= 0")
  print("| K | " + " | ".join(f"τ_p={t:g}: eff. / head share" for t in taus) + " |")
  print("|---:|" + "---|" * len(taus))
  for k in ks:
    cells = [f"{effective_number(power_law(k, t)):.1f} / {power_law(k, t)[0]:.3f}" for t in taus]
    print(f"| {k} | " + " | ".join(cells) + " |")
  print()
  print("| long-tailed Fashion-MNIST | effective classes (of 10) | head class share |")
  print("|---|---:|---:|")
  for ratio in (1, 10, 100, 1000):
    p = class_distribution(ratio)
    print(f"| imbalance {ratio} | {effective_number(p):.2f} | {p[0]:.3f} |")


if __name__ == "__main__":
  main()
