"""The evaluation's image streams: each process reads its own contiguous block of a split, in
row order, with nothing cached (evals/features.py turns them into features on the mesh).

  * eval_batches: the centre crops every evaluator uses (MSN's resize-256 / crop-224);
  * linear_eval_batches: one epoch of MSN's linear-evaluation crops (random resized crop and
    flip), for eval.linear_protocol = "msn".

Every process yields the same number of batches for a split (eval_num_batches), padded at the
end with rows marked -1, because each batch is encoded by a collective program.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import tensorflow as tf

from pmsn_jax.data import augment, pipeline
from pmsn_jax.data.interface import DataSource


def eval_split_size(data: DataSource, max_examples: int = 0) -> int:
  """Rows of `data` an evaluation reads: its first `max_examples` (0 = all). A TFDS split of
  unknown size (mock data) reads max_examples rows, or as many as it has if fewer."""
  if not len(data):
    if not data.random_access and max_examples:
      return max_examples
    raise ValueError(f"nothing to evaluate in {data.where}: it is empty or of unknown size; name "
                     f"another split, or cap it with --config.eval.max_*_examples")
  return min(max_examples or len(data), len(data))


def eval_block(num_rows: int, process_index: int, process_count: int) -> tuple[int, int]:
  """[start, end) of the rows process `process_index` evaluates: contiguous blocks, in process
  order, whose sizes differ by at most one (a TFDS split can be read by row range this way)."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  return (num_rows * process_index // process_count,
          num_rows * (process_index + 1) // process_count)


