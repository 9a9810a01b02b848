"""The one interface every data source implements (sources.LabelledImages, sources.TfdsImages,
catalog.ImageFiles): the train loop, pipeline, evaluation and inspect call these members and
branch on the declared capabilities, never on a source's class.

A module of its own because catalog.py and sources.py both implement it (sources imports
catalog).
"""
from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class DataSource(Protocol):
  """A split of labelled images.

  Capabilities:
    random_access: rows can be read in any order and every label is known up front; such a
      source also has `labels` int32 [N]. False: a streamed split (TFDS record files), read in
      order only (TfdsImages.as_dataset, shard_size), its labels known after one pass.
    encoded: `records` and `reader` give encoded image bytes (JPEG/PNG..., decoded by the
      views) rather than uint8 [H,W,C] pixels.
    channels: the stored images' channels; None for encoded images, which are decoded to the
      config's data.channels.
    where: names the data in error messages ("the split", "tfds:NAME split 'SPLIT'").
  """

  num_classes: int
  random_access: bool
  encoded: bool
  channels: int | None
  where: str

  def __len__(self) -> int:
    """Rows; 0 for an empty split or a streamed one of unknown size (TFDS mock data)."""

  def class_counts(self) -> np.ndarray:
    """Examples per class, int64 [num_classes] (a streamed split: one pass over its labels)."""

  def subset(self, rows: np.ndarray) -> DataSource:
    """The same kind of source holding `rows`; a streamed split raises ValueError."""

  def describe(self, rows: np.ndarray) -> str:
    """`rows` of the split (a streamed split: all of it) in one line for the train log."""

  def records(self, start: int = 0, end: int | None = None):
    """tf.data.Dataset of (image, label int32) for rows [start, end) (None: to the end), in
    row order; files are read only when iterated."""

  def reader(self) -> Callable:
    """rows int64 tensor -> (images, labels), for tf.data map functions; random_access only.
    Pixel sources take any shape of rows, encoded ones one row (a scalar) at a time."""


def describe_labels(labels: np.ndarray, num_classes: int) -> str:
  """The class histogram of `labels`, and its empty classes, in one line."""
  counts = np.bincount(labels, minlength=num_classes)
  shown = counts.tolist() if len(counts) <= 20 else (
      f"{counts.max()} max, {np.median(counts):.0f} median, {counts.min()} min")
  empty = int((counts == 0).sum())
  return (f"{len(labels)} images in {num_classes} classes, class counts {shown}"
          + (f"; {empty} classes have no images" if empty else ""))


def refuse_random_access(where: str, what: str):
  """The error of a streamed source asked for `what`, which needs random access."""
  return ValueError(f"{what} needs random access to the rows of {where}, which is streamed: use "
                    f"a catalog source (inat_json:, folder:) or an in-memory one")
