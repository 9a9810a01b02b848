"""k-NN with the bank sharded over devices (knn.knn_classify_sharded): exactly knn_classify.

Runs on the 8 fake CPU devices of conftest.py, with meshes over 8 and 2 of them (and one with
data x fsdp x tensor axes), banks whose size is not a multiple of the shard count, exact ties
across shards, and a check of the compiled program's collectives.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from pmsn_jax import sharding
from pmsn_jax.evals import knn


def _mesh(n, axes=(("data", -1),)):
  return sharding.make_mesh(axes, devices=jax.devices()[:n])


def _brute_force_neighbors(train, test, k):
  """Independent NumPy reference: float64 cosine similarity, ranked by (similarity desc,
  index asc) with an explicit lexicographic sort, not by any top-k routine."""
  train = train / np.linalg.norm(train.astype(np.float64), axis=1, keepdims=True)
  test = test / np.linalg.norm(test.astype(np.float64), axis=1, keepdims=True)
  sims = test @ train.T
  idx = np.arange(train.shape[0])
  order = np.stack([np.lexsort((idx, -row))[:k] for row in sims])
  return np.take_along_axis(sims, order, axis=1), order


@pytest.mark.parametrize("devices,mesh_axes,num_train,k,chunk", [
    (8, (("data", -1),), 1003, 20, 32),                            # 1003 = 125 x 8 + 3
    (2, (("data", -1),), 301, 7, 50),
    (8, (("data", 2), ("fsdp", 2), ("tensor", 2)), 203, 10, 64),  # bank over data x fsdp only
    (8, (("data", -1),), 13, 13, 5),                               # k = N > rows per shard (2)
])
def test_matches_knn_classify(devices, mesh_axes, num_train, k, chunk):
  rng = np.random.default_rng(num_train)
  train = rng.standard_normal((num_train, 16)).astype(np.float32)
  labels = rng.integers(0, 7, num_train)
  test = rng.standard_normal((77, 16)).astype(np.float32)
  mesh = _mesh(devices, mesh_axes)
  preds, sims, idx = knn.knn_neighbors_sharded(train, labels, test, mesh=mesh, num_classes=7,
                                               k=k, chunk_size=chunk)
  np.testing.assert_array_equal(
      preds, knn.knn_classify(train, labels, test, num_classes=7, k=k, chunk_size=chunk))
  np.testing.assert_array_equal(
      preds, knn.knn_classify_sharded(train, labels, test, mesh=mesh, num_classes=7, k=k,
                                      chunk_size=chunk))
  want_sims, want_idx = _brute_force_neighbors(train, test, k)
  np.testing.assert_array_equal(idx, want_idx)
  np.testing.assert_allclose(sims, want_sims, atol=1e-5)
  # Bitwise the similarities knn_classify ranks (its expression, on one device, whole bank).
  one = jax.devices()[0]
  bank = knn._l2_normalize(jax.device_put(train, one))
  single = jnp.matmul(knn._l2_normalize(jax.device_put(test, one)), bank.T,
                      precision=jax.lax.Precision.HIGHEST)
  np.testing.assert_array_equal(sims, np.asarray(jax.lax.top_k(single, k)[0]))
  assert preds.dtype == np.int32 and sims.shape == idx.shape == (77, k)


@pytest.mark.parametrize("devices", [8, 2])
def test_exact_ties_across_shards_follow_lower_index(devices):
  # Bank rows are +-2 x a unit basis vector: they normalise exactly to +-e_j, so a query's
  # similarity to every row of one direction is the same float (q_hat[j]) whatever the
  # summation order; with 8 directions over 45 rows every tie group spans several shards.
  rng = np.random.default_rng(devices)
  dim, num_train, k = 4, 45, 7
  direction = rng.integers(0, 2 * dim, num_train)
  train = np.zeros((num_train, dim), np.float32)
  train[np.arange(num_train), direction % dim] = np.where(direction < dim, 2.0, -2.0)
  labels = rng.integers(0, 5, num_train)
  test = rng.standard_normal((40, dim)).astype(np.float32)
  mesh = _mesh(devices)
  preds, sims, idx = knn.knn_neighbors_sharded(train, labels, test, mesh=mesh, num_classes=5,
                                               k=k, chunk_size=16)
  want_sims, want_idx = _brute_force_neighbors(train, test, k)
  # The test must exercise the rule: a tie group cut by the k-th place, split over shards.
  full_sims, full_idx = _brute_force_neighbors(train, test, num_train)
  rows_per_shard = -(-num_train // devices)
  cut = [q for q in range(len(test)) if full_sims[q, k - 1] == full_sims[q, k]
         and full_idx[q, k - 1] // rows_per_shard != full_idx[q, k] // rows_per_shard]
  assert len(cut) > 5
  np.testing.assert_array_equal(idx, want_idx)
  np.testing.assert_allclose(sims, want_sims, atol=1e-6)
  np.testing.assert_array_equal(
      preds, knn.knn_classify(train, labels, test, num_classes=5, k=k, chunk_size=16))


def test_collectives_move_only_candidates():
  chunk, num_train, k, shards = 16, 4001, 5, 8
  mesh = _mesh(shards)
  rng = np.random.default_rng(0)
  bank, bank_labels, n = knn.shard_bank(rng.standard_normal((num_train, 8)).astype(np.float32),
                                        rng.integers(0, 3, num_train).astype(np.int32), mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  queries = jax.device_put(np.ones((chunk, 8), np.float32), replicated)
  fn = knn._sharded_chunk_fn(mesh, ("data",), k, 3, n)
  hlo = fn.lower(bank, bank_labels, queries,
                 jax.device_put(np.float32(0.07), replicated)).compile().as_text()
  collectives = re.findall(
      r"= (\w+)\[([\d,]*)\][^ ]* (all-gather|all-reduce|all-to-all|collective-permute|"
      r"reduce-scatter)(?:-start)?\(", hlo)
  assert collectives, hlo
  for _, dims, op in collectives:
    assert op == "all-gather"
    assert tuple(int(d) for d in dims.split(",")) == (chunk, k * shards)
  assert "sort(" not in hlo  # both top_ks stay XLA:CPU's TopK, no full sort of the block


def test_empty_queries():
  preds, sims, idx = knn.knn_neighbors_sharded(np.ones((9, 4)), np.arange(9) % 3,
                                               np.ones((0, 4)), mesh=_mesh(8), num_classes=3,
                                               k=4)
  assert preds.shape == (0,) and sims.shape == idx.shape == (0, 4)


def test_a_mesh_without_batch_axes_is_refused():
  # The value errors both k-NNs share: tests/test_evals.py, test_knn_value_errors.
  with pytest.raises(ValueError, match="batch axes"):
    knn.knn_classify_sharded(np.ones((30, 4)), np.arange(30) % 3, np.ones((4, 4)), num_classes=3,
                             mesh=Mesh(np.asarray(jax.devices()[:2]), ("tensor",)))