def eval_num_batches(num_rows: int, local_batch: int, process_count: int) -> int:
  """Batches every process yields for `num_rows` rows: enough for the largest block, so all
  processes run the same number of (collective) encoder calls."""
  return -(-(-(-num_rows // process_count)) // local_batch)


def eval_batches(data: DataSource, cfg, *, local_batch: int, max_examples: int = 0,
                 process_index: int = 0, process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """This process's block of the first eval_split_size(data, max_examples) rows, streamed
  (nothing is cached): eval_num_batches(...) dicts of
  image float32 [local_batch,S,S,C] (eval_preprocess'ed), label int32, row int32 (the row of
  `data`; -1 marks padding after the block's end, and stands in for an image that cannot be
  decoded, which a warning counts).

  Images of files and TFDS records: shorter side resized (antialiased) to
  image_size / eval_crop_fraction and centre-cropped to a square, then eval_preprocess takes
  the centre eval_crop_fraction of it: MSN's resize-256 / crop-224 protocol. In-memory images
  go to eval_preprocess as they are.
  """
  if local_batch <= 0:
    raise ValueError(f"local_batch must be positive, got {local_batch}")
  pipeline.hide_gpus_from_tf()
  num_rows = eval_split_size(data, max_examples)
  start, end = eval_block(num_rows, process_index, process_count)
  ds = _eval_squares(data, cfg, start, end).batch(local_batch)
  preprocess = tf.autograph.experimental.do_not_convert(
      lambda x, y, r: (augment.eval_preprocess_batch(x, cfg), y, r))
  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  read = yield from _whole_batches(ds, cfg, local_batch,
                                   eval_num_batches(num_rows, local_batch, process_count),
                                   np.float32)
  if read < end - start:
    logging.warning("evaluation: %d images among rows %d-%d could not be decoded and were "
                    "left out (python -m pmsn_jax.data.inspect lists them)", end - start - read,
                    start, end - 1)


def _whole_batches(ds: tf.data.Dataset, cfg, local_batch: int, num_batches: int, dtype):
  """Yields exactly num_batches dicts of local_batch rows (image [S,S,C] of `dtype`, label,
  row): the batches of `ds`'s (image, label, row) batches, the last one padded with rows -1,
  then batches of padding only. Returns the number of rows `ds` gave."""
  read, shape = 0, None
  for images, labels, rows in pipeline.numpy_iterator(ds.prefetch(pipeline.PREFETCH)):
    read, shape = read + len(rows), images.shape[1:]
    pad = local_batch - len(rows)
    yield {"image": np.pad(images, ((0, pad),) + ((0, 0),) * 3),
           "label": np.pad(labels.astype(np.int32), (0, pad)),
           "row": np.pad(rows.astype(np.int32), (0, pad), constant_values=-1)}
    num_batches -= 1
  if num_batches and shape is None:  # A block with no readable image: the config's shape.
    size, channels = int(augment.field(cfg, "image_size")), int(augment.field(cfg, "channels"))
    shape = (size, size, channels)
  for _ in range(num_batches):
    yield {"image": np.zeros((local_batch, *shape), dtype),
           "label": np.zeros(local_batch, np.int32), "row": np.full(local_batch, -1, np.int32)}
  return read


# MSN's linear_eval.py: RandomResizedCrop(scale=(0.08, 1)) and a random flip, no colour ops.
LINEAR_EVAL_SCALE = (0.08, 1.0)


def linear_eval_batches(data: DataSource, cfg, *, local_batch: int, seed: int, epoch: int,
                        max_examples: int = 0, process_index: int = 0,
                        process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """One epoch of MSN's linear-evaluation images of this process's block of the first
  eval_split_size(data, max_examples) rows: eval_num_batches(...) dicts of image uint8
  [local_batch,S,S,C] (a random resized crop of scale LINEAR_EVAL_SCALE, flipped with
  probability 1/2; normalised on the device), label int32 and row int32 (-1: padding, and
  an image that cannot be decoded).

  The block is shuffled per epoch by (seed, epoch), as PyTorch's DistributedSampler shuffles
  each rank's share; a row's crop depends on (seed, epoch, row) only. A TFDS block is read
  in order through a seeded shuffle buffer (its records allow no random access).
  """
  pipeline.hide_gpus_from_tf()
  num_rows = eval_split_size(data, max_examples)
  start, end = eval_block(num_rows, process_index, process_count)
  view_cfg = _Overlay(cfg, target_scale=LINEAR_EVAL_SCALE, num_focal=0)
  seeds = lambda rows: pipeline.example_seeds(seed, epoch * num_rows + rows)  # noqa: E731
  if not data.encoded:  # Pixels: a whole batch of rows is cropped in one op.
    read = data.reader()

    @tf.autograph.experimental.do_not_convert
    def crop_batch(rows):
      images, labels = read(rows)
      return augment.make_views_batch(images, seeds(rows), view_cfg)["target"], labels, rows

    ds = _epoch_rows(start, end, seed, epoch).batch(local_batch).map(crop_batch)
  else:
    channels = int(augment.field(cfg, "channels"))

    @tf.autograph.experimental.do_not_convert
    def crop(encoded, label, row):
      view = augment.make_views_encoded(encoded, seeds(row[None])[0], view_cfg, channels)
      return view["target"], label, row

    ds = _encoded_epoch(data, start, end, seed, epoch)
    ds = ds.map(crop, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()
    ds = ds.batch(local_batch)
  yield from _whole_batches(ds, cfg, local_batch,
                            eval_num_batches(num_rows, local_batch, process_count), np.uint8)


def _epoch_rows(start: int, end: int, seed: int, epoch: int) -> tf.data.Dataset:
  """Rows [start, end) in the epoch's seeded order."""
  return tf.data.Dataset.from_tensor_slices(
      pipeline.epoch_permutation(end - start, seed, epoch) + start)


def _encoded_epoch(data: DataSource, start: int, end: int, seed: int,
                   epoch: int) -> tf.data.Dataset:
  """(encoded image, label, row) of rows [start, end) in the epoch's order: a seeded
  permutation where the rows allow random access, else a seeded shuffle buffer on the stream."""
  if data.random_access:
    read = data.reader()
    return _epoch_rows(start, end, seed, epoch).map(lambda row: (*read(row), row))
  key = tf.random.experimental.stateless_fold_in(tf.constant([seed, -5], tf.int64), epoch)
  records = data.records(start, end).shuffle(pipeline.SHUFFLE_BUFFER, seed=int(key[0]))
  rows = tf.data.Dataset.range(start, end)  # Positions in the read order, not TFDS rows.
  return tf.data.Dataset.zip(records, rows).map(lambda record, row: (record[0], record[1], row))


class _Overlay:
  """`cfg` with some fields replaced (augment.field reads attributes)."""

  def __init__(self, cfg, **fields):
    self._cfg, self._fields = cfg, fields

  def __getattr__(self, name):
    return self._fields[name] if name in self._fields else getattr(self._cfg, name)


def _eval_squares(data: DataSource, cfg, start: int, end: int) -> tf.data.Dataset:
  """(uint8 image, label, row) of rows [start, end) of `data`, in row order; undecodable
  images are dropped."""
  rows = tf.data.Dataset.range(start, end)
  records = data.records(start, end)
  if not data.encoded:
    return tf.data.Dataset.zip(records, rows).map(lambda xy, r: (xy[0], xy[1], r))
  channels = int(augment.field(cfg, "channels"))
  side = int(round(int(augment.field(cfg, "image_size")) / augment.field(cfg,
                                                                        "eval_crop_fraction")))

  @tf.autograph.experimental.do_not_convert
  def square(record, row):
    encoded, label = record
    image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
    hw = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = side / tf.reduce_min(hw)
    new_hw = tf.maximum(tf.cast(tf.math.ceil(hw * scale), tf.int32), side)
    image = tf.image.resize(image, new_hw, antialias=True)
    top, left = (new_hw[0] - side) // 2, (new_hw[1] - side) // 2
    image = image[top:top + side, left:left + side]
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8), label, row

  ds = tf.data.Dataset.zip(records, rows)
  return ds.map(square, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()
