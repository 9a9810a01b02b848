"""Long-tailed subsets of balanced datasets, the setting PMSN's power-law prior is meant for.

The literature's exponential profile (Cao et al. 2019, LDAM; Cui et al. 2019) keeps
n_c = floor(n_max * IR^(-c/(C-1))) examples of class c, so class 0 is the head with n_max
examples and class C-1 the tail with n_max / IR. For Fashion-MNIST train (6000 per class) and
IR = 100 that is [6000, 3596, 2156, 1292, 774, 464, 278, 166, 100, 60] = 14,886 images; the test
set stays balanced. The floor is computed exactly (integer arithmetic), because float powers
land a hair below exact integers such as 60 = 6000 / 100.
"""
from __future__ import annotations

import fractions
import math
from collections.abc import Sequence

import numpy as np

from pmsn_jax.data.sources import LabelledImages


def long_tail_counts(max_per_class: int, num_classes: int, imbalance_ratio: float) -> list[int]:
  """n_c = floor(max_per_class * imbalance_ratio ** (-c / (num_classes - 1))), c = 0..C-1."""
  if imbalance_ratio < 1:
    raise ValueError(f"imbalance_ratio must be >= 1, got {imbalance_ratio}")
  if max_per_class < 0 or num_classes < 1:
    raise ValueError(f"need max_per_class >= 0 and num_classes >= 1, got {max_per_class}, "
                     f"{num_classes}")
  if num_classes == 1:
    return [int(max_per_class)]
  k = num_classes - 1
  ratio = fractions.Fraction(imbalance_ratio)  # Exact value of the float.
  limit = fractions.Fraction(max_per_class) ** k

  def fits(n: int, c: int) -> bool:  # n <= max * IR^(-c/k)  <=>  n^k * IR^c <= max^k
    return n ** k * ratio ** c <= limit

  counts = []
  for c in range(num_classes):
    n = math.floor(max_per_class * float(imbalance_ratio) ** (-c / k))
    while n > 0 and not fits(n, c):  # Float estimate is within one of the truth.
      n -= 1
    while fits(n + 1, c):
      n += 1
    counts.append(n)
  return counts


def subsample_to_counts(labels: np.ndarray, counts: Sequence[int], seed: int) -> np.ndarray:
  """Sorted row indices holding counts[c] seeded-random examples of each class c.

  Classes at or beyond len(counts) are dropped. Each class draws from its own generator
  (seed, c), so changing one class's count leaves the other classes' picks unchanged.
  """
  labels = np.asarray(labels)
  picked = []
  for c, n in enumerate(counts):
    rows = np.flatnonzero(labels == c)
    if n > len(rows):
      raise ValueError(f"class {c} has {len(rows)} examples, {n} were asked for")
    rng = np.random.default_rng([seed, c])
    picked.append(rng.choice(rows, size=int(n), replace=False))
  return np.sort(np.concatenate(picked)) if picked else np.zeros([0], np.int64)


def long_tail_subset(data: LabelledImages, imbalance_ratio: float, seed: int,
                     max_per_class: int | None = None) -> LabelledImages:
  """The exponential long-tailed subset of `data` (class 0 = head), e.g. IR=100 Fashion-MNIST.

  max_per_class defaults to the smallest class count of `data` (6000 for Fashion-MNIST train).
  """
  if max_per_class is None:
    max_per_class = int(data.class_counts().min())
  counts = long_tail_counts(max_per_class, data.num_classes, imbalance_ratio)
  return data.subset(subsample_to_counts(data.labels, counts, seed))
