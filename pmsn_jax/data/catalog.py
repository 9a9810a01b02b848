"""Image-file catalogs: datasets too big for memory, as (path, label) rows read on demand.

Why a catalog: the training pipeline makes each batch a pure function of (seed, step), which
needs random access to every example. A list of file paths gives that for any size of dataset
(437k iNaturalist 2018 paths take ~150 MB as a numpy unicode array); the JPEG bytes are read,
and only the needed window decoded, when an example's position in the stream comes up.

Readers build catalogs from the layouts users arrive with:
  * ``inat_json:<root>``: the original iNaturalist 2018 release, ``<root>/train2018.json`` and
    ``val2018.json`` (COCO-like ``images`` / ``annotations`` / ``categories``) with the images
    under ``<root>/train_val2018/...``; labels are the JSON ``category_id``s.
  * ``folder:<root>``: ``<root>[/<split>]/<class>/*.{jpg,jpeg,png,gif,bmp}``.
    tfds.folder_dataset.ImageFolder is not used: it yields a shuffled tf.data dataset (and
    only .jpg/.jpeg/.png, hidden files included) where the pipeline needs a random-access path
    catalog.

Neither reader opens or stats the image files (437k stats on a network filesystem take
minutes): a missing or corrupt image is skipped and counted by the pipeline when it comes up.
"""
from __future__ import annotations

import dataclasses
import json
import operator
import os

import numpy as np

from pmsn_jax.data.interface import describe_labels

INAT_HOW_TO_GET = (
    "download the iNaturalist 2018 release (github.com/visipedia/inat_comp/tree/master/2018) "
    "and extract train_val2018.tar.gz, train2018.json.tar.gz and val2018.json.tar.gz into it"
)
# Split name -> annotation file. iNat 2018's test2018.json has no labels, so "test" means val.
_INAT_JSON = {"train": "train2018.json", "validation": "val2018.json", "val": "val2018.json",
              "test": "val2018.json"}
# What tf.io.decode_image decodes and make_views_encoded is written for (matched lower-cased).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")


@dataclasses.dataclass(frozen=True)
class ImageFiles:
  """paths str [N] (encoded JPEG/PNG/GIF/BMP files), labels int32 [N] in [0, num_classes).

  supercategories (optional) int32 [N] indexes supercategory_names; class_names (optional)
  names labels 0..num_classes-1. A DataSource of encoded images, read lazily.
  """

  paths: np.ndarray
  labels: np.ndarray
  num_classes: int
  supercategories: np.ndarray | None = None
  supercategory_names: tuple[str, ...] = ()
  class_names: tuple[str, ...] = ()
  random_access = True
  encoded = True
  channels = None
  where = "the split"

  def __post_init__(self):
    if self.paths.ndim != 1 or self.labels.shape != self.paths.shape:
      raise ValueError(f"paths and labels must be 1-D of one length, got {self.paths.shape} "
                       f"and {self.labels.shape}")
    if self.labels.dtype != np.int32:
      raise ValueError(f"labels must be int32, got {self.labels.dtype}")
    if len(self.labels) and not 0 <= self.labels.min() <= self.labels.max() < self.num_classes:
      raise ValueError(f"labels outside [0, {self.num_classes})")
    if self.supercategories is not None and self.supercategories.shape != self.labels.shape:
      raise ValueError("supercategories must have one entry per path")

  def __len__(self) -> int:
    return len(self.labels)

  def class_counts(self) -> np.ndarray:
    """Examples per class, int64 [num_classes] (zero-count classes included)."""
    return np.bincount(self.labels, minlength=self.num_classes)

  def subset(self, indices: np.ndarray) -> "ImageFiles":
    """The rows `indices` (a long-tailed subsample, a process shard), same classes."""
    supers = None if self.supercategories is None else self.supercategories[indices]
    return dataclasses.replace(self, paths=self.paths[indices], labels=self.labels[indices],
                               supercategories=supers)

  def describe(self, rows: np.ndarray) -> str:
    return describe_labels(self.labels[rows], self.num_classes)

  def records(self, start: int = 0, end: int | None = None):
    """(file bytes, label) of rows [start, end), each file read when its turn comes."""
    import tensorflow as tf  # Heavy; catalogs are built without it.

    ds = tf.data.Dataset.from_tensor_slices((self.paths[start:end], self.labels[start:end]))
    return ds.map(lambda path, label: (tf.io.read_file(path), label))

  def reader(self):
    import tensorflow as tf

    paths, labels = tf.constant(self.paths), tf.constant(self.labels)
    return lambda row: (tf.io.read_file(paths[row]), labels[row])

  def shard(self, index: int, count: int) -> "ImageFiles":
    """Process `index` of `count`'s rows (shard_rows)."""
    return self.subset(shard_rows(len(self), index, count))


