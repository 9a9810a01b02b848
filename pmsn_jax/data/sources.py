"""Where images come from: small labelled image sets held fully in memory as numpy.

Why this module exists: the training pipeline (pipeline.py) makes each batch a pure function of
(seed, step), which needs random access to every example. For MNIST-sized data the simplest random
access source is a pair of in-memory arrays, so every source here returns a `LabelledImages`.

Sources (the `--config.data.source` string):
  * ``idx:<dir>`` reads the MNIST IDX files ``<dir>/{train,t10k}-{images-idx3,labels-idx1}-ubyte``
    (``.gz`` or plain). ``idx:`` alone searches $PMSN_FASHION_MNIST_DIR, then the Debian
    package's /usr/share/datasets/fashion-mnist. This works offline.
  * ``tfds:<name>[:<split>]`` loads a TFDS dataset fully into memory. Only for
    small datasets (mnist, fashion_mnist, cifar10...): large long-tailed sets such as
    iNaturalist 2018 need a streaming, file-sharded source that comes later.
"""
from __future__ import annotations

import dataclasses
import gzip
import os

import numpy as np

ENV_DIR = "PMSN_FASHION_MNIST_DIR"
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
HOW_TO_GET = (
    "apt-get install -y dataset-fashion-mnist, or set PMSN_FASHION_MNIST_DIR to a directory with "
    "the IDX files, or use --config.data.source=tfds:fashion_mnist where the network allows"
)
_IDX_PREFIX = {"train": "train", "test": "t10k"}
# IDX type byte -> numpy dtype (multi-byte types are big-endian).
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8"),
}


@dataclasses.dataclass(frozen=True)
class LabelledImages:
  """Images uint8 [N, H, W, C], labels int32 [N] in [0, num_classes)."""

  images: np.ndarray
  labels: np.ndarray
  num_classes: int

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

  def subset(self, indices: np.ndarray) -> "LabelledImages":
    """The rows `indices` (e.g. a long-tailed subsample), same num_classes."""
    return LabelledImages(self.images[indices], self.labels[indices], self.num_classes)


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


def load_source(source: str, split: str, *, data_dir: str | None = None,
                download: bool = True) -> LabelledImages:
  """Loads `split` ("train" or "test") of `source` ("idx:<dir>" or "tfds:<name>[:<split>]").

  `data_dir` and `download` are passed to tfds.load (ignored for idx sources).
  """
  scheme, sep, rest = source.partition(":")
  if scheme == "idx" and sep:
    return _load_idx(rest, split)
  if scheme == "tfds" and sep and rest:
    return _load_tfds(rest, split, data_dir=data_dir, download=download)
  raise ValueError(f"unknown data source {source!r}: use 'idx:<dir>' (or 'idx:' for the default "
                   f"Fashion-MNIST search path) or 'tfds:<name>[:<split>]'")


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


def _load_tfds(spec: str, split: str, *, data_dir: str | None, download: bool) -> LabelledImages:
  import tensorflow_datasets as tfds  # Heavy import, only for this source.

  name, _, tfds_split = spec.partition(":")
  try:
    ds, info = tfds.load(name, split=tfds_split or split, as_supervised=True, with_info=True,
                         try_gcs=False, download=download, data_dir=data_dir)
  except Exception as e:  # Offline/missing data: keep the original error, add the way out.
    e.add_note(f"loading tfds:{spec} failed; offline, use idx: with {HOW_TO_GET}")
    raise
  # Batched reads rather than batch_size=-1, which needs a known split size (mocks lack it).
  chunks = list(ds.batch(4096).as_numpy_iterator())
  images = np.concatenate([c[0] for c in chunks]) if chunks else np.zeros([0, 1, 1, 1])
  labels = np.concatenate([c[1] for c in chunks]) if chunks else np.zeros([0])
  if images.ndim == 3:
    images = images[..., None]
  return LabelledImages(np.asarray(images, np.uint8), np.asarray(labels, np.int32),
                        int(info.features["label"].num_classes))
