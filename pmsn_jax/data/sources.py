"""Where images come from: one `load_source(source, split)` for every source string.

Why three kinds of result: the training pipeline makes each batch a pure function of
(seed, step), which needs random access to every example where that is affordable:
  * `LabelledImages`: small fixed-size datasets held in memory as uint8 arrays (Fashion-MNIST,
    CIFAR...), augmented a whole batch at a time;
  * `catalog.ImageFiles`: image files on disk or a bucket, as (path, label) rows, each read
    and decoded (only the crop's window, for JPEGs) when its turn comes;
  * `TfdsImages`: TFDS splits of variable-size images (iNaturalist 2018, ImageNet...), which
    TFDS stores as sequential record files: streamed, each process reading its own even split.
All three implement interface.DataSource, which the pipeline, train loop and evaluation call
(they branch on its declared capabilities, random_access and encoded, not on the class).

Source strings (`--config.data.source`):
  * ``idx:<dir>``: MNIST IDX files ``<dir>/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``;
    ``idx:`` alone searches $PMSN_FASHION_MNIST_DIR, then Debian's
    /usr/share/datasets/fashion-mnist. Works offline.
  * ``tfds:<name>[:<split>]``: any TFDS dataset with ``image`` and ``label`` features, read from
    ``data_dir`` (a local folder or gs:// bucket). Fixed-size images up to _IN_MEMORY_BYTES are
    loaded into memory; anything else is streamed.
  * ``inat_json:<root>``: the original iNaturalist 2018 release (catalog.read_inat_json).
  * ``folder:<root>``: ``<root>[/<split>]/<class>/*.jpg|png|...`` (catalog.read_folder).
"""
from __future__ import annotations

import dataclasses
import gzip
import os

import numpy as np

from pmsn_jax.data import catalog
from pmsn_jax.data.interface import DataSource, describe_labels, refuse_random_access

ENV_DIR = "PMSN_FASHION_MNIST_DIR"
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
HOW_TO_GET = (
    "apt-get install -y dataset-fashion-mnist, or set PMSN_FASHION_MNIST_DIR to a directory with "
    "the IDX files, or use --config.data.source=tfds:fashion_mnist after `tfds build "
    "fashion_mnist` where the network allows"
)
_IDX_PREFIX = {"train": "train", "test": "t10k"}
_IN_MEMORY_BYTES = 2 << 30  # Larger TFDS splits, or variable-size images, are streamed.
SOURCE_FORMS = ("idx:<dir>", "tfds:<name>[:<split>]", "inat_json:<root>", "folder:<root>")
# IDX type byte -> numpy dtype (multi-byte types are big-endian).
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8"),
}


@dataclasses.dataclass(frozen=True)
class LabelledImages:
  """Images uint8 [N, H, W, C], labels int32 [N] in [0, num_classes). A DataSource."""

  images: np.ndarray
  labels: np.ndarray
  num_classes: int
  random_access = True
  encoded = False
  where = "the split"

  def __post_init__(self):
    if self.images.ndim != 4 or self.images.dtype != np.uint8:
      raise ValueError(f"images must be uint8 [N,H,W,C], got {self.images.dtype} "
                       f"{self.images.shape}")
    if self.labels.shape != self.images.shape[:1] or self.labels.dtype != np.int32:
      raise ValueError(f"labels must be int32 [{len(self.images)}], got "
                       f"{self.labels.dtype} {self.labels.shape}")
    if len(self.labels) and not 0 <= self.labels.min() <= self.labels.max() < self.num_classes:
      raise ValueError(f"labels outside [0, {self.num_classes})")

  def __len__(self) -> int:
    return len(self.labels)

  def class_counts(self) -> np.ndarray:
    """Examples per class, int64 [num_classes]."""
    return np.bincount(self.labels, minlength=self.num_classes)

  @property
  def channels(self) -> int:
    return self.images.shape[-1]

  def subset(self, indices: np.ndarray) -> "LabelledImages":
    """The rows `indices` (e.g. a long-tailed subsample), same num_classes."""
    return LabelledImages(self.images[indices], self.labels[indices], self.num_classes)

  def describe(self, rows: np.ndarray) -> str:
    return describe_labels(self.labels[rows], self.num_classes)

  def records(self, start: int = 0, end: int | None = None):
    """(uint8 image [H,W,C], label) of rows [start, end)."""
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices((self.images[start:end], self.labels[start:end]))

  def reader(self):
    import tensorflow as tf

    images, labels = tf.constant(self.images), tf.constant(self.labels)
    return lambda rows: (tf.gather(images, rows), tf.gather(labels, rows))


