"""Tests of pmsn_jax.data: IDX/TFDS sources, long-tail sampling, MSN views, and the
deterministic (seed, step) -> batch pipeline that exact resume relies on."""
import ast
import gzip
import itertools
import os
import pathlib

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from pmsn_jax.data import augment, eval_stream, pipeline, sampling, sources, view_format

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"


def write_idx(path, array):
  header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def view_cfg(**overrides):
  cfg = dict(image_size=8, focal_size=4, num_focal=2, mean=(0.5,), std=(0.25,))
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def tiny_dataset(n=10, size=8):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, [n, size, size, 1], dtype=np.uint8)
  return sources.LabelledImages(images, (np.arange(n) % 3).astype(np.int32), 3)


def take(iterator, n):
  return list(itertools.islice(iterator, n))


# --- sources -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["x-idx3-ubyte", "x-idx3-ubyte.gz"])
def test_read_idx_round_trip(tmp_path, name):
  array = np.random.default_rng(1).integers(0, 256, [3, 4, 5], dtype=np.uint8)
  write_idx(tmp_path / name, array)
  out = sources.read_idx(str(tmp_path / name))
  assert out.dtype == np.uint8 and np.array_equal(out, array)


def test_read_idx_big_endian_int32(tmp_path):
  values = np.array([1, -2, 70000], np.int32)
  (tmp_path / "i").write_bytes(bytes([0, 0, 0x0C, 1, 0, 0, 0, 3]) + values.astype(">i4").tobytes())
  out = sources.read_idx(str(tmp_path / "i"))
  assert out.dtype == np.int32 and out.dtype.isnative and list(out) == [1, -2, 70000]


@pytest.mark.parametrize("payload", [b"garbage!", bytes([0, 0, 8, 2, 0, 0, 0, 3, 0, 0, 0, 3, 1])])
def test_read_idx_corrupt(tmp_path, payload):
  path = tmp_path / "bad-idx3-ubyte"
  path.write_bytes(payload)
  with pytest.raises(ValueError, match=str(path)):
    sources.read_idx(str(path))
  gz = tmp_path / "bad.gz"
  gz.write_bytes(payload)  # Not gzip at all.
  with pytest.raises(ValueError, match=str(gz)):
    sources.read_idx(str(gz))


def test_load_source_idx_dir_and_env(tmp_path, monkeypatch):
  images = np.random.default_rng(2).integers(0, 256, [6, 5, 7], dtype=np.uint8)
  write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
  write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([0, 1, 2, 0, 1, 4]))
  data = sources.load_source(f"idx:{tmp_path}", "test")
  assert data.images.shape == (6, 5, 7, 1) and np.array_equal(data.images[..., 0], images)
  assert data.labels.dtype == np.int32 and data.num_classes == 5
  assert list(data.class_counts()) == [2, 2, 1, 0, 1]
  monkeypatch.setenv(sources.ENV_DIR, str(tmp_path))
  assert np.array_equal(sources.load_source("idx:", "test").labels, data.labels)
  with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.*apt-get"):
    sources.load_source(f"idx:{tmp_path}", "train")


def test_load_source_errors(tmp_path):
  missing = tmp_path / "nowhere"
  with pytest.raises(FileNotFoundError, match=f"{missing}.*dataset-fashion-mnist"):
    sources.load_source(f"idx:{missing}", "train")
  with pytest.raises(ValueError, match="unknown data source 'ftp:x'"):
    sources.load_source("ftp:x", "train")
  with pytest.raises(ValueError, match="splits"):
    sources.load_source(f"idx:{tmp_path}", "validation")


@pytest.mark.skipif(not os.path.isdir(DEBIAN_DIR), reason="dataset-fashion-mnist not installed")
def test_load_source_fashion_mnist():
  train = sources.load_source(f"idx:{DEBIAN_DIR}", "train")
  test = sources.load_source("idx:", "test")
  assert train.images.shape == (60000, 28, 28, 1) and train.images.dtype == np.uint8
  assert test.images.shape == (10000, 28, 28, 1)
  assert train.num_classes == test.num_classes == 10
  assert list(train.class_counts()) == [6000] * 10 and list(test.class_counts()) == [1000] * 10
  lt = sampling.long_tail_subset(train, 100, seed=0)
  assert list(lt.class_counts()) == sampling.long_tail_counts(6000, 10, 100)


@pytest.mark.skipif(not os.path.isdir(DEBIAN_DIR), reason="dataset-fashion-mnist not installed")
def test_pretraining_rows_follow_the_class_order():
  from configs import demo
  from pmsn_jax import train as train_lib
  config = demo.get_config()
  hard_tail = (0, 1, 3, 5, 7, 8, 9, 4, 2, 6)  # shirt, pullover, coat last
  config.data.class_order = hard_tail
  data, rows = train_lib.load_pretraining_data(config)
  counts = np.bincount(data.labels[rows], minlength=10)
  assert [counts[c] for c in hard_tail] == sampling.long_tail_counts(6000, 10, 100)
  config.data.class_order = tuple(range(11))
  with pytest.raises(ValueError, match="each of the 10 classes"):
    train_lib.load_pretraining_data(config)