def shard_rows(num_rows: int, index: int, count: int) -> np.ndarray:
  """Rows index, index + count, index + 2*count, ...: disjoint across the `count` shards,
  covering range(num_rows), sizes differing by at most one."""
  if count < 1 or not 0 <= index < count:
    raise ValueError(f"shard index {index} not in [0, {count})")
  return np.arange(index, num_rows, count)


def read_inat_json(root: str, split: str) -> ImageFiles:
  """iNaturalist 2018 `split` from ``<root>/{train,val}2018.json``, rows in image-id order.

  Labels are the JSON category_ids and num_classes is 1 + the largest id in `categories`, so
  train and val share one label space and classes with no images in a split count as zero.
  One json.load and numpy: the 437k-image train file parses in seconds.
  """
  if split not in _INAT_JSON:
    raise ValueError(f"inat_json splits are {sorted(_INAT_JSON)}, not {split!r} (test2018.json "
                     "has no labels, so 'test' reads val2018.json)")
  if not os.path.isdir(root):
    raise FileNotFoundError(f"iNaturalist 2018 directory {root} does not exist: {INAT_HOW_TO_GET}")
  path = os.path.join(root, _INAT_JSON[split])
  fix = f"re-extract {_INAT_JSON[split]}.tar.gz from the iNaturalist 2018 release into {root}"
  try:
    with open(path, "rb") as f:
      data = json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"{path} not found: {INAT_HOW_TO_GET}") from None
  except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
    raise ValueError(f"{path}: not valid JSON ({e}); {fix}") from None
  try:
    return _parse_inat(data, root, path, fix)
  except (KeyError, TypeError) as e:
    what = f"missing key {e}" if isinstance(e, KeyError) else str(e).splitlines()[0]
    raise ValueError(f"{path}: not an iNaturalist 2018 annotation file ({what}); {fix}") from None


def _parse_inat(data, root: str, path: str, fix: str) -> ImageFiles:
  """read_inat_json's parsed JSON -> ImageFiles. KeyError/TypeError: a malformed file."""
  images, annotations, categories = data["images"], data["annotations"], data["categories"]
  if not isinstance(images, list) or not isinstance(annotations, list):
    raise TypeError("'images' and 'annotations' must be lists")
  if not isinstance(categories, list) or not categories:
    raise TypeError("'categories' must be a non-empty list")

  cat_ids = np.array([c["id"] for c in categories])
  if cat_ids.dtype.kind not in "iu" or cat_ids.min() < 0:
    raise TypeError("category ids must be non-negative integers")
  if len(np.unique(cat_ids)) != len(cat_ids):
    raise TypeError("category ids repeat")
  num_classes = int(cat_ids.max()) + 1
  known = np.zeros(num_classes, bool)
  known[cat_ids] = True
  class_names = [""] * num_classes
  class_super = np.full(num_classes, -1, np.int32)
  super_of = [str(c["supercategory"]) for c in categories]
  super_names = tuple(sorted(set(super_of)))
  class_super[cat_ids] = np.searchsorted(super_names, super_of)
  for cid, c in zip(cat_ids.tolist(), categories):
    class_names[cid] = str(c["name"])

  if not images:
    raise ValueError(f"{path}: no images in this split; {fix}")
  n = len(images)
  ids = _ints(images, "id")
  order = np.argsort(ids, kind="stable")
  ids = ids[order]
  names = np.asarray(list(map(operator.itemgetter("file_name"), images)), dtype=str)[order]
  repeats = np.flatnonzero(ids[1:] == ids[:-1])
  if len(repeats):
    raise ValueError(f"{path}: image id {ids[repeats[0]]} appears twice in 'images'; {fix}")

  ann_image, ann_cat = _ints(annotations, "image_id"), _ints(annotations, "category_id")
  row = np.minimum(np.searchsorted(ids, ann_image), n - 1)
  unknown = np.flatnonzero(ids[row] != ann_image)
  if len(unknown):
    k = unknown[0]
    raise ValueError(f"{path}: annotation {annotations[k].get('id')} is for image id "
                     f"{ann_image[k]}, which is not in 'images'; {fix}")
  in_range = (ann_cat >= 0) & (ann_cat < num_classes)
  valid = in_range.copy()
  valid[in_range] = known[ann_cat[in_range]]
  if not valid.all():
    k = np.flatnonzero(~valid)[0]
    raise ValueError(f"{path}: annotation {annotations[k].get('id')} has category_id "
                     f"{ann_cat[k]}, which is not in 'categories'; {fix}")
  per_image = np.bincount(row, minlength=n)
  if (per_image != 1).any():
    i = np.flatnonzero(per_image != 1)[0]
    raise ValueError(f"{path}: image {ids[i]} ({names[i]}) has {per_image[i]} annotations, "
                     f"not one; {fix}")
  labels = np.empty(n, np.int32)
  labels[row] = ann_cat
  return ImageFiles(paths=np.strings.add(os.path.join(root, ""), names), labels=labels,
                    num_classes=num_classes, supercategories=class_super[labels],
                    supercategory_names=super_names, class_names=tuple(class_names))


