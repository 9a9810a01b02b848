"""Deterministic tf.data input pipeline: the batch of step t is a pure function of
(seed, t, process_index, process_count).

Why: exact data replay on resume (ARCHITECTURE.md). Instead of checkpointing iterator state,
a run restarted at step t rebuilds the pipeline with start_step=t and gets bit-identical batches
to those an uninterrupted run would have seen.

The global stream: epoch e is a seeded permutation of the dataset rows (seed, e); the epochs
laid end to end give an infinite sequence of rows, indexed by global position. The global batch
of step t holds positions t*B .. t*B+B-1, and process p of P takes positions
t*B + p*b .. t*B + (p+1)*b - 1 with b = B/P, so the process slices concatenated in process order
are the global batch. An example's augmentation seed is a function of (seed, position) only;
augment.py guarantees a view does not depend on the batch it is computed in, so the global batch
is the same for any process_count.

Data stays in host memory (small datasets, see sources.py); TensorFlow never sees a GPU.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import tensorflow as tf

from pmsn_jax.data import augment
from pmsn_jax.data.sources import LabelledImages

_PREFETCH = 2  # Batches; a fixed depth, not AUTOTUNE, which can balloon host memory.


def train_batches(data: LabelledImages, cfg, *, global_batch_size: int, seed: int,
                  start_step: int = 0, process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """This process's slice of every global batch from `start_step` on, forever.

  Yields dicts of numpy arrays with b = global_batch_size // process_count rows:
  target/anchor float32 [b,S,S,C], focal float32 [b,F,s,s,C], label int32 [b] (diagnostics
  only), index int64 [b] (row of `data`). `cfg` holds the view fields of augment.make_views.
  """
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of "
                     f"process_count {process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  if start_step < 0 or len(data) == 0:
    raise ValueError(f"need start_step >= 0 and a non-empty dataset, got {start_step}, "
                     f"{len(data)} rows")
  _hide_gpus_from_tf()
  local = global_batch_size // process_count
  first = start_step * global_batch_size + process_index * local
  images, labels = tf.constant(data.images), tf.constant(data.labels)

  @tf.autograph.experimental.do_not_convert  # Plain graph code: skip autograph's slow trace.
  def augment_batch(position, row):
    views = augment.make_views_batch(
        tf.gather(images, row), example_seeds(seed, position), cfg)
    return dict(views, label=tf.gather(labels, row), index=row)

  ds = _row_stream(len(data), seed, first)
  ds = ds.batch(local, drop_remainder=True)
  # After `first`, this process's blocks of b positions are every process_count-th one.
  ds = ds.shard(process_count, 0) if process_count > 1 else ds
  ds = ds.map(augment_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.prefetch(_PREFETCH)
  return _numpy_iterator(ds)


def eval_batches(images: np.ndarray, cfg, batch_size: int) -> Iterator[np.ndarray]:
  """augment.eval_preprocess of uint8 images [N,H,W,C] in order, float32 batches of
  `batch_size` (the last one smaller), for feature extraction."""
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  _hide_gpus_from_tf()
  ds = tf.data.Dataset.from_tensor_slices(images).batch(batch_size)
  preprocess = tf.autograph.experimental.do_not_convert(
      lambda x: augment.eval_preprocess_batch(x, cfg))
  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return _numpy_iterator(ds.prefetch(_PREFETCH))


def example_seeds(seed: int, position) -> tf.Tensor:
  """Augmentation seeds [N,2] of global positions [N]: (seed, position). Stateless ops scramble
  their seed through Philox, so neighbouring positions get unrelated random numbers."""
  position = tf.convert_to_tensor(position, tf.int64)
  return tf.stack([tf.fill(tf.shape(position), tf.constant(seed, tf.int64)), position], axis=1)


def epoch_permutation(num_rows: int, seed: int, epoch) -> tf.Tensor:
  """Rows of `epoch` in stream order: a seeded permutation of range(num_rows), int64.

  Its key folds the epoch into (seed, -1), a seed no example uses (positions are >= 0).
  """
  key = tf.random.experimental.stateless_fold_in(tf.constant([seed, -1], tf.int64), epoch)
  return tf.random.experimental.stateless_shuffle(tf.range(num_rows, dtype=tf.int64), key)


def _row_stream(num_rows: int, seed: int, first: int) -> tf.data.Dataset:
  """(position, row) int64 pairs for global positions first, first+1, ... forever."""
  first_epoch, offset = divmod(first, num_rows)

  @tf.autograph.experimental.do_not_convert
  def epoch_rows(epoch):
    start = tf.where(epoch == first_epoch, tf.constant(offset, tf.int64), 0)
    rows = epoch_permutation(num_rows, seed, epoch)[start:]
    positions = epoch * num_rows + tf.range(start, num_rows, dtype=tf.int64)
    return tf.data.Dataset.from_tensor_slices((positions, rows))

  return tf.data.Dataset.counter(first_epoch).flat_map(epoch_rows)


def _numpy_iterator(ds: tf.data.Dataset) -> Iterator:
  options = tf.data.Options()
  options.deterministic = True
  yield from ds.with_options(options).as_numpy_iterator()


def _hide_gpus_from_tf() -> None:
  """Keep TensorFlow (tf.data) off accelerators that JAX needs."""
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TF initialised its devices before the pipeline was built.
    if tf.config.get_visible_devices("GPU"):
      logging.warning("TensorFlow was initialised with GPUs visible before the input "
                      "pipeline; it may hold accelerator memory JAX needs.")