def read_idx(path: str) -> np.ndarray:
  """Reads an MNIST IDX file (optionally gzipped) into a native-endian numpy array."""
  opener = gzip.open if str(path).endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      raw = f.read()
  except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError.
    raise ValueError(f"{path}: not a readable IDX file ({e})") from e
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
    raise ValueError(f"{path}: bad IDX magic number {raw[:4].hex()!r}")
  dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
  header = 4 + 4 * ndim
  if ndim == 0 or len(raw) < header:
    raise ValueError(f"{path}: truncated IDX header ({ndim} dims)")
  dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
  expected = header + int(np.prod(dims)) * dtype.itemsize
  if len(raw) != expected:
    raise ValueError(f"{path}: IDX dims {dims} need {expected} bytes, file has {len(raw)}")
  data = np.frombuffer(raw, dtype, offset=header).reshape(dims)
  return data.astype(dtype.newbyteorder("="))


@dataclasses.dataclass(frozen=True)
class TfdsImages:
  """A TFDS split streamed with its images still encoded (decoded by the pipeline's views): a
  DataSource without random access.

  num_examples, num_classes come from the dataset's metadata, so building one reads no data.
  """

  name: str
  split: str
  data_dir: str | None
  num_examples: int
  num_classes: int
  random_access = False
  encoded = True
  channels = None

  def __len__(self) -> int:
    return self.num_examples

  @property
  def where(self) -> str:
    return f"tfds:{self.name} split {self.split!r}"

  def describe(self, rows=None) -> str:
    """Its size only: class counts would take a pass over the split."""
    del rows  # A streamed split pretrains on all its rows.
    return (f"{len(self) or 'all'} images of tfds:{self.name}:{self.split} (class counts: "
            f"python -m pmsn_jax.data.inspect --source=tfds:{self.name})")

  def subset(self, rows: np.ndarray):
    raise refuse_random_access(self.where, "a subset of rows")

  def reader(self):
    raise refuse_random_access(self.where, "reading rows by index")

  def records(self, start: int = 0, end: int | None = None):
    """(image bytes, label) of rows [start, end) in order; the whole split when unbounded
    (its size may be unknown)."""
    if start == 0 and end is None:
      return self.as_dataset()
    return self.as_dataset(rows=(start, len(self) if end is None else end))

  def as_dataset(self, process_index: int = 0, process_count: int = 1, *,
                 shuffle_seed: int | None = None, rows: tuple[int, int] | None = None):
    """(image bytes, label) of this process's even split, in a fixed order unless
    shuffle_seed (shuffles the order of the record files, deterministically); or, with
    rows=(start, end), of those rows of the split in order (only their records are read)."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    split = self.split
    if rows is not None:
      start, end = rows
      if "[" not in split:
        split = f"{split}[{start}:{end}]"
      elif start or end != self.num_examples:  # "train[:10%]" cannot be sliced again
        raise ValueError(f"cannot read rows {start}-{end} of the sliced TFDS split "
                         f"{self.split!r}: name a whole split (and cap it with "
                         f"--config.eval.max_*_examples)")
    elif process_count > 1:  # Row-level slices: each process reads only its rows' records.
      split = tfds.even_splits(split, n=process_count, drop_remainder=True)[process_index]
    builder = tfds.builder(self.name, data_dir=self.data_dir, try_gcs=False)
    read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed)
    ds = builder.as_dataset(split=split, shuffle_files=shuffle_seed is not None,
                            read_config=read_config,
                            decoders={"image": tfds.decode.SkipDecoding()})
    ds = ds.map(lambda ex: (ex["image"], tf.cast(ex["label"], tf.int32)))
    return ds if rows is None else ds.take(rows[1] - rows[0])  # (mock data ignores slices)

  def shard_size(self, process_count: int) -> int:
    return self.num_examples // process_count if process_count > 1 else self.num_examples

  def class_counts(self) -> np.ndarray:
    """Examples per class from one pass over the labels (images are not decoded)."""
    counts = np.zeros([self.num_classes], np.int64)
    for labels in self.as_dataset().map(lambda _, y: y).batch(4096).as_numpy_iterator():
      counts += np.bincount(labels, minlength=self.num_classes)
    return counts


def load_source(source: str, split: str, *, data_dir: str | None = None,
                download: bool = False) -> DataSource:
  """Loads `split` of `source` (see the module docstring) -> LabelledImages, ImageFiles or
  TfdsImages. `data_dir` and `download` are for TFDS sources only."""
  scheme, sep, rest = source.partition(":")
  if scheme == "idx" and sep:
    return _load_idx(rest, split)
  if scheme == "tfds" and sep and rest:
    return _load_tfds(rest, split, data_dir=data_dir, download=download)
  if scheme == "inat_json" and rest:
    return catalog.read_inat_json(rest, split)
  if scheme == "folder" and rest:
    return catalog.read_folder(rest, split)
  raise ValueError(f"unknown data source {source!r}: use one of {', '.join(SOURCE_FORMS)} "
                   f"('idx:' alone finds the demo's Fashion-MNIST)")


def _find_idx_dir(directory: str) -> str:
  if directory:
    if not os.path.isdir(directory):
      raise FileNotFoundError(f"data directory {directory} does not exist: {HOW_TO_GET}")
    return directory
  candidates = [d for d in (os.environ.get(ENV_DIR), DEBIAN_DIR) if d]
  for d in candidates:
    if os.path.isdir(d):
      return d
  raise FileNotFoundError(f"no Fashion-MNIST directory found (tried {', '.join(candidates)}): "
                          f"{HOW_TO_GET}")


def _idx_file(directory: str, stem: str) -> str:
  for name in (f"{stem}.gz", stem):
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(f"{os.path.join(directory, stem)}[.gz] not found: {HOW_TO_GET}")


def _load_idx(directory: str, split: str) -> LabelledImages:
  if split not in _IDX_PREFIX:
    raise ValueError(f"idx sources have splits {sorted(_IDX_PREFIX)}, not {split!r}")
  directory = _find_idx_dir(directory)
  prefix = _IDX_PREFIX[split]
  images_path = _idx_file(directory, f"{prefix}-images-idx3-ubyte")
  labels_path = _idx_file(directory, f"{prefix}-labels-idx1-ubyte")
  images, labels = read_idx(images_path), read_idx(labels_path)
  if images.ndim != 3 or images.dtype != np.uint8:
    raise ValueError(f"{images_path}: expected uint8 [N,H,W] images, got {images.dtype} "
                     f"{images.shape}")
  if labels.ndim != 1 or len(labels) != len(images):
    raise ValueError(f"{labels_path}: expected {len(images)} labels, got {labels.shape}")
  labels = labels.astype(np.int32)
  num_classes = int(labels.max()) + 1 if len(labels) else 0
  return LabelledImages(images[..., None], labels, num_classes)


def _load_tfds(spec: str, split: str, *, data_dir: str | None, download: bool):
  import tensorflow_datasets as tfds  # Heavy import, only for this source.

  name, _, tfds_split = spec.partition(":")
  split = tfds_split or split
  try:
    builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
    if download:
      builder.download_and_prepare()
    info = builder.info
  except Exception as e:  # Unknown name, unreadable data_dir...: keep the error, add the way out.
    e.add_note(f"loading tfds:{spec} failed; offline, use idx: with {HOW_TO_GET}")
    raise
  features = info.features
  if "image" not in features or "label" not in features:
    raise ValueError(f"tfds:{name} has features {sorted(features)}; pmsn_jax needs 'image' and "
                     f"'label'")
  num_classes = int(features["label"].num_classes)
  shape = tuple(features["image"].shape)
  splits = info.splits
  num_examples = splits[split].num_examples if split in splits else 0
  if not num_examples and not _has_mock_data(builder):
    raise FileNotFoundError(
        f"tfds:{name} split {split!r} is not prepared under "
        f"{data_dir or tfds.core.constants.DATA_DIR}: prepare it first (`tfds build {name}` "
        f"where the network allows; iNat18 offline: docs/data.md), or set "
        f"--config.data.data_dir to where it is")
  if None in shape or num_examples * int(np.prod(shape)) > _IN_MEMORY_BYTES:
    return TfdsImages(name, split, data_dir, num_examples, num_classes)
  ds = builder.as_dataset(split=split, as_supervised=True)
  # Batched reads rather than batch_size=-1, which needs a known split size (mocks lack it).
  chunks = list(ds.batch(4096).as_numpy_iterator())
  images = np.concatenate([c[0] for c in chunks]) if chunks else np.zeros([0, 1, 1, 1])
  labels = np.concatenate([c[1] for c in chunks]) if chunks else np.zeros([0])
  if images.ndim == 3:
    images = images[..., None]
  return LabelledImages(np.asarray(images, np.uint8), np.asarray(labels, np.int32), num_classes)


def _has_mock_data(builder) -> bool:
  """Under tfds.testing.mock_data a builder has no prepared splits yet reads fine."""
  return type(builder).as_dataset.__module__.startswith("tensorflow_datasets.testing")
