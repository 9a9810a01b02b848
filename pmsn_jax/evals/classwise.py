"""Accuracy metrics on predicted labels: overall, per class, balanced, and long-tail shot groups.

The long-tail protocol reports top-1 on a class-balanced test set plus
the mean accuracy of the "many" (> 100 pretraining images), "medium" (20-100 inclusive) and "few"
(< 20) shot class groups, as in Liu et al. (2019, OLTR) and the PMSN paper. Everything here is
plain NumPy on label vectors; it is the bottom layer the k-NN and linear probes import.
"""
from __future__ import annotations

import numpy as np

SHOT_GROUPS = ("many", "medium", "few")


def check_labels(labels, num_classes, name="labels"):
  """Returns `labels` as a 1-D int32 array, or raises ValueError naming the argument.

  Labels must be integers in [0, num_classes): an out-of-range label would otherwise be silently
  clipped or dropped by a jitted gather / scatter.
  """
  if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"{name} must be 1-D, got shape {labels.shape}")
  if labels.size and not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{name} must have an integer dtype, got {labels.dtype}")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"{name} must lie in [0, {num_classes}), got range "
                     f"[{labels.min()}, {labels.max()}]")
  return labels.astype(np.int32)


def _check_pair(predictions, labels, num_classes=None):
  predictions, labels = np.asarray(predictions), np.asarray(labels)
  if predictions.ndim != 1 or predictions.shape != labels.shape:
    raise ValueError(f"predictions and labels must be 1-D of equal length, got shapes "
                     f"{predictions.shape} and {labels.shape}")
  if predictions.size == 0:
    raise ValueError("predictions and labels must be non-empty")
  if num_classes is not None:
    labels = check_labels(labels, num_classes, "labels")
  return predictions, labels


def top1(predictions, labels) -> float:
  """Fraction of examples whose predicted label equals the true label."""
  predictions, labels = _check_pair(predictions, labels)
  return float(np.mean(predictions == labels))


def per_class_accuracy(predictions, labels, num_classes) -> list[float | None]:
  """Accuracy (recall) of each class over its test examples; None for a class with none.

  None rather than 0 or NaN so that an absent class is neither counted as a failure nor poisons
  a mean: callers average over the classes that exist.
  """
  predictions, labels = _check_pair(predictions, labels, num_classes)
  totals = np.bincount(labels, minlength=num_classes)
  correct = np.bincount(labels, weights=(predictions == labels), minlength=num_classes)
  return [float(c / t) if t else None for c, t in zip(correct, totals)]


def balanced_accuracy(predictions, labels, num_classes) -> float:
  """Mean of the per-class accuracies over the classes present in `labels`.

  On a class-balanced test set this equals top1; on an imbalanced one it is the number the
  long-tail literature reports, since every class weighs the same.
  """
  accs = [a for a in per_class_accuracy(predictions, labels, num_classes) if a is not None]
  return float(np.mean(accs))


def shot_group_members(train_counts, many_threshold=100, few_threshold=20) -> dict[str, list[int]]:
  """Class ids in each shot group by their number of pretraining (train) images.

  many: count > many_threshold; medium: few_threshold <= count <= many_threshold;
  few: count < few_threshold. Defaults are the OLTR / iNat18 convention (> 100, 20-100, < 20).
  """
  counts = np.asarray(train_counts)
  if counts.ndim != 1 or counts.size == 0:
    raise ValueError(f"train_counts must be a non-empty 1-D array, got shape {counts.shape}")
  if np.any(counts < 0):
    raise ValueError("train_counts must be non-negative")
  if few_threshold > many_threshold:
    raise ValueError(f"few_threshold ({few_threshold}) must be <= many_threshold "
                     f"({many_threshold})")
  return {
      "many": np.flatnonzero(counts > many_threshold).tolist(),
      "medium": np.flatnonzero((counts >= few_threshold) & (counts <= many_threshold)).tolist(),
      "few": np.flatnonzero(counts < few_threshold).tolist(),
  }


def shot_groups(per_class_acc, train_counts, many_threshold=100, few_threshold=20
                ) -> dict[str, float | None]:
  """Mean per-class accuracy of the many / medium / few shot groups.

  Args:
    per_class_acc: output of `per_class_accuracy` (None entries are classes with no test
      example; they are left out of their group's mean).
    train_counts: [num_classes] pretraining images per class.
    many_threshold, few_threshold: group boundaries, see `shot_group_members`.

  Returns:
    {"many": float | None, "medium": ..., "few": ...}; None when a group has no class with a
    test example (e.g. no few-shot class in a mildly imbalanced subset).
  """
  if len(per_class_acc) != len(train_counts):
    raise ValueError(f"per_class_acc has {len(per_class_acc)} classes but train_counts has "
                     f"{len(train_counts)}")
  members = shot_group_members(train_counts, many_threshold, few_threshold)
  result = {}
  for group in SHOT_GROUPS:
    accs = [per_class_acc[c] for c in members[group] if per_class_acc[c] is not None]
    result[group] = float(np.mean(accs)) if accs else None
  return result
