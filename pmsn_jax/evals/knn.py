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
  # exp((s - s_max) / T) = exp(s / T) times a per-query constant: same argmax, never overflows
  # for small temperatures. jnp.max, not top_sims[:, :1]: on XLA:CPU that slice stops the
  # TopK custom call from matching and top_k falls back to a full sort (25x slower).
  weights = jnp.exp((top_sims - jnp.max(top_sims, axis=1, keepdims=True)) / temperature)
  rows = jnp.arange(queries.shape[0])[:, None]
  # Scatter-add instead of one_hot: a [chunk, k, num_classes] one-hot would be 670 MB for
  # iNat18's 8142 classes at chunk 1024.
  votes = jnp.zeros((queries.shape[0], num_classes), jnp.float32)
  votes = votes.at[rows, bank_labels[top_idx]].add(weights)
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
  if not 1 <= k <= train_features.shape[0]:
    raise ValueError(f"k must be in [1, {train_features.shape[0]}] (the number of train rows), "
                     f"got {k}")
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  num_test = test_features.shape[0]
  if num_test == 0:
    return np.zeros((0,), np.int32)

  bank = _l2_normalize(jnp.asarray(train_features))
  bank_labels = jnp.asarray(train_labels)
  chunk = min(chunk_size, num_test)  # Don't pad 300 queries up to 1024.
  preds = []
  for start in range(0, num_test, chunk):
    block = test_features[start:start + chunk]
    if block.shape[0] < chunk:  # Pad with zero rows (similarity 0); their predictions are dropped.
      block = np.pad(block, ((0, chunk - block.shape[0]), (0, 0)))
    preds.append(_knn_chunk(bank, bank_labels, block, jnp.float32(temperature), k=k,
                            num_classes=num_classes))
  # Fetch once at the end so host padding overlaps with device compute (async dispatch).
  return np.concatenate([np.asarray(p) for p in preds])[:num_test]
