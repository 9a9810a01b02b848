"""Deterministic tf.data input pipeline: the batch of step t is a pure function of
(seed, t, process_index, process_count).

Why: exact data replay on resume. Instead of checkpointing iterator state,
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
import os
from collections.abc import Iterator

import numpy as np
import tensorflow as tf

from pmsn_jax.data import augment, imbalanced
from pmsn_jax.data.interface import DataSource

PREFETCH = 2  # Batches; a fixed depth, not AUTOTUNE, which can balloon host memory.
_SPARES = 3  # Substitutes tried for an unreadable image file.
SHUFFLE_BUFFER = 10_000  # Encoded records (~100 kB each for iNat) per process.


def train_batches(data: DataSource, cfg, *,
                  global_batch_size: int, seed: int, start_step: int = 0, process_index: int = 0,
                  process_count: int = 1,
                  batch_class_skew: float = 0.0) -> Iterator[dict[str, np.ndarray]]:
  """This process's slice of every global batch from `start_step` on, forever.

  `data` is a random-access source of pixels (in memory) or of encoded images (a catalog of
  files), or a streamed one (a TFDS split; see _tfds_views for its resume semantics).
  Yields dicts of numpy arrays with b = global_batch_size // process_count rows:
  target/anchor uint8 [b,S,S,C], focal uint8 [b,F,s,s,C] (cropped, resized, flipped),
  photometric float32 [b,2+F,P] (their random numbers for the step's photometric ops,
  pmsn_jax/photometric.py), label int32 [b] (diagnostics only), index int64 [b] (row of `data`),
  skipped int32 [b] (unreadable files replaced).
  `cfg` holds the view fields of augment.make_views (and `channels` for image files).
  """
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of "
                     f"process_count {process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  if start_step < 0 or (len(data) == 0 and data.random_access):
    raise ValueError(f"need start_step >= 0 and a non-empty dataset, got {start_step}, "
                     f"{len(data)} rows")
  hide_gpus_from_tf()
  local = global_batch_size // process_count
  if not data.random_access:
    if batch_class_skew > 0:
      raise ValueError("data.batch_class_skew needs every label up front: use a catalog source "
                       "(inat_json:, folder:) or an in-memory one, not a streamed tfds: split")
    ds = _tfds_views(data, cfg, seed, start_step * local, process_index, process_count)
    return numpy_iterator(ds.batch(local, drop_remainder=True).prefetch(PREFETCH))
  first = start_step * global_batch_size + process_index * local
  ds = _row_stream(data, seed, first, batch_class_skew)
  ds = ds.batch(local, drop_remainder=True)
  # After `first`, this process's blocks of b positions are every process_count-th one.
  ds = ds.shard(process_count, 0) if process_count > 1 else ds
  if data.encoded:
    ds = _file_views(ds.unbatch(), data, cfg, seed).batch(local, drop_remainder=True)
  else:
    ds = _array_views(ds, data, cfg, seed)
  return numpy_iterator(ds.prefetch(PREFETCH))


def _array_views(blocks: tf.data.Dataset, data: DataSource, cfg, seed: int):
  """In-memory images: whole blocks of (position, row) are augmented in one batched op."""
  read = data.reader()

  @tf.autograph.experimental.do_not_convert  # Plain graph code: skip autograph's slow trace.
  def augment_block(position, row):
    images, labels = read(row)
    views = augment.make_views_batch(images, example_seeds(seed, position), cfg)
    return dict(views, label=labels, index=row, skipped=tf.zeros_like(row, tf.int32))

  return blocks.map(augment_block, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _file_views(pairs: tf.data.Dataset, data: DataSource, cfg, seed: int):
  """Image files: each (position, row) is read and decoded on its own (sizes differ).

  A file that cannot be read or decoded is replaced by the first readable of _SPARES rows
  drawn from (seed, position), and `skipped` counts the failures. The substitute depends on
  the position only, so a batch stays a pure function of (seed, step) whatever the process
  count, and a resumed run replays an uninterrupted one exactly. If all spares fail too, the
  example is dropped and the process's later batches shift by one (logged as skipped).
  """
  read = data.reader()
  channels, num_rows = int(augment.field(cfg, "channels")), len(data)

  @tf.autograph.experimental.do_not_convert
  def attempt(position, tries, row):
    encoded, label = read(row)
    views = augment.make_views_encoded(encoded, example_seeds(seed, position[None])[0], cfg,
                                       channels)
    return dict(views, label=label, index=row, skipped=tries)

  @tf.autograph.experimental.do_not_convert
  def first_readable(position, row):
    key = tf.random.experimental.stateless_fold_in(tf.constant([seed, -3], tf.int64), position)
    spares = tf.random.stateless_uniform([_SPARES], key, 0, num_rows, tf.int64)
    rows = tf.concat([row[None], spares], 0)
    tries = tf.range(_SPARES + 1, dtype=tf.int32)
    ds = tf.data.Dataset.from_tensor_slices((tf.fill([_SPARES + 1], position), tries, rows))
    return ds.map(attempt).ignore_errors().take(1)

  # One file per cycle element and block_length 1: the output order is the input order for
  # any cycle_length, so sizing it to the host changes the speed, never the batches.
  return pairs.interleave(first_readable, cycle_length=decode_parallelism(), block_length=1,
                          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def decode_parallelism() -> int:
  """Image files read and decoded at once by this process: one per core it may run on (a
  TPU VM host has 100-240; a laptop 8), as tf.data's AUTOTUNE would size it."""
  try:
    return max(1, len(os.sched_getaffinity(0)))
  except AttributeError:  # macOS has no affinity
    return os.cpu_count() or 1


