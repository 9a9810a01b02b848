"""Data-parallel linear probe (evals/linear.train_probe_sharded) on the 8 fake CPU devices."""
import jax
import numpy as np
import pytest

from pmsn_jax import sharding
from pmsn_jax.evals import linear

_SETTINGS = dict(num_classes=5, epochs=4, learning_rate=1.0, momentum=0.9, seed=0)


def _mesh(axes):
  return sharding.make_mesh(axes, jax.devices()[:int(np.prod([s for _, s in axes]))])


_ONE = (("data", 1),)
_EIGHT = (("data", 8),)
_MIXED = (("data", 2), ("fsdp", 2), ("tensor", 2))


def _problem(num=101, dim=12, num_classes=5, seed=0):
  """Overlapping Gaussian clusters: the loss is not driven to 0, so params keep moving."""
  rng = np.random.default_rng(seed)
  centres = rng.standard_normal((num_classes, dim))
  labels = rng.integers(0, num_classes, num)
  feats = centres[labels] + 0.8 * rng.standard_normal((num, dim))
  return feats.astype(np.float32), labels.astype(np.int32)


def _put(mesh, *arrays):
  return tuple(jax.device_put(a, sharding.batch_sharding(mesh)) for a in arrays)


def _train(mesh_axes, feats, labels, **kwargs):
  mesh = _mesh(mesh_axes)
  values, labels, weights = linear.layout_rows(feats, labels, mesh)
  return linear.train_probe_sharded(values, labels, weights, mesh=mesh, **{**_SETTINGS, **kwargs})


def _assert_params_close(a, b, rtol=1e-5, atol=1e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def _params_equal(a, b):
  return all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))


def test_full_batch_same_on_one_and_many_devices():
  feats, labels = _problem()  # 101 rows: the 8-shard layouts add weight-0 padding rows.
  one = _train(_ONE, feats, labels, batch_size=1024)
  assert jax.tree.structure(one) == jax.tree.structure(
      linear._init_params(jax.random.PRNGKey(0), 12, 5))
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(one))
  init = linear._init_params(jax.random.PRNGKey(0), 12, 5)
  assert not np.allclose(one["head"]["kernel"], init["head"]["kernel"], atol=1e-2)  # It trained.
  for axes in (_EIGHT, _MIXED):
    many = _train(axes, feats, labels, batch_size=1024)
    _assert_params_close(one, many)
    np.testing.assert_array_equal(linear.predict(one, feats), linear.predict(many, feats))


def test_weight_zero_rows_change_nothing():
  feats, labels = _problem(num=96)
  mesh = _mesh(_EIGHT)
  clean = linear.train_probe_sharded(*_put(mesh, feats, labels, np.ones(96, np.float32)),
                                     mesh=mesh, batch_size=4096, **_SETTINGS)
  rng = np.random.default_rng(1)
  junk = 100.0 * rng.standard_normal((64, 12)).astype(np.float32)
  junk[3] = np.nan  # Even non-finite values and out-of-range labels must stay inert.
  junk_labels = rng.integers(0, 5, 64).astype(np.int32)
  junk_labels[5] = 999
  all_feats = np.concatenate([feats, junk])
  all_labels = np.concatenate([labels, junk_labels])
  all_weights = np.concatenate([np.ones(96, np.float32), np.zeros(64, np.float32)])
  order = rng.permutation(160)  # Interleaved: every shard holds real and junk rows.
  dirty = linear.train_probe_sharded(
      *_put(mesh, all_feats[order], all_labels[order], all_weights[order]), mesh=mesh,
      batch_size=4096, **_SETTINGS)
  _assert_params_close(clean, dirty)


def test_batches_without_real_rows_are_skipped():
  # After a real epoch the momentum is non-zero, so an epoch of empty batches would still move
  # the params (and count schedule steps) unless each such step is skipped outright.
  feats, labels = _problem(num=64)
  mesh = _mesh(_EIGHT)
  settings = dict(learning_rate=1.0, momentum=0.9, total_steps=8)
  key = np.asarray(jax.random.PRNGKey(0))
  state = linear._init_fn(mesh, 12, 5, **settings)(key)
  epoch_fn = linear._epoch_fn(mesh, 2, 4, **settings)
  values, labels = _put(mesh, feats, labels)
  ones, zeros = _put(mesh, np.ones(64, np.float32), np.zeros(64, np.float32))
  state = jax.device_get(epoch_fn(*state, values, labels, ones, key, np.int32(0)))
  assert np.abs(state[1][0].trace["head"]["kernel"]).max() > 1e-3  # Momentum is non-zero.
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  after = jax.device_get(epoch_fn(*jax.device_put(state, replicated), values, labels, zeros, key,
                                  np.int32(1)))
  jax.tree.map(np.testing.assert_array_equal, after, state)


def test_learns_separable_problem_with_mini_batches():
  rng = np.random.default_rng(2)
  centres = rng.standard_normal((4, 16))
  labels = rng.integers(0, 4, 800).astype(np.int32)
  feats = (3.0 * centres[labels] + 0.3 * rng.standard_normal((800, 16)) + 5.0).astype(np.float32)
  params = _train(_EIGHT, feats, labels, batch_size=64, num_classes=4, epochs=5)
  assert np.mean(linear.predict(params, feats) == labels) > 0.97


def test_deterministic_per_seed():
  feats, labels = _problem(num=200)
  runs = [_train(_EIGHT, feats, labels, batch_size=32, seed=s) for s in (0, 0, 1)]
  assert _params_equal(runs[0], runs[1])
  assert not np.allclose(runs[0]["head"]["kernel"], runs[2]["head"]["kernel"])


def test_epoch_only_all_reduces():
  mesh = _mesh(_MIXED)
  feats, labels = _problem(num=64)
  values, labels, weights = linear.layout_rows(feats, labels, mesh)
  settings = dict(learning_rate=1.0, momentum=0.9, total_steps=8)
  key = np.asarray(jax.random.PRNGKey(0))
  params, opt_state = linear._init_fn(mesh, 12, 5, **settings)(key)
  epoch_fn = linear._epoch_fn(mesh, 4, 4, **settings)
  hlo = epoch_fn.lower(params, opt_state, values, labels, weights, key,
                       np.int32(0)).compile().as_text()
  assert "all-reduce" in hlo
  for collective in ("all-gather", "all-to-all", "collective-permute", "reduce-scatter"):
    assert collective not in hlo, collective


def test_batch_smaller_than_shards_raises():
  feats, labels = _problem(num=64)
  with pytest.raises(ValueError, match=r"batch_size=4 .* 8 row shards.*batch_size >= 8"):
    _train(_EIGHT, feats, labels, batch_size=4)
  with pytest.raises(ValueError, match="batch_size=4"):
    linear.linear_probe(feats, labels, feats, num_classes=5, batch_size=4,
                        mesh=_mesh(_EIGHT))
