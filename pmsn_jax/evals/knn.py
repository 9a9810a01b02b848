"""Weighted k-nearest-neighbour classifier on frozen features (the usual SSL k-NN).

Not in the official MSN code; this is the protocol of Wu et al. (2018) / DINO that lightly and
most SSL papers report: L2-normalise features, cosine similarity to a bank of train features,
keep the top-k neighbours, each votes for its label with weight exp(sim / temperature), predict
the class with the largest summed vote.

Memory is bounded by the test chunk: the [chunk, num_train] similarity block is the only large
intermediate (1024 x 60k float32 = 245 MB), so a 60k-bank x 10k-query problem runs on a CPU.
The bank stays on device; every chunk has the same shape (the last one is padded), so the jitted
chunk function compiles once.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from pmsn_jax.evals import classwise


def check_probe_inputs(train_features, train_labels, test_features, num_classes):
  """Validates and converts the (features, labels) inputs shared by the k-NN and linear probes.

  Returns float32 [N, D] train features, int32 [N] train labels, float32 [M, D] test features.
  Raises ValueError naming the offending argument, so a wrong call fails before any compile.
  """
  train_features = np.asarray(train_features, np.float32)
  test_features = np.asarray(test_features, np.float32)
  if train_features.ndim != 2 or train_features.shape[0] == 0:
    raise ValueError(f"train_features must be a non-empty [N, D] array, got shape "
                     f"{train_features.shape}")
  if test_features.ndim != 2:
    raise ValueError(f"test_features must be a [M, D] array, got shape {test_features.shape}")
  if test_features.shape[1] != train_features.shape[1]:
    raise ValueError(f"test_features has feature dim {test_features.shape[1]} but "
                     f"train_features has {train_features.shape[1]}")
  for name, x in (("train_features", train_features), ("test_features", test_features)):
    if not np.all(np.isfinite(x)):
      raise ValueError(f"{name} contains NaN or inf")
  train_labels = classwise.check_labels(train_labels, num_classes, "train_labels")
  if train_labels.shape[0] != train_features.shape[0]:
    raise ValueError(f"train_labels has {train_labels.shape[0]} entries but train_features has "
                     f"{train_features.shape[0]} rows")
  return train_features, train_labels, test_features


def _l2_normalize(x, eps=1e-12):
  # Same convention as torch.nn.functional.normalize: x / max(||x||, eps); zero rows stay zero.
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


@functools.partial(jax.jit, static_argnames=("k", "num_classes"))
def _knn_chunk(bank, bank_labels, queries, temperature, *, k, num_classes):
  """Predicted labels for one [chunk, D] block of queries against the normalised bank."""
  # HIGHEST: neighbour ranking is sensitive to bf16/tf32 rounding on GPU/TPU; the matmul is a
  # negligible cost next to the encoder forward pass that produced the features.
  sims = jnp.matmul(_l2_normalize(queries), bank.T, precision=jax.lax.Precision.HIGHEST)
  top_sims, top_idx = jax.lax.top_k(sims, k)                         # [chunk, k], sorted desc.
  return _weighted_vote(top_sims, bank_labels[top_idx], temperature, num_classes)


def _weighted_vote(top_sims, top_labels, temperature, num_classes):
  """Each query's neighbours vote for their labels with weight exp(sim / T): [chunk] int32.

  exp((s - s_max) / T) = exp(s / T) times a per-query constant: same argmax, never overflows
  for small temperatures. jnp.max, not top_sims[:, :1]: on XLA:CPU that slice stops the TopK
  custom call from matching and top_k falls back to a full sort (25x slower). Scatter-add
  instead of one_hot: a [chunk, k, num_classes] one-hot would be 670 MB for iNat18's 8142
  classes at chunk 1024.
  """
  weights = jnp.exp((top_sims - jnp.max(top_sims, axis=1, keepdims=True)) / temperature)
  rows = jnp.arange(top_sims.shape[0])[:, None]
  votes = jnp.zeros((top_sims.shape[0], num_classes), jnp.float32)
  votes = votes.at[rows, top_labels].add(weights)
  return jnp.argmax(votes, axis=-1).astype(jnp.int32)


def knn_classify(train_features, train_labels, test_features, *, num_classes, k=20,
                 temperature=0.07, chunk_size=1024):
  """Predicts test labels by temperature-weighted voting of the k nearest train features.

  Args:
    train_features: [N, D] bank features (e.g. frozen target-encoder CLS tokens).
    train_labels: [N] integer labels in [0, num_classes).
    test_features: [M, D] query features.
    num_classes: number of classes (votes are summed into this many bins).
    k: neighbours per query, 1 <= k <= N. 20 is the DINO / lightly default.
    temperature: vote weight exp(cos_sim / temperature); 0.07 is the usual SSL value.
    chunk_size: queries per jitted call; bounds memory at chunk_size x N similarities.

  Returns:
    [M] int32 numpy array of predicted labels. Ties in the summed vote go to the lower class id.
  """
  train_features, train_labels, test_features = check_probe_inputs(
      train_features, train_labels, test_features, num_classes)
  _check_knn_args(train_features.shape[0], k, temperature, chunk_size)
  num_test = test_features.shape[0]
  if num_test == 0:
    return np.zeros((0,), np.int32)

  bank = _l2_normalize(jnp.asarray(train_features))
  bank_labels = jnp.asarray(train_labels)
  preds = [_knn_chunk(bank, bank_labels, block, jnp.float32(temperature), k=k,
                      num_classes=num_classes)
           for block in _query_chunks(test_features, chunk_size)]
  # Fetch once at the end so host padding overlaps with device compute (async dispatch).
  return np.concatenate([np.asarray(p) for p in preds])[:num_test]


def _check_knn_args(num_train, k, temperature, chunk_size):
  if not 1 <= k <= num_train:
    raise ValueError(f"k must be in [1, {num_train}] (the number of train rows), got {k}")
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _query_chunks(queries, chunk_size):
  """[M, D] queries in blocks of min(chunk_size, M) rows (don't pad 300 queries up to 1024),
  the last one padded with zero rows (similarity 0), whose results the caller drops: every
  block has one shape, so the jitted chunk function compiles once."""
  chunk = min(chunk_size, queries.shape[0])
  for start in range(0, queries.shape[0], chunk):
    block = queries[start:start + chunk]
    yield block if block.shape[0] == chunk else np.pad(block, ((0, chunk - block.shape[0]),
                                                               (0, 0)))


# --- k-NN over a bank sharded across devices ---------------------------------------------
#
# At iNaturalist 2018 scale (437,513 train rows, 8142 classes) the bank and each query chunk's
# [chunk, N] similarity block outgrow one accelerator's share of the evaluation, so the bank is
# split along N over the mesh's batch axes instead. Each device scores the (replicated) query
# chunk against its own rows and keeps its local top k; only those k candidates per device are
# all-gathered (k x shards per query, never the similarity block), and a final top k over them
# picks the same neighbours, in the same order, as one top k over the whole bank would.
#
# Tie rule, identical to knn_classify's (lax.top_k on one device): among equal similarities the
# lower global bank index ranks first. Each device's top_k lists its equal candidates in local
# index order, and the tiled all-gather concatenates the devices in shard order, i.e. in global
# index order; so in the gathered [.., k x shards] row equal similarities appear in global index
# order, and the merging lax.top_k (lower position first) keeps (similarity desc, index asc).
#
# Exactness also needs each (query, row) similarity to be the same float as on one device: the
# expression is the same, and on XLA:CPU the [chunk, N/shards] matmul gives bitwise the values
# of the [chunk, N] one (tested). A GPU/TPU library may pick another kernel for the smaller
# block and round differently in the last bit; then only neighbours within ~1 ulp of each
# other could swap places.


def _bank_axes(mesh):
  """The mesh's batch axes (sharding.BATCH_AXES) that it has, the bank's row split."""
  from pmsn_jax import sharding  # pylint: disable=import-outside-toplevel
  axes = tuple(a for a in sharding.BATCH_AXES if a in mesh.shape)
  if not axes:
    raise ValueError(f"mesh has axes {tuple(mesh.shape)} but none of the batch axes "
                     f"{sharding.BATCH_AXES} to shard the bank over")
  return axes


@functools.lru_cache(maxsize=32)
def _sharded_chunk_fn(mesh, axes, k, num_classes, num_valid):
  """Jitted (bank, bank_labels, queries, temperature) -> (preds, top_sims, top_idx) for one
  query chunk; bank rows at global index >= num_valid are padding and never selected.

  Cached per (mesh, k, classes, N) so the repeated chunks of one call, and repeated calls on
  the same bank, reuse one compile (jax.jit caches on the function object)."""
  def local(bank, bank_labels, queries, temperature):
    rows_per_shard = bank.shape[0]
    local_k = min(k, rows_per_shard)  # k <= N <= shards x rows_per_shard: enough candidates.
    offset = jax.lax.axis_index(axes) * rows_per_shard
    global_idx = offset + jnp.arange(rows_per_shard, dtype=jnp.int32)
    # The same expression as _knn_chunk, so each (query, row) similarity is the same number.
    sims = jnp.matmul(_l2_normalize(queries), bank.T, precision=jax.lax.Precision.HIGHEST)
    sims = jnp.where(global_idx[None, :] < num_valid, sims, -jnp.inf)  # Padding never wins.
    cand_sims, cand_pos = jax.lax.top_k(sims, local_k)       # [chunk, local_k], ties: lower idx.
    cand_idx = global_idx[cand_pos]
    cand_labels = bank_labels[cand_pos]
    # The only collective: k candidates per device per query, in shard (= global index) order.
    gather = functools.partial(jax.lax.all_gather, axis_name=axes, axis=1, tiled=True)
    all_sims, all_idx, all_labels = gather(cand_sims), gather(cand_idx), gather(cand_labels)
    top_sims, pos = jax.lax.top_k(all_sims, k)               # Equal sims: lower position first.
    top_idx = jnp.take_along_axis(all_idx, pos, axis=1)
    top_labels = jnp.take_along_axis(all_labels, pos, axis=1)
    preds = _weighted_vote(top_sims, top_labels, temperature, num_classes)
    return preds, top_sims, top_idx

  bank_spec = jax.sharding.PartitionSpec(axes)
  replicated = jax.sharding.PartitionSpec()
  return jax.jit(jax.shard_map(
      local, mesh=mesh, in_specs=(bank_spec, bank_spec, replicated, replicated),
      out_specs=(replicated, replicated, replicated),
      # Everything after the all-gather is computed from the gathered candidates and replicated
      # inputs, so it is the same on every device; this jax's all_gather output is typed as
      # device-varying, so the replication check cannot see that.
      check_vma=False))


def shard_bank(train_features, train_labels, mesh):
  """L2-normalised bank and its labels as global arrays split along N over the batch axes.

  N is padded with zero rows (label 0) up to a multiple of the shard count; the k-NN masks them
  by index, so they are never neighbours. Returns (bank, bank_labels, N). The normalisation is
  knn_classify's, applied row by row on each shard, so each row is the same numbers."""
  axes = _bank_axes(mesh)
  shards = math.prod(mesh.shape[a] for a in axes)
  num_train = train_features.shape[0]
  pad = -num_train % shards
  sharding_ = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axes))
  bank = jax.device_put(np.pad(train_features, ((0, pad), (0, 0))), sharding_)
  bank_labels = jax.device_put(np.pad(train_labels, (0, pad)), sharding_)
  return _l2_normalize(bank), bank_labels, num_train


