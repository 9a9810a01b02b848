"""Tests for the frozen-feature evaluators: k-NN, linear probe, class-wise metrics."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pmsn_jax import sharding
from pmsn_jax.evals import classwise, knn, linear


def _clusters(rng, num_classes, per_class, dim, spread):
  """Gaussian clusters around random unit directions; `spread` sets the overlap."""
  centres = rng.standard_normal((num_classes, dim))
  centres /= np.linalg.norm(centres, axis=1, keepdims=True)
  labels = np.repeat(np.arange(num_classes), per_class)
  feats = centres[labels] + spread * rng.standard_normal((labels.size, dim))
  perm = rng.permutation(labels.size)
  return feats[perm].astype(np.float32), labels[perm]


def _numpy_knn(train, train_labels, test, num_classes, k, temperature):
  """Independent brute-force reference: float64, full argsort, unshifted exp(sim / T)."""
  train = train / np.linalg.norm(train.astype(np.float64), axis=1, keepdims=True)
  test = test / np.linalg.norm(test.astype(np.float64), axis=1, keepdims=True)
  sims = test @ train.T
  preds = []
  for row in sims:
    nbrs = np.argsort(-row, kind="stable")[:k]
    votes = np.zeros(num_classes)
    np.add.at(votes, train_labels[nbrs], np.exp(row[nbrs] / temperature))
    preds.append(np.argmax(votes))
  return np.array(preds)


# --- k-NN ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("k,temperature", [(1, 0.07), (5, 0.07), (20, 0.07), (20, 0.5), (50, 1.0)])
def test_knn_matches_numpy_reference(k, temperature):
  rng = np.random.default_rng(k)
  feats, labels = _clusters(rng, num_classes=6, per_class=60, dim=16, spread=0.35)
  train, train_labels, test = feats[:300], labels[:300], feats[300:]
  got = knn.knn_classify(train, train_labels, test, num_classes=6, k=k, temperature=temperature)
  want = _numpy_knn(train, train_labels, test, 6, k, temperature)
  assert got.dtype == np.int32 and got.shape == (60,)
  np.testing.assert_array_equal(got, want)
  # The clusters overlap, so the comparison is not trivially "always right".
  assert 0.3 < np.mean(want == labels[300:]) < 1.0


def test_knn_perfect_on_separated_clusters():
  rng = np.random.default_rng(0)
  feats, labels = _clusters(rng, num_classes=10, per_class=40, dim=32, spread=0.02)
  preds = knn.knn_classify(feats[:300], labels[:300], feats[300:], num_classes=10)
  np.testing.assert_array_equal(preds, labels[300:])


def test_knn_chunking_invariant():
  rng = np.random.default_rng(1)
  feats, labels = _clusters(rng, num_classes=5, per_class=50, dim=8, spread=0.5)
  args = (feats[:200], labels[:200], feats[200:])  # 50 queries: 7 does not divide it.
  small = knn.knn_classify(*args, num_classes=5, k=10, chunk_size=7)
  large = knn.knn_classify(*args, num_classes=5, k=10, chunk_size=1000)
  np.testing.assert_array_equal(small, large)


def test_knn_k_equals_num_train_and_empty_test():
  rng = np.random.default_rng(2)
  feats, labels = _clusters(rng, num_classes=3, per_class=10, dim=4, spread=0.3)
  preds = knn.knn_classify(feats, labels, feats[:5], num_classes=3, k=30)
  np.testing.assert_array_equal(preds, _numpy_knn(feats, labels, feats[:5], 3, 30, 0.07))
  assert knn.knn_classify(feats, labels, feats[:0], num_classes=3, k=3).shape == (0,)


def test_knn_top_k_is_not_lowered_to_a_full_sort():
  # Guards a 25x CPU slowdown: slicing top_k's output made XLA:CPU sort the whole row.
  bank, labels, queries = jnp.ones((512, 8)), jnp.zeros((512,), jnp.int32), jnp.ones((16, 8))
  hlo = knn._knn_chunk.lower(bank, labels, queries, 0.07, k=5, num_classes=3).compile().as_text()
  assert "sort(" not in hlo


@pytest.mark.parametrize("kwargs,match", [
    (dict(k=0), "k must"),
    (dict(k=31), "k must"),
    (dict(temperature=0.0), "temperature"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(num_classes=2), "train_labels"),
    (dict(test_features=np.ones((4, 5))), "feature dim"),
    (dict(train_labels=np.arange(30) - 1), "train_labels"),
    (dict(train_labels=np.zeros(29, int)), "train_labels"),
    (dict(train_labels=np.zeros(30)), "integer"),
    (dict(train_features=np.ones(30)), "train_features"),
])
@pytest.mark.parametrize("classify", ["single device", "sharded over 2"])
def test_knn_value_errors(kwargs, match, classify):
  call = dict(train_features=np.ones((30, 4)), train_labels=np.arange(30) % 3,
              test_features=np.ones((4, 4)), num_classes=3)
  call.update(kwargs)
  fn = knn.knn_classify if classify == "single device" else functools.partial(
      knn.knn_classify_sharded, mesh=sharding.make_mesh((("data", -1),), jax.devices()[:2]))
  with pytest.raises(ValueError, match=match):
    fn(**call)


# --- linear probe -------------------------------------------------------------------------------

def test_linear_probe_separable_and_deterministic():
  rng = np.random.default_rng(3)
  feats, labels = _clusters(rng, num_classes=8, per_class=250, dim=32, spread=0.15)
  feats = 5.0 * feats + 2.0  # Scale and offset: the LayerNorm must absorb both.
  train, train_labels, test, test_labels = feats[:1500], labels[:1500], feats[1500:], labels[1500:]
  kwargs = dict(num_classes=8, epochs=10, batch_size=64, seed=0)
  preds = linear.linear_probe(train, train_labels, test, **kwargs)
  assert preds.dtype == np.int32 and preds.shape == (500,)
  assert np.mean(preds == test_labels) > 0.95
  np.testing.assert_array_equal(preds, linear.linear_probe(train, train_labels, test, **kwargs))


def test_linear_probe_partial_batch_and_tiny_set():
  # 10 examples with batch 4: three steps per epoch, the last one padded and masked.
  feats = np.eye(5, dtype=np.float32).repeat(2, axis=0) * 4.0
  labels = np.arange(5).repeat(2)
  preds = linear.linear_probe(feats, labels, feats, num_classes=5, epochs=30, batch_size=4)
  np.testing.assert_array_equal(preds, labels)


def test_linear_probe_value_errors():
  x, y = np.ones((10, 4)), np.arange(10) % 2
  with pytest.raises(ValueError, match="train_labels"):
    linear.linear_probe(x, y + 5, x, num_classes=2)
  with pytest.raises(ValueError, match="feature dim"):
    linear.linear_probe(x, y, np.ones((3, 5)), num_classes=2)
  with pytest.raises(ValueError, match="epochs"):
    linear.linear_probe(x, y, x, num_classes=2, epochs=0)
  with pytest.raises(ValueError, match="batch_size"):
    linear.linear_probe(x, y, x, num_classes=2, batch_size=0)


# --- class-wise metrics -------------------------------------------------------------------------

PREDS = [0, 1, 1, 2, 2, 2, 0]
LABELS = [0, 1, 2, 2, 2, 0, 0]


def test_top1_per_class_balanced_by_hand():
  assert classwise.top1(PREDS, LABELS) == pytest.approx(5 / 7)
  # class 0: {0, 5, 6} -> 2 right; class 1: {1} -> 1; class 2: {2, 3, 4} -> 2; class 3: absent.
  assert classwise.per_class_accuracy(PREDS, LABELS, 4) == pytest.approx([2 / 3, 1.0, 2 / 3, None])
  assert classwise.balanced_accuracy(PREDS, LABELS, 4) == pytest.approx(7 / 9)


def test_balanced_equals_top1_on_balanced_set():
  labels = np.repeat(np.arange(4), 5)
  preds = np.where(np.arange(20) % 3 == 0, (labels + 1) % 4, labels)
  per_class = classwise.per_class_accuracy(preds, labels, 4)
  assert classwise.balanced_accuracy(preds, labels, 4) == pytest.approx(np.mean(per_class))
  assert np.mean(per_class) == pytest.approx(classwise.top1(preds, labels))


def test_shot_groups_power_law_counts():
  counts = [6000, 3596, 2156, 1292, 774, 464, 278, 166, 100, 60]
  members = classwise.shot_group_members(counts)
  assert members == {"many": list(range(8)), "medium": [8, 9], "few": []}
  accs = [0.9] * 8 + [0.5, None]  # Class 9 has no test example: left out of "medium".
  assert classwise.shot_groups(accs, counts) == pytest.approx(
      {"many": 0.9, "medium": 0.5, "few": None})


def test_shot_group_boundaries():
  counts = [101, 100, 20, 19, 0]
  assert classwise.shot_group_members(counts) == {"many": [0], "medium": [1, 2], "few": [3, 4]}
  groups = classwise.shot_groups([1.0, 0.5, 0.0, 0.25, 0.75], counts)
  assert groups == pytest.approx({"many": 1.0, "medium": 0.25, "few": 0.5})


def test_classwise_value_errors():
  with pytest.raises(ValueError, match="equal length"):
    classwise.top1([0, 1], [0])
  with pytest.raises(ValueError, match="non-empty"):
    classwise.top1([], [])
  with pytest.raises(ValueError, match="labels"):
    classwise.per_class_accuracy([0, 1], [0, 4], 3)
  with pytest.raises(ValueError, match="num_classes"):
    classwise.per_class_accuracy([0], [0], 0)
  with pytest.raises(ValueError, match="train_counts"):
    classwise.shot_groups([1.0, 1.0], [10, 20, 30])
  with pytest.raises(ValueError, match="non-negative"):
    classwise.shot_group_members([5, -1])
