"""Long-tail class profiles (sampling.py) and the imbalanced mini-batch order (imbalanced.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

from pmsn_jax.data import imbalanced, sampling
from pmsn_jax.data.sources import LabelledImages


def _balanced_labels(num_classes: int, per_class: int) -> np.ndarray:
  return np.repeat(np.arange(num_classes, dtype=np.int32), per_class)


def _order(labels, num_classes, skew, seed=0, epoch=0) -> np.ndarray:
  return imbalanced.skewed_epoch_permutation(
      labels, num_classes, seed, tf.constant(epoch, tf.int64), skew).numpy()


# --- long-tail counts --------------------------------------------------------------------------

def test_exponential_counts_unchanged():
  expected = [6000, 3596, 2156, 1292, 774, 464, 278, 166, 100, 60]
  assert sampling.long_tail_counts(6000, 10, 100) == expected
  assert sampling.long_tail_counts(6000, 10, 100, profile="exponential") == expected


def test_power_law_counts_hand_checked():
  # IR = C: a = 1, n_c = floor(n_max / (c+1)); 120/3 = 40 must not drop to 39.
  assert sampling.long_tail_counts(120, 4, 4, "power_law") == [120, 60, 40, 30]
  # IR = C^2: a = 2, n_c = floor(n_max / (c+1)^2).
  assert sampling.long_tail_counts(144, 4, 16, "power_law") == [144, 36, 16, 9]
  assert sampling.long_tail_counts(6000, 10, 100, "power_law") == [
      6000, 1500, 666, 375, 240, 166, 122, 93, 74, 60]
  # a = 1/2: floor(100 / sqrt(c+1)), exact at c+1 = 4 and 9.
  assert sampling.long_tail_counts(100, 9, 3, "power_law") == [
      100, 70, 57, 50, 44, 40, 37, 35, 33]
  assert sampling.long_tail_counts(100, 3, 1.0, "power_law") == [100, 100, 100]
  assert sampling.long_tail_counts(7, 1, 10, "power_law") == [7]
  assert sampling.long_tail_counts(0, 3, 10, "power_law") == [0, 0, 0]


@pytest.mark.parametrize("max_per_class,num_classes,ratio", [
    (6000, 10, 100), (6000, 10, 50), (5000, 7, 10), (600, 100, 3), (4096, 13, 64.0),
    (1000, 1000, 1000), (6000, 10, 2.5)])
def test_power_law_counts_shape(max_per_class, num_classes, ratio):
  counts = sampling.long_tail_counts(max_per_class, num_classes, ratio, "power_law")
  assert len(counts) == num_classes and all(isinstance(n, int) for n in counts)
  assert counts[0] == max_per_class
  assert counts[-1] == math.floor(max_per_class / ratio)  # Exact even where float lands below.
  assert all(a >= b for a, b in zip(counts, counts[1:]))
  a = math.log(ratio) / math.log(num_classes)
  for c, n in enumerate(counts):  # Within float error of the formula everywhere else.
    assert abs(n - max_per_class * (c + 1) ** -a) <= 1 + 1e-9


def test_power_law_is_flatter_in_the_tail_than_exponential():
  power = sampling.long_tail_counts(6000, 10, 100, "power_law")
  exponential = sampling.long_tail_counts(6000, 10, 100)
  assert power[1] < exponential[1] and power[-2] < exponential[-2]  # Steep head, then flat.
  assert power[-2] / power[-1] < exponential[-2] / exponential[-1]


def test_long_tail_counts_rejects_bad_arguments():
  with pytest.raises(ValueError, match="exponential.*power_law"):
    sampling.long_tail_counts(6000, 10, 100, profile="zipf")
  for profile in sampling.PROFILES:
    with pytest.raises(ValueError):
      sampling.long_tail_counts(6000, 10, 0.5, profile)
    with pytest.raises(ValueError):
      sampling.long_tail_counts(6000, 10, float("nan"), profile)
    with pytest.raises(ValueError):
      sampling.long_tail_counts(-1, 10, 10, profile)


@pytest.mark.parametrize("profile", sampling.PROFILES)
def test_long_tail_subset_hits_counts(profile):
  labels = _balanced_labels(10, 120)[np.random.default_rng(0).permutation(1200)]
  images = np.arange(1200, dtype=np.uint8).reshape(1200, 1, 1, 1)
  data = LabelledImages(images, labels, 10)
  subset = sampling.long_tail_subset(data, 20, seed=3, profile=profile)
  expected = sampling.long_tail_counts(120, 10, 20, profile)
  assert isinstance(subset, LabelledImages)
  assert list(subset.class_counts()) == expected
  rows = sampling.subsample_to_counts(labels, expected, seed=3)
  assert np.array_equal(subset.images, images[rows])
  if profile == "power_law":
    assert expected != sampling.long_tail_counts(120, 10, 20)


def test_class_order_moves_the_tail_to_other_classes():
  counts = sampling.long_tail_counts(120, 4, 8)  # [120, 60, 30, 15]
  assert sampling.counts_in_class_order(counts, ()) == counts
  assert sampling.counts_in_class_order(counts, (2, 0, 3, 1)) == [60, 15, 120, 30]
  labels = _balanced_labels(4, 120)
  data = LabelledImages(np.zeros((480, 1, 1, 1), np.uint8), labels, 4)
  subset = sampling.long_tail_subset(data, 8, seed=0, class_order=(2, 0, 3, 1))
  assert list(subset.class_counts()) == [60, 15, 120, 30]
  for bad in ((0, 1, 2), (0, 1, 2, 2), (0, 1, 2, 4)):
    with pytest.raises(ValueError, match=r"data\.class_order=.* each of the 4 classes"):
      sampling.counts_in_class_order(counts, bad)


def test_long_tail_subset_duck_types():
  class Rows:  # Not a LabelledImages: only the LabelledRows protocol.
    def __init__(self, labels):
      self.labels, self.num_classes = labels, 3

    def class_counts(self):
      return np.bincount(self.labels, minlength=3)

    def subset(self, indices):
      return Rows(self.labels[indices])

  data = Rows(_balanced_labels(3, 40))
  subset = sampling.long_tail_subset(data, 4, seed=0, profile="power_law")
  assert list(subset.class_counts()) == [40, 16, 10]  # 40 * 2^(-ln 4 / ln 3) = 16.7; 40 / 4.


# --- skewed epoch order ------------------------------------------------------------------------

@pytest.mark.parametrize("num_rows,num_classes", [(1, 1), (7, 3), (100, 10), (1000, 7)])
@pytest.mark.parametrize("skew", [0.0, 0.3, 0.9, 1.0])
def test_skewed_order_is_permutation(num_rows, num_classes, skew):
  labels = np.random.default_rng(num_rows).integers(0, num_classes, num_rows).astype(np.int64)
  order = _order(labels, num_classes, skew, seed=5, epoch=2)
  assert order.dtype == np.int64
  assert np.array_equal(np.sort(order), np.arange(num_rows))
  # An epoch has the dataset's class balance.
  assert np.array_equal(np.bincount(labels[order], minlength=num_classes),
                        np.bincount(labels, minlength=num_classes))


def test_skewed_order_is_a_function_of_seed_and_epoch():
  labels = _balanced_labels(10, 60)
  first = _order(labels, 10, 0.7, seed=1, epoch=3)
  assert np.array_equal(first, _order(labels, 10, 0.7, seed=1, epoch=3))
  assert not np.array_equal(first, _order(labels, 10, 0.7, seed=1, epoch=4))
  assert not np.array_equal(first, _order(labels, 10, 0.7, seed=2, epoch=3))
  # The same inside a tf.data graph with a symbolic epoch, as pipeline.py would call it.
  ds = tf.data.Dataset.range(3, 5).map(
      lambda e: imbalanced.skewed_epoch_permutation(labels, 10, 1, e, 0.7))
  graph = [x.numpy() for x in ds]
  assert np.array_equal(graph[0], first)
  assert np.array_equal(graph[1], _order(labels, 10, 0.7, seed=1, epoch=4))


def test_skewed_order_differs_from_pipeline_shuffle():
  # skew = 0 is a uniform shuffle too, but under its own seed namespace.
  from pmsn_jax.data import pipeline
  labels = _balanced_labels(10, 60)
  plain = pipeline.epoch_permutation(600, 1, tf.constant(0, tf.int64)).numpy()
  assert not np.array_equal(_order(labels, 10, 0.0, seed=1, epoch=0), plain)


def test_batch_class_skew_grows_with_skew():
  labels = _balanced_labels(10, 600)
  measured = {skew: imbalanced.batch_class_skew(labels[_order(labels, 10, skew)], 128)
              for skew in (0.0, 0.5, 0.9, 1.0)}
  # Random batches of 128 from 10 balanced classes: the top class holds ~19 rows.
  assert 0.1 < measured[0.0] < 0.2
  assert measured[0.5] > 0.4
  assert measured[0.9] > 0.8
  assert measured[1.0] > 0.9  # Single-class runs; only batches across two runs are mixed.
  assert measured[0.0] < measured[0.5] < measured[0.9] < measured[1.0]


def test_skewed_order_on_a_long_tailed_set():
  # Run lengths follow class sizes, so the head does not take over batches of the tail's run.
  labels = np.repeat(np.arange(10, dtype=np.int32), sampling.long_tail_counts(600, 10, 10))
  uniform = imbalanced.batch_class_skew(labels[_order(labels, 10, 0.0)], 64)
  skewed = imbalanced.batch_class_skew(labels[_order(labels, 10, 0.9)], 64)
  assert skewed > uniform + 0.4


def test_batch_class_skew_values():
  assert imbalanced.batch_class_skew(np.array([0, 0, 1, 1, 2, 2, 2]), 2) == 1.0  # Tail dropped.
  assert imbalanced.batch_class_skew(np.array([0, 1, 2, 3, 0, 0, 0, 1]), 4) == 0.5
  assert imbalanced.batch_class_skew(np.array([3, 3, 3, 1]), 4) == 0.75
  with pytest.raises(ValueError):
    imbalanced.batch_class_skew(np.array([0, 1]), 4)
  with pytest.raises(ValueError):
    imbalanced.batch_class_skew(np.array([0, 1]), 0)


def test_skewed_order_validates():
  labels = _balanced_labels(3, 4)
  with pytest.raises(ValueError, match="skew"):
    _order(labels, 3, 1.5)
  with pytest.raises(ValueError, match="skew"):
    _order(labels, 3, -0.1)
  with pytest.raises(ValueError, match="outside"):
    _order(labels, 2, 0.5)
  with pytest.raises(ValueError, match="outside"):
    _order(labels - 1, 3, 0.5)
  with pytest.raises(ValueError, match="int32/int64"):
    _order(labels.astype(np.float32), 3, 0.5)
