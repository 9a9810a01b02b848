"""Every data source implements interface.DataSource, and the members agree across kinds."""

import os

import numpy as np
import pytest
import tensorflow as tf

from pmsn_jax.data import catalog, eval_stream, interface, sources

MEMBERS = ("num_classes", "random_access", "encoded", "channels", "where", "__len__",
           "class_counts", "subset", "describe", "records", "reader")


@pytest.fixture
def pair(tmp_path):
  """The same 5 RGB images and labels in memory and as PNG files (lossless)."""
  images = np.random.default_rng(0).integers(0, 256, (5, 6, 7, 3), np.uint8)
  labels = np.array([2, 0, 2, 1, 0], np.int32)
  paths = []
  for i, image in enumerate(images):
    paths.append(os.path.join(tmp_path, f"{i}.png"))
    tf.io.write_file(paths[-1], tf.io.encode_png(image))
  return (sources.LabelledImages(images, labels, 4),
          catalog.ImageFiles(np.asarray(paths), labels, 4))


def streamed():
  return sources.TfdsImages("i_naturalist2018", "train", None, 0, 8142)  # reads nothing


def test_every_source_has_the_interface_members(pair):
  for data in (*pair, streamed()):
    assert isinstance(data, interface.DataSource)
    assert all(hasattr(data, m) for m in MEMBERS)
  arrays, files = pair
  assert (arrays.random_access, arrays.encoded, arrays.channels) == (True, False, 3)
  assert (files.random_access, files.encoded, files.channels) == (True, True, None)
  tfds_split = streamed()
  assert (tfds_split.random_access, tfds_split.encoded, tfds_split.channels) == (
      False, True, None)
  assert tfds_split.where == "tfds:i_naturalist2018 split 'train'"


def test_records_give_the_same_pixels_and_labels(pair):
  arrays, files = pair
  decoded = [(x, y) for x, y in arrays.records(1, 4).as_numpy_iterator()]
  encoded = [(tf.io.decode_png(x).numpy(), y) for x, y in files.records(1, 4).as_numpy_iterator()]
  assert len(decoded) == len(encoded) == 3
  for (a, la), (b, lb), row in zip(decoded, encoded, range(1, 4)):
    np.testing.assert_array_equal(a, arrays.images[row])
    np.testing.assert_array_equal(b, arrays.images[row])
    assert la == lb == arrays.labels[row]
  assert len(list(files.records())) == len(arrays) == len(files) == 5


def test_readers_read_rows_by_index(pair):
  arrays, files = pair
  images, labels = arrays.reader()(tf.constant([3, 0], tf.int64))
  np.testing.assert_array_equal(images, arrays.images[[3, 0]])
  np.testing.assert_array_equal(labels, [1, 2])
  encoded, label = files.reader()(tf.constant(3, tf.int64))
  np.testing.assert_array_equal(tf.io.decode_png(encoded), arrays.images[3])
  assert int(label) == 1


def test_describe_and_class_counts_agree_across_kinds(pair):
  arrays, files = pair
  rows = np.array([0, 2, 3])
  assert arrays.describe(rows) == files.describe(rows) == (
      "3 images in 4 classes, class counts [0, 1, 2, 0]; 2 classes have no images")
  np.testing.assert_array_equal(arrays.class_counts(), files.class_counts())
  np.testing.assert_array_equal(files.subset(rows).labels, arrays.subset(rows).labels)
  assert streamed().describe(rows).startswith("all images of tfds:i_naturalist2018:train")


def test_a_streamed_split_refuses_random_access():
  with pytest.raises(ValueError, match="needs random access .* which is streamed"):
    streamed().subset(np.arange(3))
  with pytest.raises(ValueError, match="needs random access .* which is streamed"):
    streamed().reader()
  with pytest.raises(ValueError, match="nothing to evaluate in tfds:i_naturalist2018 split"):
    eval_stream.eval_split_size(streamed())
  assert eval_stream.eval_split_size(streamed(), 7) == 7