def _tfds_views(data: DataSource, cfg, seed: int, first: int, process_index: int,
                process_count: int):
  """A streamed TFDS split: this process's even split, epoch after epoch, from its example
  `first` on.

  TFDS's record files allow no random access, so the order is a stream: a fixed seeded order
  of the record files, then a buffer shuffle seeded by (seed, epoch). Resuming at step t skips
  t * local records of the current epoch (read, never decoded) to reach the same position, so
  a resumed run sees the examples of an uninterrupted one, at the cost of that read. Records
  that fail to decode are dropped and counted in `skipped` (after one, a resumed run is offset
  by the number dropped before it).
  """
  channels = int(augment.field(cfg, "channels"))
  per_epoch = data.shard_size(process_count)
  first_epoch, offset = divmod(first, per_epoch) if per_epoch else (0, first)
  records = data.as_dataset(process_index, process_count, shuffle_seed=seed)

  @tf.autograph.experimental.do_not_convert
  def epoch_records(epoch):
    key = tf.random.experimental.stateless_fold_in(tf.constant([seed, -4], tf.int64), epoch)
    return records.shuffle(SHUFFLE_BUFFER, seed=key[0], reshuffle_each_iteration=False)

  @tf.autograph.experimental.do_not_convert
  def views(index, record):
    encoded, label = record
    position = index * process_count + process_index  # Unique across processes.
    out = augment.make_views_encoded(encoded, example_seeds(seed, position[None])[0], cfg,
                                     channels)
    return index, dict(out, label=label, index=index)

  @tf.autograph.experimental.do_not_convert
  def count_gaps(previous, element):
    index, example = element
    return index, dict(example, skipped=tf.cast(index - previous - 1, tf.int32))

  ds = tf.data.Dataset.counter(first_epoch).flat_map(epoch_records).skip(offset)
  ds = ds.enumerate(first)
  ds = ds.map(views, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()
  return ds.scan(tf.constant(first - 1, tf.int64), count_gaps)


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


def _row_stream(data, seed: int, first: int, batch_class_skew: float) -> tf.data.Dataset:
  """(position, row) int64 pairs for global positions first, first+1, ... forever.

  With batch_class_skew > 0 each epoch's order is imbalanced.skewed_epoch_permutation: a few
  classes dominate each batch while the epoch still visits every row once.
  """
  num_rows = len(data)
  first_epoch, offset = divmod(first, num_rows)
  labels = tf.constant(data.labels)

  def permutation(epoch):
    if batch_class_skew > 0:
      return imbalanced.skewed_epoch_permutation(labels, data.num_classes, seed, epoch,
                                                 batch_class_skew)
    return epoch_permutation(num_rows, seed, epoch)

  @tf.autograph.experimental.do_not_convert
  def epoch_rows(epoch):
    start = tf.where(epoch == first_epoch, tf.constant(offset, tf.int64), 0)
    rows = permutation(epoch)[start:]
    positions = epoch * num_rows + tf.range(start, num_rows, dtype=tf.int64)
    return tf.data.Dataset.from_tensor_slices((positions, rows))

  return tf.data.Dataset.counter(first_epoch).flat_map(epoch_rows)


def numpy_iterator(ds: tf.data.Dataset) -> Iterator:
  options = tf.data.Options()
  options.deterministic = True
  yield from ds.with_options(options).as_numpy_iterator()


def hide_gpus_from_tf() -> None:
  """Keep TensorFlow (tf.data) off accelerators that JAX needs."""
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TF initialised its devices before the pipeline was built.
    if tf.config.get_visible_devices("GPU"):
      logging.warning("TensorFlow was initialised with GPUs visible before the input "
                      "pipeline; it may hold accelerator memory JAX needs.")
