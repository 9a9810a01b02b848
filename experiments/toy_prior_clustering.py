"""The paper's Figure 1 as a runnable toy: the cluster prior decides which split K-means picks.

Data: two isotropic 2-D Gaussian blobs, a big one with 90% of the points and a small one with
10%. Clustering: K-means whose assignment step is the Sinkhorn balancing MSN/PMSN apply to their
targets, i.e. soft assignments whose cluster sizes are pinned to a prior π (K = 2):
  (a) uniform prior π = (1/2, 1/2), MSN's hidden prior: both clusters must hold half the points,
      so the best split cuts the big blob and lumps its edge with the small blob;
  (b) power-law prior π_k ∝ k^-τ, τ = log2(9) so that π = (0.9, 0.1) matches the data (with
      K = 2 any prior is a two-point power law): one cluster per blob.
Each prior keeps the lowest-cost of several seeded restarts, as K-means is used in practice.
The dotted line is the true (Bayes) boundary between the blobs.

  python experiments/toy_prior_clustering.py [--out docs/figures/toy_prior_clustering.png]

NumPy and matplotlib only; deterministic (--seed); a few seconds on one core.
"""

from __future__ import annotations

import argparse
import math
import os

import numpy as np

CENTRES = np.array([[0.0, 0.0], [6.0, 0.0]])  # big blob, small blob; both with unit std


def make_blobs(num_points: int, small_fraction: float, seed: int):
  """-> (points [N, 2], blob id [N]: 0 big, 1 small)."""
  rng = np.random.default_rng(seed)
  num_small = int(round(small_fraction * num_points))
  blob = np.repeat([0, 1], [num_points - num_small, num_small])
  return CENTRES[blob] + rng.standard_normal((num_points, 2)), blob


def bayes_boundary_x(small_fraction: float) -> float:
  """x where the two weighted unit Gaussians are equally likely: a vertical line."""
  gap = CENTRES[1, 0] - CENTRES[0, 0]
  return CENTRES[0, 0] + gap / 2 + math.log((1 - small_fraction) / small_fraction) / gap


def power_law_prior(num_clusters: int, exponent: float) -> np.ndarray:
  """π_k ∝ k^-exponent, as pmsn_jax.losses.power_law_prior (NumPy here: no JAX needed)."""
  prior = np.arange(1, num_clusters + 1, dtype=np.float64) ** -exponent
  return prior / prior.sum()


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
  top = x.max(axis=axis, keepdims=True)
  return top + np.log(np.exp(x - top).sum(axis=axis, keepdims=True))


def sinkhorn(scores: np.ndarray, prior: np.ndarray, num_iters: int = 20) -> np.ndarray:
  """Soft assignments [N, K]: rows sum to 1, column sums are N·π (log domain, like MSN's)."""
  n = scores.shape[0]
  log_q = scores - _logsumexp(scores, axis=1)
  for _ in range(num_iters):
    log_q += np.log(n * prior) - _logsumexp(log_q, axis=0)  # cluster sizes N·π
    log_q -= _logsumexp(log_q, axis=1)                        # each point assigned once
  return np.exp(log_q)


def kmeans_plus_plus(points: np.ndarray, k: int, rng) -> np.ndarray:
  """k-means++ seeding: each next centroid drawn with probability ∝ squared distance."""
  centroids = [points[rng.integers(len(points))]]
  for _ in range(k - 1):
    sq_dist = ((points[:, None, :] - np.array(centroids)[None]) ** 2).sum(-1).min(1)
    centroids.append(points[rng.choice(len(points), p=sq_dist / sq_dist.sum())])
  return np.array(centroids)


def prior_kmeans(points: np.ndarray, prior: np.ndarray, seed: int, *, restarts: int = 6,
                 num_steps: int = 20, temperature: float = 0.5):
  """K-means with Sinkhorn-balanced assignments. -> (hard labels [N], centroids [K, 2]).

  Cluster k's size is pinned to N·π_k, so the prior, not only the geometry, sets the split.
  Of `restarts` k-means++ seedings, the one with the lowest final cost is kept.
  """
  rng = np.random.default_rng(seed)
  best = (math.inf, None, None)
  for _ in range(restarts):
    centroids = kmeans_plus_plus(points, len(prior), rng)
    for _ in range(num_steps):
      sq_dist = ((points[:, None, :] - centroids[None]) ** 2).sum(-1)
      q = sinkhorn(-sq_dist / temperature, prior)
      centroids = (q.T @ points) / q.sum(0)[:, None]
    cost = float((q * sq_dist).sum() / len(points))
    if cost < best[0]:
      best = (cost, q.argmax(1), centroids)
  return best[1], best[2]


def describe(name: str, labels: np.ndarray, blob: np.ndarray, num_clusters: int) -> str:
  """One line the tests parse: cluster sizes and how each blob spreads over the clusters."""
  count = lambda mask: np.bincount(labels[mask], minlength=num_clusters).tolist()  # noqa: E731
  return (f"{name}: cluster sizes {count(np.ones_like(blob, bool))}; "
          f"big blob per cluster {count(blob == 0)}; small blob per cluster {count(blob == 1)}")


def plot(points, results, boundary_x: float, path: str) -> None:
  """One panel per prior: points coloured by cluster (green / red, as in the paper)."""
  from matplotlib.figure import Figure
  fig = Figure(figsize=(10, 4.4), layout="constrained")
  axes = fig.subplots(1, len(results), sharex=True, sharey=True)
  colours = np.array(["tab:green", "tab:red", "tab:blue", "tab:orange"])
  for ax, (title, labels, centroids) in zip(axes, results):
    ax.scatter(points[:, 0], points[:, 1], s=6, c=colours[labels % len(colours)], alpha=0.6)
    ax.scatter(centroids[:, 0], centroids[:, 1], s=120, c="black", marker="x")
    ax.axvline(boundary_x, color="black", linestyle=":", label="true blob boundary")
    sizes = np.bincount(labels, minlength=len(centroids)).tolist()
    ax.set(title=f"{title}\ncluster sizes {sizes}", xlabel="x1", aspect="equal")
    ax.legend(loc="upper left", fontsize="small")
  axes[0].set_ylabel("x2")
  fig.suptitle("K-means with a cluster prior on 90% / 10% blobs: which split each prior picks")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="docs/figures/toy_prior_clustering.png")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--num_points", type=int, default=1000)
  parser.add_argument("--small_fraction", type=float, default=0.1)
  parser.add_argument("--exponent", type=float, default=None,
                      help="τ of the power-law prior; default: the one matching small_fraction")
  args = parser.parse_args()
  if not 0 < args.small_fraction < 0.5:
    parser.error("--small_fraction must lie in (0, 0.5): the small blob is the smaller one")

  points, blob = make_blobs(args.num_points, args.small_fraction, args.seed)
  exponent = (math.log2((1 - args.small_fraction) / args.small_fraction)
              if args.exponent is None else args.exponent)
  results = []
  for name, prior in (("uniform prior", power_law_prior(2, 0.0)),
                      (f"power-law prior, tau={exponent:.2f}", power_law_prior(2, exponent))):
    labels, centroids = prior_kmeans(points, prior, args.seed)
    print(describe(name, labels, blob, len(prior)) + f"; prior {np.round(prior, 3).tolist()}")
    title = f"{name.replace('tau', 'τ')}: π = {np.round(prior, 2).tolist()}"
    results.append((title, labels, centroids))
  plot(points, results, bayes_boundary_x(args.small_fraction), args.out)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