def _ints(rows: list, key: str) -> np.ndarray:
  """row[key] for each row as int64, without a Python int list; TypeError if not integers."""
  try:
    return np.fromiter(map(operator.itemgetter(key), rows), np.int64, len(rows))
  except (ValueError, OverflowError) as e:
    raise TypeError(f"{key!r} must be integers ({e})") from None


def read_folder(root: str, split: str) -> ImageFiles:
  """``<root>/<split>/<class>/<image>``, or for split "train" also ``<root>/<class>/<image>``.

  Classes are the sorted class-folder names over all of root's split folders (labels their
  index), so splits label alike even where one lacks a class; an empty class folder is a
  zero-count class. Hidden files and folders are skipped; rows are in (class, file name) order.
  """
  layout = f"expected {root}/<split>/<class>/<image> (or {root}/<class>/<image> for 'train')"
  if not os.path.isdir(root):
    raise FileNotFoundError(f"image folder {root} does not exist: {layout}")
  base = os.path.join(root, split)
  if os.path.isdir(base):
    splits = _subdirs(root)
    classes = sorted(set().union(*(_subdirs(os.path.join(root, s)) for s in splits)))
  elif split == "train":
    base = root
    classes = _subdirs(root)
    split_like = sorted(set(classes) & {"val", "validation", "test"})
    if split_like:
      raise ValueError(f"{root}/train not found but {root} has split folders {split_like}: put "
                       f"the training images in {root}/train/<class>/<image>")
  else:
    raise FileNotFoundError(f"{base} not found: split {split!r} needs {base}/<class>/<image> "
                            f"(only 'train' may be {root}/<class>/<image>)")
  if not classes:
    raise ValueError(f"{base}: no class folders; {layout}")
  paths, labels = [], []
  for label, name in enumerate(classes):
    folder = os.path.join(base, name)
    if not os.path.isdir(folder):
      continue  # A class only other splits have.
    with os.scandir(folder) as entries:  # Names only: no per-file stat.
      files = sorted(e.name for e in entries
                     if not e.name.startswith(".") and e.name.lower().endswith(IMAGE_EXTENSIONS))
    paths += [os.path.join(folder, f) for f in files]
    labels += [label] * len(files)
  if not paths:
    raise ValueError(f"{base}: no {'/'.join(IMAGE_EXTENSIONS)} files in any of the "
                     f"{len(classes)} classes' folders; {layout}")
  return ImageFiles(paths=np.asarray(paths, dtype=str), labels=np.asarray(labels, np.int32),
                    num_classes=len(classes), class_names=tuple(classes))


def _subdirs(directory: str) -> list[str]:
  """Sorted names of `directory`'s non-hidden subfolders."""
  with os.scandir(directory) as entries:
    return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())