@pytest.mark.skipif(not os.path.isdir(DEBIAN_DIR), reason="dataset-fashion-mnist not installed")
def test_imbalance_ratio_one_caps_every_class_at_max_per_class():
  from configs import demo
  from pmsn_jax import train as train_lib
  config = demo.get_config()
  config.data.imbalance_ratio, config.data.max_per_class = 1.0, 1489
  data, rows = train_lib.load_pretraining_data(config)
  assert np.bincount(data.labels[rows], minlength=10).tolist() == [1489] * 10
  assert np.all(np.diff(rows) > 0)
  for no_cap in (0, 7000):  # none, or one that no class reaches: the whole split
    config.data.max_per_class = no_cap
    assert np.array_equal(train_lib.load_pretraining_data(config)[1], np.arange(60000))


def test_load_source_tfds_mock():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=6):
    data = sources.load_source("tfds:fashion_mnist", "test", download=False)
  assert data.images.shape == (6, 28, 28, 1) and data.images.dtype == np.uint8
  assert data.labels.dtype == np.int32 and data.num_classes == 10


# --- sampling ----------------------------------------------------------------------------------

def test_long_tail_counts():
  counts = sampling.long_tail_counts(6000, 10, 100)
  assert counts == [6000, 3596, 2156, 1292, 774, 464, 278, 166, 100, 60]
  assert sum(counts) == 14886
  assert sampling.long_tail_counts(100, 3, 1.0) == [100, 100, 100]
  assert sampling.long_tail_counts(1000, 3, 10) == [1000, 316, 100]
  with pytest.raises(ValueError):
    sampling.long_tail_counts(6000, 10, 0.5)


def test_subsample_to_counts():
  labels = np.repeat(np.arange(4), 50)[np.random.default_rng(3).permutation(200)]
  counts = [50, 20, 5, 1]
  idx = sampling.subsample_to_counts(labels, counts, seed=7)
  assert np.all(np.diff(idx) > 0)
  assert list(np.bincount(labels[idx], minlength=4)) == counts
  assert np.array_equal(idx, sampling.subsample_to_counts(labels, counts, seed=7))
  assert not np.array_equal(idx, sampling.subsample_to_counts(labels, counts, seed=8))
  with pytest.raises(ValueError, match="class 2"):
    sampling.subsample_to_counts(labels, [1, 1, 51], seed=0)


# --- augment -----------------------------------------------------------------------------------

def test_make_views_shapes_and_determinism():
  cfg = view_cfg(image_size=28, focal_size=16, num_focal=6, mean=(0.286,), std=(0.353,))
  image = np.random.default_rng(4).integers(0, 256, [28, 28, 1], dtype=np.uint8)
  views = {k: v.numpy() for k, v in augment.make_views(image, [1, 2], cfg).items()}
  assert views["target"].shape == views["anchor"].shape == (28, 28, 1)
  assert views["focal"].shape == (6, 16, 16, 1)
  assert all(views[k].dtype == np.uint8 for k in ("target", "anchor", "focal"))
  assert views["photometric"].shape == (8, len(view_format.COLUMNS))
  assert views["photometric"].dtype == np.float32
  assert np.all((views["photometric"] >= 0) & (views["photometric"] < 1))
  assert not np.array_equal(views["target"], views["anchor"])  # Independent crops.
  again = augment.make_views(image, tf.constant([1, 2], tf.int64), cfg)
  other = augment.make_views(image, [1, 3], cfg)
  for k in views:
    assert np.array_equal(views[k], again[k].numpy())
    assert not np.array_equal(views[k], other[k].numpy())


@pytest.mark.parametrize("channels", [1, 3])
def test_make_views_tiny_image(channels):
  cfg = view_cfg(image_size=12, focal_size=6, num_focal=3, mean=(0.5,) * channels,
                 std=(0.2,) * channels, color_jitter_prob=1.0, blur_prob=1.0)
  image = np.random.default_rng(5).integers(0, 256, [5, 7, channels], dtype=np.uint8)
  views = augment.make_views(image, [0, 9], cfg)
  assert views["target"].shape == (12, 12, channels)
  assert views["focal"].shape == (3, 6, 6, channels)
  assert views["photometric"].shape == (5, len(view_format.COLUMNS))
  empty = augment.make_views(image, [0, 9], view_cfg(num_focal=0, mean=(0.5,), std=(0.2,)))
  assert empty["focal"].shape == (0, 4, 4, channels)


