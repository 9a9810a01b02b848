"""Streamed, sharded evaluation features (evals/features.py) on the 8 fake CPU devices.

The features of a split must not depend on the mesh: the same rows, in row order, with the
same numbers, whether one device computes them or eight; each of N devices holds 1/N of them;
and reading rows back (take, to_host) returns exactly what was computed.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo
from pmsn_jax import sharding
from pmsn_jax.data import sources
from pmsn_jax.evals import features

NUM_ROWS = 203  # not a multiple of the batch: the last batch is padded


def _config(batch_size):
  config = demo.get_config("smoke")
  config.eval.batch_size = batch_size
  return config


def _split():
  rng = np.random.default_rng(3)
  images = rng.integers(0, 256, (NUM_ROWS, 28, 28, 1), dtype=np.uint8)
  return sources.LabelledImages(images, (np.arange(NUM_ROWS) % 7).astype(np.int32), 7)


def _encoders():
  weights = np.random.default_rng(4).standard_normal((28 * 28, 16)).astype(np.float32)
  # An elementwise-exact "encoder": each feature is a handful of pixels, no reduction whose
  # order could depend on the batch split.
  pick = jax.jit(lambda x: jnp.reshape(x, (x.shape[0], -1))[:, ::49])
  dense = jax.jit(lambda x: jnp.reshape(x, (x.shape[0], -1)) @ weights)
  return {"pick": pick, "dense": dense}


def _mesh(n, axes=(("data", -1),)):
  return sharding.make_mesh(axes, devices=jax.devices()[:n])


@pytest.fixture(scope="module")
def one_device():
  return features.extract(_encoders(), _split(), _config(32), _mesh(1))


@pytest.mark.parametrize("axes", [(("data", -1),), (("data", 2), ("fsdp", 2), ("tensor", 2))])
def test_eight_devices_give_the_features_of_one(one_device, axes):
  mesh = _mesh(8, axes)
  shards = sharding.batch_shards(mesh)
  got = features.extract(_encoders(), _split(), _config(32), mesh)
  for name in ("pick", "dense"):
    values, labels, keys = got[name].to_host()
    want_values, want_labels, want_keys = one_device[name].to_host()
    np.testing.assert_array_equal(keys, np.arange(NUM_ROWS))
    np.testing.assert_array_equal(labels, _split().labels)
    np.testing.assert_array_equal(labels, want_labels)
    if name == "pick":
      np.testing.assert_array_equal(values, want_values)
    else:  # a matmul may block its sum differently for 4 rows than for 32
      np.testing.assert_allclose(values, want_values, rtol=1e-5, atol=1e-4)
  split = got["pick"]
  rows = split.values.shape[0]
  assert rows == 7 * 32  # 7 batches of 32: 203 real rows, 21 padding
  assert split.values.sharding.is_equivalent_to(sharding.batch_sharding(mesh), 2)
  for shard in split.values.addressable_shards:
    assert shard.data.shape == (rows // shards, 16)  # each device holds 1/shards of the rows
  # Along each device's rows the real keys increase (the sharded k-NN's tie rule needs it).
  for shard in split.keys.addressable_shards:
    local = np.asarray(shard.data)
    assert np.all(np.diff(local[local >= 0]) > 0)


def test_take_and_keys_where_read_the_rows_that_were_computed(one_device):
  mesh = _mesh(8)
  split = features.extract(_encoders(), _split(), _config(64), mesh)["dense"]
  host = np.asarray(jax.device_get(split.values))
  positions = np.array([split.order[5], split.order[0], split.order[202], 3, 3])
  np.testing.assert_array_equal(split.take(positions), host[positions])
  keep = split.host_keys % 2 == 0
  kept = np.asarray(jax.device_get(split.keys_where(keep)))
  np.testing.assert_array_equal(kept, np.where(keep, split.host_keys, -1))
  assert split.keys_where(keep).sharding.is_equivalent_to(split.keys.sharding, 1)


def test_a_batch_the_mesh_cannot_split_is_a_one_line_error():
  with pytest.raises(ValueError, match="eval.batch_size=12 .* multiple of 8"):
    features.extract(_encoders(), _split(), _config(12), _mesh(8))
