"""Prototype diagnostics: does the model's cluster usage follow the prior? Pure NumPy, no I/O.

PMSN's claim is about cluster sizes, so a run should show them, not only its loss. The train
step returns, per step (losses.pmsn_loss_with_aux, step.make_train_step):
  target_usage      [K] column mass of the Sinkhorn-balanced targets P, / B (sums to 1). With
                    sinkhorn_marginal = "prior" this is close to the prior by construction.
  raw_target_usage  [K] the same before Sinkhorn: the model's own (sharpened) cluster sizes.
  mean_prediction   [K] p̄, the mean anchor prediction the KL regulariser pulls toward the prior.
  assignments       [B] argmax_k P[b, k], the hard prototype of every image.
  labels            [B] class labels (batch["label"], diagnostics only; never used to train).
At log steps train.py turns them into scalars (`summarize`) for the metric writer, as
"proto/<vector>_<statistic>", and appends one JSON object per log step to
WORKDIR/prototypes.jsonl (process 0; every `diagnostics.prototypes_every_steps` steps):

  {"step": int,
   "target_usage_sorted": [K floats], "raw_target_usage_sorted": [K floats],
   "mean_prediction_sorted": [K floats], "prior_sorted": [K floats]}

Every vector is a distribution over the K prototypes (sums to 1, 6 significant digits), sorted
in descending order: rank r (1-based) of a vector is its r-th largest mass, which is what a
rank-frequency (log-log) plot against the sorted prior needs. Sorting forgets which prototype
holds which mass; the KL scalars below also compare in fixed prototype order, which is the
order the loss uses. A resumed run appends to the same file, so a step may appear twice; the
last line for a step wins.

Scalars (natural logs): <vector>_entropy H, <vector>_effective exp(H) (the number of equally
used prototypes with that entropy: K when uniform, 1 when one prototype takes everything),
<vector>_kl_prior KL(vector ‖ prior) in fixed prototype order, <vector>_sorted_kl_prior the
same between the sorted vectors (shape only), prior_effective, and with labels purity / nmi of
the hard assignments against the classes.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

PROTOTYPES_FILE = "prototypes.jsonl"
USAGE_VECTORS = ("target_usage", "raw_target_usage", "mean_prediction")
_DIGITS = 6


def _distribution(p) -> np.ndarray:
  """float64 copy of a non-negative vector, normalised to sum 1."""
  p = np.asarray(p, np.float64).ravel()
  if p.size == 0 or not np.all(np.isfinite(p)) or np.any(p < 0) or p.sum() <= 0:
    raise ValueError(f"expected a non-empty, finite, non-negative vector with positive mass, "
                     f"got {p.size} values summing to {p.sum() if p.size else 0.0}")
  return p / p.sum()


def sorted_desc(p) -> np.ndarray:
  """The distribution p sorted from the most to the least used prototype."""
  return np.sort(_distribution(p))[::-1]


def entropy(p) -> float:
  """H(p) in nats, with 0 log 0 = 0."""
  p = _distribution(p)
  nz = p[p > 0]
  return float(-np.sum(nz * np.log(nz)))


def effective_number(p) -> float:
  """exp(H(p)): how many equally used prototypes would have the same entropy."""
  return float(np.exp(entropy(p)))


def kl_divergence(p, q) -> float:
  """KL(p ‖ q) in nats, element by element (0 log 0 = 0); inf where q = 0 < p."""
  p, q = _distribution(p), _distribution(q)
  if p.shape != q.shape:
    raise ValueError(f"KL needs vectors of one length, got {p.shape} and {q.shape}")
  nz = p > 0
  if np.any(q[nz] == 0):
    return float("inf")
  return float(np.sum(p[nz] * (np.log(p[nz]) - np.log(q[nz]))))


def contingency(assignments, labels) -> np.ndarray:
  """counts[i, j] = images with the i-th distinct assignment and the j-th distinct label."""
  assignments, labels = np.asarray(assignments).ravel(), np.asarray(labels).ravel()
  if assignments.shape != labels.shape or assignments.size == 0:
    raise ValueError(f"need one label per assignment, got {assignments.size} assignments and "
                     f"{labels.size} labels")
  _, rows = np.unique(assignments, return_inverse=True)
  _, cols = np.unique(labels, return_inverse=True)
  counts = np.zeros((rows.max() + 1, cols.max() + 1), np.int64)
  np.add.at(counts, (rows, cols), 1)
  return counts


def purity(assignments, labels) -> float:
  """Fraction of images whose prototype's majority class is their class (1 = pure clusters).

  Rises trivially with the number of used prototypes (one image per prototype gives 1), so
  read it next to NMI and the effective number.
  """
  counts = contingency(assignments, labels)
  return float(counts.max(axis=1).sum() / counts.sum())


def normalized_mutual_info(assignments, labels) -> float:
  """NMI = I(A; Y) / ((H(A) + H(Y)) / 2), natural logs (scikit-learn's default, "arithmetic").

  1 when the assignments and the classes determine each other; 0 when independent. Both
  constant (one cluster, one class) gives 1, as in scikit-learn.
  """
  counts = contingency(assignments, labels).astype(np.float64)
  joint = counts / counts.sum()
  pa, py = joint.sum(axis=1), joint.sum(axis=0)
  h_a, h_y = entropy(pa), entropy(py)
  if h_a + h_y == 0:
    return 1.0
  nz = joint > 0
  mutual = np.sum(joint[nz] * (np.log(joint[nz]) - np.log(np.outer(pa, py)[nz])))
  return float(max(mutual, 0.0) / ((h_a + h_y) / 2))


def usage_scalars(name: str, usage, prior) -> dict[str, float]:
  """Entropy, effective number and KL to the prior (fixed order and sorted) of one vector."""
  return {f"proto/{name}_entropy": entropy(usage),
          f"proto/{name}_effective": effective_number(usage),
          f"proto/{name}_kl_prior": kl_divergence(usage, prior),
          f"proto/{name}_sorted_kl_prior": kl_divergence(sorted_desc(usage),
                                                         sorted_desc(prior))}


def _rounded(p: np.ndarray) -> list[float]:
  return [float(f"{x:.{_DIGITS}g}") for x in p]


def summarize(step: int, aux: Mapping[str, np.ndarray], prior
              ) -> tuple[dict[str, float], dict[str, object]]:
  """-> (scalars for the metric writer, the prototypes.jsonl record) of one step's aux.

  `aux` is the host copy of the train step's aux output; vectors it lacks are skipped, and
  purity / NMI need both "assignments" and "labels".
  """
  scalars = {"proto/prior_effective": effective_number(prior)}
  record: dict[str, object] = {"step": int(step)}
  for name in USAGE_VECTORS:
    if name in aux:
      scalars.update(usage_scalars(name, aux[name], prior))
      record[f"{name}_sorted"] = _rounded(sorted_desc(aux[name]))
  record["prior_sorted"] = _rounded(sorted_desc(prior))
  if "assignments" in aux and "labels" in aux:
    scalars["proto/purity"] = purity(aux["assignments"], aux["labels"])
    scalars["proto/nmi"] = normalized_mutual_info(aux["assignments"], aux["labels"])
  return scalars, record