def test_make_views_batch_independent_of_batch():
  images = np.random.default_rng(6).integers(0, 256, [13, 10, 10, 3], dtype=np.uint8)
  seeds = np.stack([np.zeros(13, np.int64), np.arange(13)], 1)
  cfg = view_cfg(mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
  full = augment.make_views_batch(images, seeds, cfg)
  part = augment.make_views_batch(images[2:7], seeds[2:7], cfg)
  for k in full:
    assert np.array_equal(full[k].numpy()[2:7], part[k].numpy())


def test_eval_preprocess():
  cfg = view_cfg(image_size=28, mean=(0.5,), std=(0.25,), eval_crop_fraction=1.0)
  images = np.random.default_rng(7).integers(0, 256, [5, 28, 28, 1], dtype=np.uint8)
  out = augment.eval_preprocess(images[0], cfg).numpy()
  np.testing.assert_allclose(out, (images[0] / 255 - 0.5) / 0.25, atol=1e-5)
  data = sources.LabelledImages(images, np.arange(5, dtype=np.int32), 5)
  batches = list(eval_stream.eval_batches(data, cfg, local_batch=2))
  assert [b["image"].shape[0] for b in batches] == [2, 2, 2]  # padded to whole batches
  assert batches[0]["image"].dtype == np.float32
  rows = np.concatenate([b["row"] for b in batches])
  np.testing.assert_array_equal(rows, [0, 1, 2, 3, 4, -1])
  np.testing.assert_allclose(np.concatenate([b["image"] for b in batches])[:5],
                             (images / 255 - 0.5) / 0.25, atol=1e-5)
  small = augment.eval_preprocess(images[0, :20, :9], view_cfg(image_size=16))
  assert small.shape == (16, 16, 1)


# --- pipeline ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run():
  """The first 5 batches of a seed-3 run on the tiny dataset."""
  return take(pipeline.train_batches(tiny_dataset(), view_cfg(), global_batch_size=4, seed=3), 5)


def test_train_batches_shapes(run):
  batch = run[0]
  assert batch["target"].shape == batch["anchor"].shape == (4, 8, 8, 1)
  assert batch["focal"].shape == (4, 2, 4, 4, 1)
  assert batch["target"].dtype == batch["focal"].dtype == np.uint8
  assert batch["photometric"].shape == (4, 4, len(view_format.COLUMNS))
  assert batch["label"].dtype == np.int32 and batch["index"].dtype == np.int64
  assert np.array_equal(batch["label"], tiny_dataset().labels[batch["index"]])


def test_train_batches_deterministic_and_resumable(run):
  data, cfg = tiny_dataset(), view_cfg()
  again = take(pipeline.train_batches(data, cfg, global_batch_size=4, seed=3), 5)
  resumed = take(pipeline.train_batches(data, cfg, global_batch_size=4, seed=3, start_step=3), 2)
  other = next(pipeline.train_batches(data, cfg, global_batch_size=4, seed=4))
  for k in run[0]:
    for a, b in zip(run, again):
      assert np.array_equal(a[k], b[k]), k
    assert np.array_equal(run[3][k], resumed[0][k]) and np.array_equal(run[4][k], resumed[1][k])
  assert not np.array_equal(run[0]["target"], other["target"])


def test_train_batches_process_slices_make_the_global_batch():
  data, cfg = tiny_dataset(), view_cfg()
  whole = take(pipeline.train_batches(data, cfg, global_batch_size=6, seed=1, start_step=2), 3)
  slices = [take(pipeline.train_batches(data, cfg, global_batch_size=6, seed=1, start_step=2,
                                        process_index=p, process_count=2), 3) for p in (0, 1)]
  for step in range(3):
    assert slices[0][step]["index"].shape == (3,)
    for k in whole[step]:
      joined = np.concatenate([slices[0][step][k], slices[1][step][k]])
      assert np.array_equal(joined, whole[step][k]), (step, k)
  with pytest.raises(ValueError, match="multiple of process_count"):
    pipeline.train_batches(data, cfg, global_batch_size=5, seed=0, process_count=2)


def test_train_batches_epochs_cover_every_row_once():
  data = tiny_dataset(n=10)
  batches = take(pipeline.train_batches(data, view_cfg(), global_batch_size=4, seed=0), 10)
  stream = np.concatenate([b["index"] for b in batches])  # 40 positions = 4 epochs.
  epochs = stream.reshape(4, 10)
  for epoch in epochs:
    assert sorted(epoch) == list(range(10))
  assert len({tuple(e) for e in epochs}) > 1  # Each epoch its own permutation.


def test_data_package_never_imports_jax_or_models():
  for path in pathlib.Path(sources.__file__).parent.glob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
               [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
      for name in names:
        assert not name.startswith(("jax", "flax", "pmsn_jax.models")), (path, name)