def knn_neighbors_sharded(train_features, train_labels, test_features, *, mesh, num_classes,
                          k=20, temperature=0.07, chunk_size=1024):
  """knn_classify with the bank sharded over `mesh`'s batch axes; also returns the neighbours.

  Same arguments as knn_classify plus `mesh` (e.g. sharding.make_mesh(config.mesh)): the bank's
  N rows are split over the mesh's "data" and "fsdp" axes (replicated over any other axis), the
  query chunks are replicated. Memory per device: N/shards bank rows and a
  [chunk_size, N/shards] similarity block. Single-process only: the bank is put on the devices
  from this host's numpy array.

  Returns:
    (preds [M] int32, sims [M, k] float32, indices [M, k] int32) numpy arrays: the predictions
    (equal to knn_classify's, ties included), and each query's neighbours' cosine similarities
    (descending) and train-row indices; equal similarities are ordered by lower index first.
  """
  train_features, train_labels, test_features = check_probe_inputs(
      train_features, train_labels, test_features, num_classes)
  _check_knn_args(train_features.shape[0], k, temperature, chunk_size)
  axes = _bank_axes(mesh)
  num_test = test_features.shape[0]
  if num_test == 0:
    return (np.zeros((0,), np.int32), np.zeros((0, k), np.float32), np.zeros((0, k), np.int32))

  bank, bank_labels, num_train = shard_bank(train_features, train_labels, mesh)
  chunk_fn = _sharded_chunk_fn(mesh, axes, k, num_classes, num_train)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  temperature = jax.device_put(np.float32(temperature), replicated)
  outs = [chunk_fn(bank, bank_labels, jax.device_put(block, replicated), temperature)
          for block in _query_chunks(test_features, chunk_size)]
  preds, sims, idx = (np.concatenate([np.asarray(o[i]) for o in outs])[:num_test]
                      for i in range(3))
  return preds, sims, idx


def knn_classify_sharded(train_features, train_labels, test_features, *, mesh, num_classes,
                         k=20, temperature=0.07, chunk_size=1024):
  """knn_classify with the bank sharded over `mesh`'s batch axes: the same predictions, ties
  included (see knn_neighbors_sharded), for banks too large for one device. [M] int32."""
  return knn_neighbors_sharded(train_features, train_labels, test_features, mesh=mesh,
                               num_classes=num_classes, k=k, temperature=temperature,
                               chunk_size=chunk_size)[0]
