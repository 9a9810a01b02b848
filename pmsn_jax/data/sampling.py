"""Long-tailed subsets of balanced datasets, the setting PMSN's power-law prior is meant for.

Two class profiles, both with class 0 the head (n_max examples) and class C-1 the tail
(n_max / IR examples), IR the imbalance ratio:

  * "exponential" (Cao et al. 2019, LDAM; Cui et al. 2019): n_c = floor(n_max * IR^(-c/(C-1))),
    the usual CIFAR-LT / Fashion-MNIST-LT construction. For Fashion-MNIST train (6000 per class)
    and IR = 100 that is [6000, 3596, 2156, 1292, 774, 464, 278, 166, 100, 60] = 14,886 images.
  * "power_law": n_c = floor(n_max * (c+1)^(-a)) with a = ln(IR) / ln(C), a Zipf law like the
    class frequencies of iNaturalist: most classes sit in a long flat tail instead of decaying
    geometrically. For 6000 per class, 10 classes and IR = 100 (a = 2) it is
    [6000, 1500, 666, 375, 240, 166, 122, 93, 74, 60] = 9,296 images.

The test set stays balanced. Floors are computed exactly (exponential) or at 60 significant
digits (power law), because float powers land a hair below exact integers such as
60 = 6000 / 100 and the floor then drops a whole example.

The subset helpers work on any labelled dataset with `labels`, `num_classes`, `class_counts()`
and `subset(indices)`: the in-memory sources.LabelledImages and the file-backed
catalog.ImageFiles.
"""
from __future__ import annotations

import decimal
import fractions
import math
from collections.abc import Sequence
from typing import Protocol, TypeVar

import numpy as np

PROFILES = ("exponential", "power_law")

# Digits for the power-law floors. The float estimate of n_max * (c+1)^(-a) is good to ~1e-16
# relative, so it cannot tell 59.99999999999999 from 60; at 60 digits any value this close to
# an integer is that integer (an exact case such as the tail n_max / IR), see _power_law_counts.
_DIGITS = 60
_SNAP = decimal.Decimal("1e-40")


class LabelledRows(Protocol):
  """What the subset helpers need of a dataset (sources.LabelledImages, catalog.ImageFiles)."""
  labels: np.ndarray  # int [N] in [0, num_classes).
  num_classes: int

  def class_counts(self) -> np.ndarray: ...

  def subset(self, indices: np.ndarray): ...  # The same kind of dataset, rows `indices`.


_Data = TypeVar("_Data", bound=LabelledRows)


def long_tail_counts(max_per_class: int, num_classes: int, imbalance_ratio: float,
                     profile: str = "exponential") -> list[int]:
  """Examples of class c = 0..C-1 for a long tail from max_per_class down to max / IR.

  profile "exponential": n_c = floor(max_per_class * imbalance_ratio ** (-c / (C - 1))).
  profile "power_law": n_c = floor(max_per_class * (c + 1) ** (-a)), a = ln(IR) / ln(C).
  """
  if profile not in PROFILES:
    raise ValueError(f"unknown long-tail profile {profile!r}, expected one of {PROFILES}")
  if not imbalance_ratio >= 1 or math.isinf(imbalance_ratio):
    raise ValueError(f"imbalance_ratio must be finite and >= 1, got {imbalance_ratio}")
  if max_per_class < 0 or num_classes < 1:
    raise ValueError(f"need max_per_class >= 0 and num_classes >= 1, got {max_per_class}, "
                     f"{num_classes}")
  if num_classes == 1:
    return [int(max_per_class)]
  if profile == "power_law":
    return _power_law_counts(int(max_per_class), num_classes,
                             fractions.Fraction(imbalance_ratio))
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


def _power_law_counts(max_per_class: int, num_classes: int,
                      ratio: fractions.Fraction) -> list[int]:
  """floor(max * (c+1)^(-ln IR / ln C)) for c < C, computed at _DIGITS significant digits.

  Unlike the exponential profile there is no integer test of n <= max * (c+1)^(-a) in general
  (the bound is a transcendental power), so the value is computed with a 1e-58 relative error
  and a value within 1e-40 of an integer is taken to be that integer: exact cases (the tail
  max / IR, or max / (c+1)^2 when a = 2) then floor to themselves, and an inexact value would
  have to agree with an integer to 40 digits to be misjudged.
  """
  if max_per_class == 0:
    return [0] * num_classes
  with decimal.localcontext() as ctx:
    ctx.prec = _DIGITS
    ln_ratio = (decimal.Decimal(ratio.numerator).ln()
                - decimal.Decimal(ratio.denominator).ln())
    exponent = ln_ratio / decimal.Decimal(num_classes).ln()  # a
    ln_max = decimal.Decimal(max_per_class).ln()
    counts = []
    for c in range(num_classes):
      value = (ln_max - exponent * decimal.Decimal(c + 1).ln()).exp()
      nearest = value.to_integral_value(decimal.ROUND_HALF_EVEN)
      if abs(value - nearest) <= _SNAP * max(value, decimal.Decimal(1)):
        n = int(nearest)
      else:
        n = int(value.to_integral_value(decimal.ROUND_FLOOR))
      counts.append(min(n, max_per_class))
  return counts


def counts_in_class_order(counts: Sequence[int], class_order: Sequence[int]) -> list[int]:
  """Per-class counts when the long tail runs through classes `class_order` (head first)
  instead of 0, 1, ..., C-1: class class_order[i] gets counts[i]. () keeps the index order.

  Which classes are rare matters: Fashion-MNIST's index order puts sneaker, bag and ankle boot,
  three easy classes, in the tail; an order with shirt, pullover and coat there makes the rare
  classes the ones most confused with a head class (T-shirt), as in fine-grained data.
  """
  if not class_order:
    return list(counts)
  if sorted(class_order) != list(range(len(counts))):
    raise ValueError(f"data.class_order={tuple(class_order)} must list each of the "
                     f"{len(counts)} classes 0..{len(counts) - 1} once, head class first")
  ordered = [0] * len(counts)
  for position, c in enumerate(class_order):
    ordered[c] = counts[position]
  return ordered


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


def long_tail_subset(data: _Data, imbalance_ratio: float, seed: int,
                     max_per_class: int | None = None,
                     profile: str = "exponential", class_order: Sequence[int] = ()) -> _Data:
  """The long-tailed subset of `data` (head: class 0, or class_order[0]), e.g. IR=100
  Fashion-MNIST.

  `data` is any LabelledRows (LabelledImages, ImageFiles); the result is `data.subset(...)`.
  max_per_class defaults to the smallest class count of `data` (6000 for Fashion-MNIST train),
  so every class can supply its share. profile: see long_tail_counts; class_order: see
  counts_in_class_order.
  """
  if max_per_class is None:
    max_per_class = int(data.class_counts().min())
  counts = counts_in_class_order(
      long_tail_counts(max_per_class, data.num_classes, imbalance_ratio, profile), class_order)
  return data.subset(subsample_to_counts(data.labels, counts, seed))
