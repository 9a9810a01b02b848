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

import jax
import jax.numpy as jnp
import numpy as np

from pmsn_jax import sharding
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


def l2_normalize(x, eps=1e-12):
  """x / max(||x||, eps) row-wise, as torch.nn.functional.normalize. Not losses.l2_normalize's
  x * rsqrt form: that one's last bit depends on how XLA fuses it (eager vs jitted, next to a
  small or a large matmul), and the sharded k-NN's exactness needs a row's similarities to be
  the same numbers on any number of devices (tests/test_knn_sharded.py checks the bits)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


@functools.partial(jax.jit, static_argnames=("k", "num_classes"))
def _knn_chunk(bank, bank_labels, queries, temperature, *, k, num_classes):
  """Predicted labels for one [chunk, D] block of queries against the normalised bank."""
  # HIGHEST: neighbour ranking is sensitive to bf16/tf32 rounding on GPU/TPU; the matmul is a
  # negligible cost next to the encoder forward pass that produced the features.
  sims = jnp.matmul(l2_normalize(queries), bank.T, precision=jax.lax.Precision.HIGHEST)
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

  bank = l2_normalize(jnp.asarray(train_features))
  bank_labels = jnp.asarray(train_labels)
  preds = [_knn_chunk(bank, bank_labels, block, jnp.float32(temperature), k=k,
                      num_classes=num_classes)
           for block in _query_chunks(test_features, chunk_size)]
  # Fetch once at the end so host padding overlaps with device compute (async dispatch).
  return np.concatenate([np.asarray(p) for p in preds])[:num_test]


def _check_knn_args(num_train, k, temperature, chunk_size, rows="the number of train rows"):
  if not 1 <= k <= num_train:
    raise ValueError(f"k must be in [1, {num_train}] ({rows}), got {k}")
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
# split along its rows over the mesh's batch axes instead. Each device scores the (replicated)
# query chunk against its own rows and keeps its local top k; only those k candidates per device
# are all-gathered (k x shards per query, never the similarity block), and a merge of them picks
# the same neighbours, in the same order, as one ranking of the whole bank would.
#
# The bank arrives in whatever row layout produced it (e.g. shard s holding dataset rows s,
# s + S, s + 2S, ...), so a row's place in the global array says nothing about its rank. Each row
# instead carries a key (its row in the dataset split) that is the tie-break; rows with a key < 0
# are not in the bank (padding, rows outside a sub-bank) and score -inf. The ranking is
# (similarity desc, key asc): the brute-force k-NN over the included rows in key order, which is
# knn_classify's tie rule (lax.top_k: lower index first) applied to those rows.
#
# Why the merge is exact: the producer guarantees (and knn_sharded checks once per call) that
# along each shard's rows the non-negative keys strictly increase, so the local lax.top_k (equal
# values: lower position first) lists each tie group in key order; and every row of the global
# top k is in its own device's local top k, since fewer than k rows of the whole bank, so fewer
# than k of its device, rank above it. The gathered candidates interleave keys across devices,
# so the merge is a lexicographic sort on (-similarity, key), not a top_k by position; it sorts
# only the [chunk, k x shards] candidates.
#
# Exactness also needs each (query, row) similarity to be the same float as on one device: the
# bank is normalised by knn_classify's expression, op by op, row by row; the score is the same
# expression; and on XLA:CPU with Eigen's dots (what the entry points select, host_setup.py) the
# [chunk, N/shards] matmul gives bitwise the values of the [chunk, N] one (tested). YNNPACK's
# dots (XLA:CPU's default, --nocpu_tuning) and GPU/TPU libraries may pick another kernel for the
# smaller block and round differently in the last bit; then only neighbours within ~1 ulp of
# each other could swap places. lax.top_k orders -0.0 below 0.0 while the merge treats them as
# equal, so rows whose similarity is exactly zero with both signs could be ranked differently
# from the brute force.


def _bank_axes(mesh):
  """The bank's sharding (sharding.batch_sharding) and the mesh axes its rows are split over,
  as a tuple: () when every batch axis has size 1 and the bank is replicated."""
  return sharding.batch_sharding(mesh), sharding.batch_axes(mesh)


def _fetch(x):
  """A replicated global array as numpy, from this process's first device (np.asarray of a
  multi-process array raises: it is not fully addressable)."""
  return np.asarray(x.addressable_data(0))


@functools.lru_cache(maxsize=8)
def _bank_stats_fn(mesh):
  """Jitted (bank, bank_labels, bank_keys) -> (included rows, min label, max label, 1 if every
  included row is finite, 1 if the keys are in order), one pass over the bank, replicated.

  'In order': along each shard's rows the non-negative keys strictly increase, the layout
  guarantee the exact merge relies on (see the comment above)."""
  _, axes = _bank_axes(mesh)

  def local(bank, bank_labels, bank_keys):
    included = bank_keys >= 0
    count = jnp.sum(included, dtype=jnp.int32)
    lo = jnp.min(jnp.where(included, bank_labels, jnp.iinfo(jnp.int32).max))
    hi = jnp.max(jnp.where(included, bank_labels, jnp.iinfo(jnp.int32).min))
    finite = jnp.all(jnp.isfinite(bank) | ~included[:, None]).astype(jnp.int32)
    # Largest key among the earlier rows of this shard (-1 if none): an included key must exceed it.
    running = jax.lax.cummax(jnp.where(included, bank_keys, -1))
    before = jnp.concatenate([jnp.full((1,), -1, jnp.int32), running])[:-1]
    ordered = jnp.all(~included | (bank_keys > before)).astype(jnp.int32)
    if axes:
      count = jax.lax.psum(count, axes)
      lo, finite, ordered = (jax.lax.pmin(x, axes) for x in (lo, finite, ordered))
      hi = jax.lax.pmax(hi, axes)
    return count, lo, hi, finite, ordered

  row_spec = jax.sharding.PartitionSpec(axes or None)
  replicated = jax.sharding.PartitionSpec()
  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(row_spec,) * 3,
                               out_specs=(replicated,) * 5))


@functools.lru_cache(maxsize=32)
def _sharded_chunk_fn(mesh, k, num_classes):
  """Jitted (normalised bank, bank_labels, bank_keys, queries, temperature) ->
  (preds, top_sims, top_keys) for one query chunk, replicated; rows with key < 0 are never
  selected, and k must not exceed the number of included rows.

  Cached per (mesh, k, classes) so the repeated chunks of one call, and repeated calls, reuse
  one compile per shape (jax.jit caches on the function object)."""
  _, axes = _bank_axes(mesh)

  def local(bank, bank_labels, bank_keys, queries, temperature):
    local_k = min(k, bank.shape[0])  # k <= included rows <= all rows: enough candidates.
    # The same expression as _knn_chunk, so each (query, row) similarity is the same number.
    sims = jnp.matmul(l2_normalize(queries), bank.T, precision=jax.lax.Precision.HIGHEST)
    sims = jnp.where(bank_keys[None, :] >= 0, sims, -jnp.inf)  # Excluded rows never win.
    cand_sims, cand_pos = jax.lax.top_k(sims, local_k)      # Ties: lower position = lower key.
    cand_keys, cand_labels = bank_keys[cand_pos], bank_labels[cand_pos]
    if axes:  # The only collective: k candidates per device per query.
      gather = functools.partial(jax.lax.all_gather, axis_name=axes, axis=1, tiled=True)
      cand_sims, cand_keys, cand_labels = gather(cand_sims), gather(cand_keys), gather(cand_labels)
    # Candidates of different devices interleave keys: sort on (similarity desc, key asc).
    # Excluded rows (-inf) sort last and fall outside the k included ones kept.
    neg_sims, top_keys, top_labels = jax.lax.sort((-cand_sims, cand_keys, cand_labels),
                                                  dimension=1, num_keys=2)
    top_sims, top_keys, top_labels = -neg_sims[:, :k], top_keys[:, :k], top_labels[:, :k]
    preds = _weighted_vote(top_sims, top_labels, temperature, num_classes)
    return preds, top_sims, top_keys

  row_spec = jax.sharding.PartitionSpec(axes or None)
  replicated = jax.sharding.PartitionSpec()
  return jax.jit(jax.shard_map(
      local, mesh=mesh, in_specs=(row_spec,) * 3 + (replicated,) * 2,
      out_specs=(replicated,) * 3,
      # Everything after the all-gather is computed from the gathered candidates and replicated
      # inputs, so it is the same on every device; this jax's all_gather output is typed as
      # device-varying, so the replication check cannot see that.
      check_vma=False))


def _check_bank(bank, bank_labels, bank_keys, mesh, num_classes):
  """Validates the sharded bank; returns its number of included rows (keys >= 0).

  Shapes, dtypes and shardings are checked on the host; labels, finiteness and the key order
  over the included rows in one jitted pass (a few scalars come back)."""
  bank_sharding, _ = _bank_axes(mesh)
  for name, x, ndim, dtype in (("bank", bank, 2, jnp.float32),
                               ("bank_labels", bank_labels, 1, jnp.int32),
                               ("bank_keys", bank_keys, 1, jnp.int32)):
    if not isinstance(x, jax.Array) or x.ndim != ndim or x.dtype != dtype:
      raise ValueError(f"{name} must be a {ndim}-d {jnp.dtype(dtype).name} jax.Array, got "
                       f"{type(x).__name__} {getattr(x, 'dtype', '')}{getattr(x, 'shape', '')}")
    if x.shape[0] != bank.shape[0]:
      raise ValueError(f"{name} has {x.shape[0]} rows but bank has {bank.shape[0]}")
    # Another layout would make jit reshard the whole bank (an all-gather of it) on every chunk.
    if not x.sharding.is_equivalent_to(bank_sharding, ndim):
      raise ValueError(f"{name} must have sharding {bank_sharding} "
                       f"(sharding.batch_sharding(mesh)), got {x.sharding}")
  if bank.shape[0] % sharding.batch_shards(mesh):
    raise ValueError(f"bank has {bank.shape[0]} rows, not a multiple of the "
                     f"{sharding.batch_shards(mesh)} batch shards")
  count, lo, hi, finite, ordered = (
      int(_fetch(x)) for x in _bank_stats_fn(mesh)(bank, bank_labels, bank_keys))
  if not ordered:
    raise ValueError("bank_keys >= 0 must strictly increase along each shard's rows")
  if not finite:
    raise ValueError("bank contains NaN or inf in a row with key >= 0")
  if count and not 0 <= lo <= hi < num_classes:
    raise ValueError(f"bank_labels of rows with key >= 0 must be in [0, {num_classes}), got "
                     f"[{lo}, {hi}]")
  return count


def knn_sharded(bank, bank_labels, bank_keys, queries, *, mesh, num_classes, k=20,
                temperature=0.07, chunk_size=1024):
  """Weighted k-NN against a bank held as row-sharded global arrays, in any row layout.

  Args:
    bank: [R, D] float32 jax.Array of raw (not normalised) features, sharding
      sharding.batch_sharding(mesh); R a multiple of sharding.batch_shards(mesh).
    bank_labels: [R] int32 jax.Array, same sharding; labels of rows with key >= 0 must be in
      [0, num_classes).
    bank_keys: [R] int32 jax.Array, same sharding: each row's identity and tie-break key (its row
      in the dataset split), unique among the rows >= 0; a key < 0 excludes the row from the bank.
      Along each shard's rows the keys >= 0 must strictly increase (checked); across shards they
      may interleave in any way.
    queries: [M, D] float32 host array, the same on every process.
    mesh, num_classes, k, temperature, chunk_size: as knn_classify (1 <= k <= included rows).

  Returns:
    (preds [M] int32, sims [M, k] float32, keys [M, k] int32) numpy arrays, on every process:
    the brute-force k-NN over the included rows ranked by (cosine similarity desc, key asc), i.e.
    knn_classify's predictions and neighbours on those rows sorted by key, ties included.
  """
  if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
  queries = np.asarray(queries, np.float32)
  if not isinstance(bank, jax.Array) or bank.ndim != 2:
    raise ValueError(f"bank must be a [R, D] jax.Array, got {type(bank).__name__} "
                     f"{getattr(bank, 'shape', '')}")
  if queries.ndim != 2 or queries.shape[1] != bank.shape[1]:
    raise ValueError(f"queries must be [M, {bank.shape[1]}] (the bank's feature dim), got shape "
                     f"{queries.shape}")
  if not np.all(np.isfinite(queries)):
    raise ValueError("queries contains NaN or inf")
  num_included = _check_bank(bank, bank_labels, bank_keys, mesh, num_classes)
  _check_knn_args(num_included, k, temperature, chunk_size, rows="the bank rows with key >= 0")
  num_queries = queries.shape[0]
  if num_queries == 0:
    return (np.zeros((0,), np.int32), np.zeros((0, k), np.float32), np.zeros((0, k), np.int32))

  # knn_classify's normalisation, op by op and row by row, so each row is the same numbers; it
  # keeps the bank's sharding.
  bank = l2_normalize(bank)
  chunk_fn = _sharded_chunk_fn(mesh, int(k), int(num_classes))
  replicated = sharding.replicated(mesh)
  temperature = sharding.from_host(np.float32(temperature), replicated)
  outs = [chunk_fn(bank, bank_labels, bank_keys, sharding.from_host(block, replicated),
                   temperature)
          for block in _query_chunks(queries, chunk_size)]
  # Fetch once at the end so host work overlaps with device compute (async dispatch).
  preds, sims, keys = (np.concatenate([_fetch(o[i]) for o in outs])[:num_queries]
                       for i in range(3))
  return preds, sims, keys


def knn_neighbors_sharded(train_features, train_labels, test_features, *, mesh, num_classes,
                          k=20, temperature=0.07, chunk_size=1024):
  """knn_classify with the bank sharded over `mesh`'s batch axes; also returns the neighbours.

  Same arguments as knn_classify plus `mesh` (e.g. sharding.make_mesh(config.mesh)): the bank's
  N rows are split in order over the mesh's "data" and "fsdp" axes (replicated over any other
  axis) and padded to a multiple of the shard count with excluded rows, the query chunks are
  replicated: knn_sharded with keys arange(N). Memory per device: ~N/shards bank rows and a
  [chunk_size, N/shards] similarity block. With several processes each must pass the same
  arrays (each puts its own devices' rows).

  Returns:
    (preds [M] int32, sims [M, k] float32, indices [M, k] int32) numpy arrays: the predictions
    (equal to knn_classify's, ties included), and each query's neighbours' cosine similarities
    (descending) and train-row indices; equal similarities are ordered by lower index first.
  """
  train_features, train_labels, test_features = check_probe_inputs(
      train_features, train_labels, test_features, num_classes)
  _check_knn_args(train_features.shape[0], k, temperature, chunk_size)
  num_train = train_features.shape[0]
  return knn_sharded(sharding.rows_from_host(train_features, mesh),
                     sharding.rows_from_host(train_labels, mesh),
                     sharding.rows_from_host(np.arange(num_train, dtype=np.int32), mesh, fill=-1),
                     test_features, mesh=mesh, num_classes=num_classes, k=k,
                     temperature=temperature, chunk_size=chunk_size)


def knn_classify_sharded(train_features, train_labels, test_features, *, mesh, num_classes,
                         k=20, temperature=0.07, chunk_size=1024):
  """knn_classify with the bank sharded over `mesh`'s batch axes: the same predictions, ties
  included (see knn_neighbors_sharded), for banks too large for one device. [M] int32."""
  return knn_neighbors_sharded(train_features, train_labels, test_features, mesh=mesh,
                               num_classes=num_classes, k=k, temperature=temperature,
                               chunk_size=chunk_size)[0]
