"""Imbalanced mini-batches over a fixed dataset (Assran et al. 2022, "The hidden uniform cluster
prior in self-supervised learning", the class-imbalanced mini-batch study).

Each global batch is dominated by a few classes, yet each epoch still visits every row exactly
once, so over an epoch the model sees the dataset's own class balance; only the composition of
individual batches is skewed. That isolates the per-batch prior (MSN's uniform regulariser acts
on the batch-mean prediction) from the dataset-level imbalance studied with sampling.py.

Construction of an epoch's order, all stateless TF ops keyed by (seed, epoch):
  1. A class-sorted order: shuffle the rows, then stable-sort them by the rank of their class in
     a shuffled class order. Row i of it gets the sorted key (i + 1/2) / N, so the classes lie
     in random order on [0, 1) as runs whose lengths are proportional to their sizes.
  2. Each row keeps its sorted key with probability `skew`; otherwise its key is uniform on
     [0, 1).
  3. The epoch order is the sort of the rows by key.
Kept keys and random keys are both spread uniformly over [0, 1) (step 1 uses the rows' position
rather than "(class rank + u) / C", which would crowd a big class's kept rows into 1/C of the
range), so any window of the epoch holds about a fraction `skew` of rows from the class whose run
it overlaps and 1 - skew drawn from the whole dataset. A batch inside a run therefore has a share
of about skew + (1 - skew) * n_c / N of its majority class: skew = 0 is a uniformly random
permutation (what pipeline.epoch_permutation gives) and skew = 1 makes batches single-class
except where they straddle two runs.

TensorFlow only (no jax), like pipeline.py, whose epoch ordering this replaces.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

# Seed namespace of the skewed order. pipeline.py keys its epoch shuffle with
# fold_in([seed, -1], epoch) and example augmentations with [seed, position >= 0].
_NAMESPACE = -2


def skewed_epoch_permutation(labels, num_classes: int, seed: int, epoch,
                             skew: float) -> tf.Tensor:
  """Rows of `epoch` in stream order, int64 [N]: a permutation of range(N) whose consecutive
  rows cluster by class, more so as `skew` goes from 0 (uniform shuffle) to 1 (class runs).

  labels: int32/int64 [N] in [0, num_classes) (tensor or array); epoch: int64 scalar (may be
  symbolic, e.g. inside tf.data). The result is a pure function of (labels, seed, epoch, skew).
  """
  if not 0.0 <= skew <= 1.0:
    raise ValueError(f"skew must be in [0, 1], got {skew}")
  if num_classes < 1:
    raise ValueError(f"num_classes must be >= 1, got {num_classes}")
  labels = tf.convert_to_tensor(labels)
  if labels.dtype not in (tf.int32, tf.int64) or labels.shape.rank != 1:
    raise ValueError(f"labels must be int32/int64 [N], got {labels.dtype} {labels.shape}")
  labels = tf.cast(labels, tf.int64)
  static = tf.get_static_value(labels)
  if static is not None:
    if static.size and not 0 <= static.min() <= static.max() < num_classes:
      raise ValueError(f"labels outside [0, {num_classes})")
  else:  # Symbolic labels: checked when the graph runs.
    labels = tf.ensure_shape(labels, [None])
    with tf.control_dependencies([
        tf.debugging.assert_greater_equal(labels, tf.constant(0, tf.int64)),
        tf.debugging.assert_less(labels, tf.constant(num_classes, tf.int64)),
    ]):
      labels = tf.identity(labels)

  key = tf.random.experimental.stateless_fold_in(
      tf.constant([seed, _NAMESPACE], tf.int64), tf.cast(epoch, tf.int64))
  class_key, row_key, keep_key, uniform_key = (
      tf.random.experimental.stateless_fold_in(key, i) for i in range(4))
  num_rows = tf.shape(labels, out_type=tf.int64)[0]

  # 1. Class-sorted order: a random within-class order (the row shuffle survives the stable
  # sort), classes in random order.
  class_order = tf.random.experimental.stateless_shuffle(
      tf.range(num_classes, dtype=tf.int64), class_key)
  class_rank = tf.math.invert_permutation(class_order)
  shuffled = tf.random.experimental.stateless_shuffle(tf.range(num_rows), row_key)
  sorted_rows = tf.gather(
      shuffled, tf.argsort(tf.gather(class_rank, tf.gather(labels, shuffled)), stable=True))
  sorted_key = ((tf.cast(tf.range(num_rows), tf.float64) + 0.5)
                / tf.cast(tf.maximum(num_rows, 1), tf.float64))
  # 2. Keep the sorted key with probability skew, else a uniform one. uniform < 1.0 always
  # holds, so skew = 1 keeps every key; uniform < 0.0 never does.
  shape = tf.reshape(num_rows, [1])
  keep = tf.random.stateless_uniform(shape, keep_key, dtype=tf.float64) < skew
  uniform = tf.random.stateless_uniform(shape, uniform_key, dtype=tf.float64)
  # 3. Sort by key; stable, so ties (which float64 keys make negligible) are still determined.
  return tf.gather(sorted_rows, tf.argsort(tf.where(keep, sorted_key, uniform), stable=True))


def batch_class_skew(labels_in_order: np.ndarray, batch_size: int) -> float:
  """Mean over the full batches of the share of the batch taken by its most common class.

  About 1/C plus sampling noise for random batches of a balanced C-class set (0.16 for C = 10,
  batch 128), 1 for single-class batches. A trailing partial batch is ignored.
  """
  labels = np.asarray(labels_in_order)
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be integer [N], got {labels.dtype} {labels.shape}")
  num_batches = len(labels) // batch_size
  if num_batches == 0:
    raise ValueError(f"{len(labels)} labels hold no full batch of {batch_size}")
  if labels.min() < 0:
    raise ValueError("labels must be non-negative")
  batches = labels[:num_batches * batch_size].reshape(num_batches, batch_size).astype(np.int64)
  num_classes = int(batches.max()) + 1
  # Class counts of every batch at once: batch b's class c lands in bin b * C + c.
  flat = (batches + num_classes * np.arange(num_batches)[:, None]).ravel()
  counts = np.bincount(flat, minlength=num_batches * num_classes)
  counts = counts.reshape(num_batches, num_classes)
  return float(np.mean(counts.max(axis=1) / batch_size))
