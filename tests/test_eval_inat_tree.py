"""The evaluation suite end to end on iNaturalist-shaped data, on the 8 fake CPU devices:
train a tiny model for a few steps on a format-faithful iNat 2018 tree (inat_json:, long-tailed,
odd image sizes, a corrupt file) and on the TFDS iNat18 mock, then the whole suite.

What must hold: training starts without reading an evaluation image; the suite streams both
splits, keeps the train features sharded, and its k-NN equals brute force on features computed
independently on one device from the export.
"""
import json

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import demo
from pmsn_jax import checkpoint, evaluate, sharding, train
from pmsn_jax.data import sources
from pmsn_jax.evals import classwise, features, knn
from tests.inat_fixture import make_inat_tree

NUM_CLASSES = 24
# Long-tailed, 6 to 300 images a class (2,018 in all): enough for 5-shot low-shot everywhere.
COUNTS = [max(6, int(300 * (c + 1) ** -1.3)) for c in range(NUM_CLASSES)]


def tiny_config(source, test_split):
  c = demo.get_config("smoke")
  c.data.source, c.data.test_split = source, test_split
  c.data.channels, c.data.image_size, c.data.focal_size = 3, 16, 8
  c.data.mean, c.data.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
  c.data.eval_crop_fraction = 0.875
  c.data.imbalance_ratio, c.data.max_per_class = 1.0, 0  # the tree is long-tailed already
  c.model.variant = "mu/4"
  c.batch_size, c.total_steps, c.log_every_steps, c.checkpoint_every_steps = 16, 2, 1, 2
  c.optim.warmup_steps = 1
  c.eval.batch_size, c.eval.linear_batch_size, c.eval.linear_epochs = 64, 64, 2
  c.eval.max_train_examples = c.eval.max_test_examples = 0
  c.eval.knn_k, c.eval.shot_thresholds = 5, (100, 20)
  c.eval.lowshot_splits = 2
  return c


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  root = tmp_path_factory.mktemp("inat")
  expected = make_inat_tree(root, COUNTS, val_per_class=3, corrupt=[("train", 7)], seed=2,
                            sizes=(12, 40))
  return str(root), expected


@pytest.mark.parametrize("protocol", ["features", "msn"])
def test_suite_on_an_inat_tree(tree, tmp_path, monkeypatch, protocol):
  root, expected = tree
  config = tiny_config(f"inat_json:{root}", "val")
  config.eval.linear_protocol = protocol
  steps_done = []
  real_extract = features.extract

  def extract(*args, **kwargs):  # records how far training was when an eval image was read
    steps_done.append(train.checkpoint_steps(str(tmp_path)))
    return real_extract(*args, **kwargs)

  monkeypatch.setattr(features, "extract", extract)
  result = train.train_and_evaluate(config, str(tmp_path))
  assert steps_done and all(s == [2] for s in steps_done)  # only after the last step

  # The result: all evaluators, over 24 classes; the corrupt file left out of the counts.
  train_split = sources.load_source(f"inat_json:{root}", "train")
  assert result["pretrain_class_counts"] == np.bincount(
      np.delete(train_split.labels, _row_of(train_split, expected["train"]["corrupt"][0])),
      minlength=NUM_CLASSES).tolist()
  assert len(result["per_class_top1"]) == NUM_CLASSES
  assert set(result["lowshot"]) == {"1", "2", "5"}
  for key in ("knn_top1", "knn_lt_top1", "linear_top1", "random_init_knn_top1"):
    assert 0 <= result[key] <= 1, key
  assert json.loads((tmp_path / "eval.json").read_text())["knn_top1"] == result["knn_top1"]

  # Independent check of the sharded k-NN: the export's features on ONE device, brute force.
  mesh = sharding.make_mesh((("data", -1),), jax.devices()[:1])
  encode = evaluate.pixel_encoder(checkpoint.load_encoder(str(tmp_path / "export")),
                                  config.data, mesh)
  bank = features.extract({"e": encode}, train_split, config, mesh)["e"].to_host()
  test = features.extract({"e": encode}, sources.load_source(f"inat_json:{root}", "val"),
                          config, mesh)["e"].to_host()
  pred = knn.knn_classify(bank[0], bank[1], test[0], num_classes=NUM_CLASSES, k=5)
  assert classwise.top1(pred, test[1]) == pytest.approx(result["knn_top1"], abs=1e-12)


def test_suite_on_the_tfds_inat18_mock(tmp_path):
  config = tiny_config("tfds:i_naturalist2018", "validation")
  config.eval.max_train_examples, config.eval.max_test_examples = 128, 64
  config.eval.lowshot_shots = ()  # 8142 classes: no 1-shot set in 128 images
  with tfds.testing.mock_data(num_examples=128):
    result = train.train_and_evaluate(config, str(tmp_path))
  assert len(result["per_class_top1"]) == 8142
  assert sum(result["pretrain_class_counts"]) == 128
  for key in ("knn_top1", "knn_lt_top1", "linear_top1"):
    assert 0 <= result[key] <= 1, key


def _row_of(data, path):
  return int(np.flatnonzero(data.paths == path)[0])
