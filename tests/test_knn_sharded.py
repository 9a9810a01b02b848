"""k-NN with the bank sharded over devices (knn.knn_sharded and the knn_classify_sharded wrapper
over a numpy bank): exactly knn_classify / a brute-force ranking by (similarity desc, key asc).

Runs on the 8 fake CPU devices of conftest.py, with meshes over 8 and 2 of them (and one with
data x fsdp x tensor axes), banks whose size is not a multiple of the shard count, row layouts
that interleave keys across shards, excluded rows and sub-banks, exact ties across shards, and a
check of the compiled program's collectives.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
  bank = knn.l2_normalize(jax.device_put(train, one))
  single = jnp.matmul(knn.l2_normalize(jax.device_put(test, one)), bank.T,
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


def _put(x, mesh):
  """A host array as the row-sharded global array the evaluation suite hands to knn_sharded."""
  return jax.device_put(x, sharding.batch_sharding(mesh))


def _tie_bank(rng, num_rows, dim):
  """Rows +-2 x a unit basis vector, which normalise exactly to +-e_j: every row of one direction
  has bitwise the same similarity to a query whatever the summation order (exact ties), plus
  ~30% Gaussian rows that do not tie."""
  direction = rng.integers(0, 2 * dim, num_rows)
  feats = np.zeros((num_rows, dim), np.float32)
  feats[np.arange(num_rows), direction % dim] = np.where(direction < dim, 2.0, -2.0)
  gaussian = rng.random(num_rows) < 0.3
  feats[gaussian] = rng.standard_normal((gaussian.sum(), dim))
  return feats


@pytest.mark.parametrize("mesh_axes", [(("data", -1),), (("data", 2), ("fsdp", 2), ("tensor", 2))])
def test_knn_sharded_interleaved_layout_excluded_rows_and_ties(mesh_axes):
  mesh = _mesh(8, mesh_axes)
  shards = sharding.batch_shards(mesh)
  rng = np.random.default_rng(shards)
  dim, rows_per_shard, k, num_classes = 4, 12, 9, 5
  num_rows = shards * rows_per_shard
  feats = _tie_bank(rng, num_rows, dim)                   # Indexed by key (dataset row).
  labels = rng.integers(0, num_classes, num_rows).astype(np.int32)
  queries = rng.standard_normal((40, dim)).astype(np.float32)
  excluded = rng.random(num_rows) < 0.25                  # By key.
  # Global row p = s * rows_per_shard + i (shard s, local row i) holds key s + i * shards.
  shard, local = np.divmod(np.arange(num_rows), rows_per_shard)
  key_at = shard + local * shards
  bank_keys = np.where(excluded[key_at], -1, key_at).astype(np.int32)
  bank, bank_labels = feats[key_at], labels[key_at]
  # Excluded rows copy queries (similarity 1) and have out-of-range labels: chosen, they'd show.
  out = bank_keys < 0
  bank[out] = queries[rng.integers(0, len(queries), out.sum())]
  bank_labels[out] = num_classes + 3
  preds, sims, keys = knn.knn_sharded(_put(bank, mesh), _put(bank_labels, mesh),
                                      _put(bank_keys, mesh), queries, mesh=mesh,
                                      num_classes=num_classes, k=k, chunk_size=16)
  included = np.flatnonzero(~excluded)                    # The bank, in key order.
  want_sims, want_idx = _brute_force_neighbors(feats[included], queries, k)
  np.testing.assert_array_equal(keys, included[want_idx])
  np.testing.assert_allclose(sims, want_sims, atol=1e-6)
  np.testing.assert_array_equal(preds, knn.knn_classify(feats[included], labels[included], queries,
                                                        num_classes=num_classes, k=k))
  assert preds.dtype == keys.dtype == np.int32 and sims.dtype == np.float32
  # The test must exercise the rule: a tie group cut by the k-th place, split over shards.
  full_sims, full_idx = _brute_force_neighbors(feats[included], queries, len(included))
  shard_of = included[full_idx] % shards
  cut = [q for q in range(len(queries)) if full_sims[q, k - 1] == full_sims[q, k]
         and shard_of[q, k - 1] != shard_of[q, k]]
  assert len(cut) > 5


def test_sub_bank_equals_knn_classify_on_its_rows():
  mesh = _mesh(8)
  rng = np.random.default_rng(11)
  rows_per_shard, dim, k = 25, 16, 10
  num_rows = 8 * rows_per_shard
  feats = rng.standard_normal((num_rows, dim)).astype(np.float32)
  labels = rng.integers(0, 7, num_rows).astype(np.int32)
  queries = rng.standard_normal((37, dim)).astype(np.float32)
  # Block layout in reverse shard order: shard s holds the keys of block 7 - s.
  shard, local = np.divmod(np.arange(num_rows), rows_per_shard)
  key_at = (7 - shard) * rows_per_shard + local
  sub = np.zeros(num_rows, bool)
  sub[rng.permutation(num_rows)[:num_rows // 2]] = True   # E.g. the long-tailed rows.
  put = lambda x: _put(x, mesh)
  preds, _, keys = knn.knn_sharded(put(feats[key_at]), put(labels[key_at]),
                                   put(np.where(sub[key_at], key_at, -1).astype(np.int32)),
                                   queries, mesh=mesh, num_classes=7, k=k, chunk_size=16)
  rows = np.flatnonzero(sub)
  np.testing.assert_array_equal(
      preds, knn.knn_classify(feats[rows], labels[rows], queries, num_classes=7, k=k))
  np.testing.assert_array_equal(keys, rows[_brute_force_neighbors(feats[rows], queries, k)[1]])


@pytest.mark.parametrize("change,match", [
    (dict(k=7), r"k must be in \[1, 6\]"),                  # 6 rows have key >= 0.
    (dict(bank_keys=[9, 8, -1, -1, 1, 2, -1, -1, -1, 3, 4, -1, -1, -1, 5, -1]), "strictly"),
    (dict(bank_labels=[0, 3] + [0] * 14), "bank_labels"),    # Row 1 has key 0 and label 3.
    (dict(replicate="bank_keys"), "sharding"),
    (dict(bank=np.full((16, 2), np.nan)), "NaN"),
])
def test_knn_sharded_value_errors(change, match):
  mesh = _mesh(8)
  call = dict(bank=np.ones((16, 2)), bank_labels=np.zeros(16),
              bank_keys=[-1, 0, -1, -1, 1, 2, -1, -1, -1, 3, 4, -1, -1, -1, 5, -1],
              queries=np.ones((3, 2), np.float32), k=6)
  call.update(change)
  replicate = call.pop("replicate", None)
  for name, dtype in (("bank", np.float32), ("bank_labels", np.int32), ("bank_keys", np.int32)):
    call[name] = (jax.device_put(np.asarray(call[name], dtype), sharding.replicated(mesh))
                  if name == replicate else _put(np.asarray(call[name], dtype), mesh))
  with pytest.raises(ValueError, match=match):
    knn.knn_sharded(mesh=mesh, num_classes=3, **call)


def test_collectives_move_only_candidates():
  chunk, rows, k, shards = 16, 4000, 5, 8
  mesh = _mesh(shards)
  rows_of = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype,
                                                      sharding=sharding.batch_sharding(mesh))
  replicated = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype,
                                                         sharding=sharding.replicated(mesh))
  hlo = knn._sharded_chunk_fn(mesh, k, 3).lower(
      rows_of((rows, 8), jnp.float32), rows_of((rows,), jnp.int32), rows_of((rows,), jnp.int32),
      replicated((chunk, 8), jnp.float32), replicated((), jnp.float32)).compile().as_text()
  candidates = (chunk, k * shards)
  collectives = re.findall(
      r"= (\w+)\[([\d,]*)\][^ ]* (all-gather|all-reduce|all-to-all|collective-permute|"
      r"reduce-scatter)(?:-start)?\(", hlo)
  assert collectives, hlo
  for _, dims, op in collectives:
    assert op == "all-gather"
    assert tuple(int(d) for d in dims.split(",")) == candidates
  # The local top_k stays XLA:CPU's TopK over the [chunk, rows / shards] block; the only sort is
  # the merge of the gathered candidates.
  assert re.search(rf"= \(f32\[{chunk},{k}\]\S* s32\[{chunk},{k}\]\S*\) custom-call\(.*"
                   r'custom_call_target="TopK"', hlo), hlo
  sorts = [line.split(" sort(")[0] for line in hlo.splitlines() if " sort(" in line]
  assert sorts, hlo
  for line in sorts:
    shapes = re.findall(r"\w+\[([\d,]*)\]", line.split("=", 1)[1])
    assert shapes and all(tuple(int(d) for d in dims.split(",")) == candidates
                          for dims in shapes), line


def test_empty_queries():
  preds, sims, idx = knn.knn_neighbors_sharded(np.ones((9, 4)), np.arange(9) % 3,
                                               np.ones((0, 4)), mesh=_mesh(8), num_classes=3,
                                               k=4)
  assert preds.shape == (0,) and sims.shape == idx.shape == (0, 4)


def test_a_mesh_whose_batch_axes_have_size_1_replicates_the_bank():
  # batch_sharding drops size-1 axes: the bank is whole on every device, nothing is gathered.
  rng = np.random.default_rng(5)
  train, labels = rng.standard_normal((30, 4)).astype(np.float32), rng.integers(0, 3, 30)
  test = rng.standard_normal((9, 4)).astype(np.float32)
  mesh = _mesh(2, (("data", 1), ("tensor", 2)))
  preds, _, idx = knn.knn_neighbors_sharded(train, labels, test, mesh=mesh, num_classes=3, k=4)
  np.testing.assert_array_equal(idx, _brute_force_neighbors(train, test, 4)[1])
  np.testing.assert_array_equal(preds, knn.knn_classify(train, labels, test, num_classes=3, k=4))
