"""Encoded-image sources through the whole training pipeline: a synthetic iNat-format tree
(random JPEGs, never real iNat images), TFDS's i_naturalist2018 mock, corrupt files, the fused
JPEG decode, the skewed sampler and `pmsn_jax.data.inspect`."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import common
from pmsn_jax.data import augment, catalog, eval_stream, imbalanced, pipeline, sources
from tests import inat_fixture

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COUNTS = [9, 5, 3, 2, 1, 0]  # long-tailed, one empty class


def small_views(num_focal=2):
  cfg = common.get_base_config().data
  cfg.image_size, cfg.focal_size, cfg.num_focal, cfg.channels = 32, 16, num_focal, 3
  return cfg


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  root = tmp_path_factory.mktemp("inat")
  expected = inat_fixture.make_inat_tree(root, COUNTS, corrupt=[("train", 4)], sizes=(5, 49))
  return str(root), expected


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_inat_tree_through_the_pipeline(tree):
  root, expected = tree
  data = sources.load_source(f"inat_json:{root}", "train")
  assert np.array_equal(data.labels, expected["train"]["labels"])
  cfg = small_views()
  batches = take(pipeline.train_batches(data, cfg, global_batch_size=4, seed=3), 5)
  for b in batches:
    assert b["target"].shape == (4, 32, 32, 3) and b["anchor"].shape == (4, 32, 32, 3)
    assert b["focal"].shape == (4, 2, 16, 16, 3)
    assert b["target"].dtype == b["focal"].dtype == np.uint8
    assert b["target"].std() > 10  # the images' content, not a constant fill
    assert np.array_equal(b["label"], data.labels[b["index"]])
  # 20 positions = one epoch of 20 rows: the corrupt row was replaced and counted, once.
  skipped = sum(int(b["skipped"].sum()) for b in batches)
  bad_row = int(np.flatnonzero(data.paths == expected["train"]["corrupt"][0])[0])
  seen = np.concatenate([b["index"] for b in batches])
  assert skipped == 1 and bad_row not in seen


def test_file_pipeline_resumes_and_slices_exactly(tree):
  root, _ = tree
  data = sources.load_source(f"inat_json:{root}", "train")
  cfg = small_views(num_focal=1)
  straight = take(pipeline.train_batches(data, cfg, global_batch_size=4, seed=0), 6)
  resumed = take(pipeline.train_batches(data, cfg, global_batch_size=4, seed=0, start_step=4), 2)
  for a, b in zip(straight[4:], resumed):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  halves = [next(pipeline.train_batches(data, cfg, global_batch_size=4, seed=0, start_step=1,
                                        process_index=p, process_count=2)) for p in range(2)]
  for key in straight[1]:
    np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), straight[1][key])


def test_fused_jpeg_decode_matches_full_decode():
  rng = np.random.default_rng(0)
  smooth = tf.image.resize(rng.uniform(0, 255, (1, 12, 9, 3)), [240, 170]).numpy()[0]
  encoded = tf.io.encode_jpeg(smooth.astype(np.uint8), quality=95)
  full = tf.io.decode_jpeg(encoded, channels=3)
  cfg = small_views(num_focal=4)
  for seed in range(4):
    fused = augment.make_views_encoded(encoded, [seed, 1], cfg, 3)
    reference = augment.make_views(full, tf.constant([seed, 1], tf.int64), cfg)
    for key in ("target", "anchor", "focal"):
      np.testing.assert_allclose(fused[key], reference[key], atol=1e-4)


def test_tiny_and_grayscale_images_are_handled():
  cfg = small_views()
  for shape in [(5, 7, 1), (49, 6, 3), (1, 1, 3)]:
    image = np.random.default_rng(1).integers(0, 255, shape, np.uint8)
    for encoded in (tf.io.encode_jpeg(image), tf.io.encode_png(image)):
      views = augment.make_views_encoded(encoded, [0, 0], cfg, 3)
      assert views["target"].shape == (32, 32, 3) and views["focal"].shape == (2, 16, 16, 3)


def test_tfds_inaturalist_mock_through_the_pipeline():
  cfg = small_views()
  with tfds.testing.mock_data(num_examples=12):
    data = sources.load_source("tfds:i_naturalist2018", "train")
    assert isinstance(data, sources.TfdsImages) and data.num_classes == 8142
    batches = take(pipeline.train_batches(data, cfg, global_batch_size=4, seed=0), 4)
    resumed = next(pipeline.train_batches(data, cfg, global_batch_size=4, seed=0, start_step=2))
    evaluation = list(eval_stream.eval_batches(data, cfg, local_batch=2, max_examples=5))
    with pytest.raises(ValueError, match="of unknown size; .*max_\\*_examples"):
      eval_stream.eval_split_size(data)  # mock data has no split sizes: a cap is needed
  for b in batches:
    assert b["target"].shape == (4, 32, 32, 3) and b["focal"].shape == (4, 2, 16, 16, 3)
    assert b["label"].dtype == np.int32 and np.all((0 <= b["label"]) & (b["label"] < 8142))
    assert np.all(b["skipped"] == 0)
  for key in resumed:
    np.testing.assert_array_equal(resumed[key], batches[2][key])
  assert [b["image"].shape for b in evaluation] == [(2, 32, 32, 3)] * 3
  assert np.concatenate([b["row"] for b in evaluation]).tolist() == [0, 1, 2, 3, 4, -1]


def test_eval_stream_splits_rows_over_processes_and_drops_corrupt_ones(tree):
  root, expected = tree
  data = sources.load_source(f"inat_json:{root}", "train")
  bad_row = int(np.flatnonzero(data.paths == expected["train"]["corrupt"][0])[0])
  streams = [list(eval_stream.eval_batches(data, small_views(), local_batch=4, process_index=p,
                                        process_count=3)) for p in range(3)]
  # Every process yields the same number of batches (its encoder calls are collective).
  assert len({len(s) for s in streams}) == 1
  assert len(streams[0]) == eval_stream.eval_num_batches(len(data), 4, 3)
  rows = [np.concatenate([b["row"] for b in s]) for s in streams]
  labels = [np.concatenate([b["label"] for b in s]) for s in streams]
  for p in range(3):  # contiguous blocks in row order; -1 for padding and the corrupt file
    start, end = eval_stream.eval_block(len(data), p, 3)
    real = rows[p][rows[p] >= 0]
    assert real.tolist() == [r for r in range(start, end) if r != bad_row]
    np.testing.assert_array_equal(labels[p][rows[p] >= 0], data.labels[real])
  assert sorted(np.concatenate(rows)[np.concatenate(rows) >= 0].tolist()) == [
      r for r in range(len(data)) if r != bad_row]
  capped = list(eval_stream.eval_batches(data, small_views(), local_batch=4, max_examples=6))
  first_six = [r for r in range(6) if r != bad_row]
  assert np.concatenate([b["row"] for b in capped]).tolist() == (
      first_six + [-1] * (8 - len(first_six)))


def test_skewed_batches_keep_the_epoch_balanced():
  labels = np.repeat(np.arange(4), 16).astype(np.int32)
  data = sources.LabelledImages(np.zeros([64, 8, 8, 1], np.uint8), labels, 4)
  cfg = common.get_base_config().data
  cfg.image_size, cfg.focal_size, cfg.num_focal = 8, 4, 0
  cfg.mean, cfg.std = (0.5,), (0.5,)
  seen = {}
  for skew in (0.0, 1.0):
    it = pipeline.train_batches(data, cfg, global_batch_size=16, seed=0, batch_class_skew=skew)
    seen[skew] = np.concatenate([b["label"] for b in take(it, 4)])  # one epoch
    assert np.array_equal(np.bincount(seen[skew], minlength=4), [16] * 4)
  assert imbalanced.batch_class_skew(seen[1.0], 16) > 0.9
  assert imbalanced.batch_class_skew(seen[0.0], 16) < 0.6


def run_inspect(*args):
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
  return subprocess.run([sys.executable, "-m", "pmsn_jax.data.inspect", *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=120)


def test_inspect_prints_exact_counts_and_corrupt_images(tree):
  root, expected = tree
  done = run_inspect(f"--source=inat_json:{root}")
  assert done.returncode == 0, done.stderr
  result = json.loads(done.stdout.strip().splitlines()[-1])
  assert result["num_examples"] == sum(COUNTS) and result["num_classes"] == len(COUNTS)
  assert result["class_counts"] == {str(c): n for c, n in enumerate(COUNTS)}
  assert result["empty_classes"] == 1 and result["skipped_corrupt"] == 1
  val = json.loads(run_inspect(f"--source=inat_json:{root}", "--split=val",
                               "--nocheck_images").stdout.strip().splitlines()[-1])
  assert val["num_examples"] == 5 and val["skipped_corrupt"] is None


@pytest.mark.parametrize("source", ["inat_json:/no/such/dir", "folder:/no/such/dir", "ftp:x"])
def test_inspect_bad_source_is_one_line(source):
  done = run_inspect(f"--source={source}")
  assert done.returncode == 2 and done.stdout == ""
  assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith("error: ")


def test_shard_rows_cover_disjointly():
  for hosts in (1, 2, 3):
    shards = [catalog.shard_rows(20, p, hosts) for p in range(hosts)]
    assert sorted(np.concatenate(shards).tolist()) == list(range(20))
