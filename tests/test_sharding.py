"""Mesh and partition rules on 8 fake CPU devices: DP, FSDP and tensor parallelism give the
same train step, parameters really are sharded, and checkpoints restore across topologies."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import demo
from pmsn_jax import checkpoint, sharding, step, validation
from pmsn_jax.models import vit


def small_config(mesh=(("data", -1), ("fsdp", 1), ("tensor", 1))):
  c = demo.get_config("smoke")
  c.model.width, c.model.depth, c.model.num_heads = 32, 2, 2
  c.model.hidden_dim, c.model.output_dim, c.model.num_prototypes = 64, 16, 8
  c.batch_size, c.data.num_focal = 16, 2
  c.mesh = mesh
  c.fsdp_min_size = 256  # small enough that this tiny model's kernels get sharded
  return c


def built(config, devices=None):
  mesh = sharding.make_mesh(config.mesh, devices)
  vit_cfg = vit.vit_config_from(config)
  graphdef, tx, scheds, create_state = step.build(config, vit_cfg)
  abstract = jax.eval_shape(create_state)
  shardings = sharding.state_shardings(abstract, mesh, config.partition_rules,
                                       config.fsdp_min_size)
  state = jax.jit(create_state, out_shardings=shardings)()
  return mesh, graphdef, tx, scheds, abstract, shardings, state


def batch(config):
  """Random uint8 views and their photometric random numbers, as the pipeline ships them."""
  rng = np.random.default_rng(0)
  specs = step.abstract_batch(config)
  return {k: (rng.integers(0, 256, specs[k].shape, np.uint8) if specs[k].dtype == np.uint8
              else rng.random(specs[k].shape, np.float32))
          for k in ("target", "anchor", "focal", "photometric")}


def two_steps(config):
  mesh, graphdef, tx, scheds, _, shardings, state = built(config)
  inputs = dict(sharding.to_global(batch(config), mesh), prior=step.prior_from_config(config))
  train_step = jax.jit(step.make_train_step(graphdef, tx, scheds, config),
                       in_shardings=(shardings, sharding.step_input_shardings(inputs, mesh)),
                       out_shardings=(shardings, sharding.replicated(mesh),
                                      sharding.replicated(mesh)))
  for _ in range(2):
    state, metrics, _ = train_step(state, inputs)
  return state, metrics


def qkv_spec(state):
  return state.params["online"]["encoder"]["blocks"]["qkv"]["kernel"].value.sharding.spec


def test_fsdp_and_tensor_parallel_match_data_parallel():
  reference, ref_metrics = two_steps(small_config())
  # qkv kernels are [layers, width, 3, heads, head_dim]: tensor parallelism splits the heads.
  assert qkv_spec(reference) == P(None, None, None, None, None)
  for mesh, spec in [((("data", 2), ("fsdp", 4), ("tensor", 1)),
                      P(None, "fsdp", None, None, None)),
                     ((("data", 2), ("fsdp", 2), ("tensor", 2)),
                      P(None, "fsdp", None, "tensor", None))]:
    state, metrics = two_steps(small_config(mesh))
    assert qkv_spec(state) == spec, mesh
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
    a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(state.params)])
    b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(reference.params)])
    # Adam's first steps are ~lr * sign(gradient): summation-order noise flips the sign of
    # the few near-zero gradients (each step moves a parameter by at most ~lr, so two steps
    # by < 4 lr); everything else agrees to float precision.
    np.testing.assert_allclose(a, b, atol=4 * small_config().optim.lr)
    assert np.mean(np.abs(a - b) < 1e-5) > 0.98  # measured: > 0.99 for every mesh
    # Adam moments and the EMA target follow their parameter's sharding.
    target_qkv = state.target["target"]["encoder"]["blocks"]["qkv"]["kernel"].value
    assert target_qkv.sharding.spec == spec


def test_rules():
  mesh = sharding.make_mesh((("data", 2), ("fsdp", 4), ("tensor", 1)))
  spec = lambda path, shape: sharding.spec_for(path, shape, mesh, fsdp_min_size=16)  # noqa
  # Largest dimension divisible by the fsdp size; never the scan axis of stacked blocks.
  assert spec("params/online/head/fc2/kernel", (64, 512)) == P(None, "fsdp")
  assert spec("params/online/encoder/blocks/norm1/scale", (8, 30)) == P()
  assert spec("params/online/encoder/blocks/norm1/scale", (8, 32)) == P(None, "fsdp")
  assert spec("params/prototypes/vectors", (6, 5)) == P()  # below fsdp_min_size... 30 >= 16
  assert spec("step", ()) == P()
  # The tensor axis has size 1 here, so the Megatron rules reduce to FSDP.
  assert spec("opt_state/0/mu/online/encoder/blocks/fc2/kernel", (2, 64, 32)) == P(
      None, None, "fsdp")
  with pytest.raises(ValueError, match="cannot be split"):
    spec("params/online/encoder/blocks/fc1/kernel", (2, 30, 64))
  # Tensor parallelism splits attention by heads: qkv kernels [layers, width, 3, heads, dim].
  mesh = sharding.make_mesh((("data", 1), ("fsdp", 4), ("tensor", 2)))
  spec = lambda path, shape: sharding.spec_for(path, shape, mesh, fsdp_min_size=16)  # noqa
  assert spec("params/online/encoder/blocks/qkv/kernel", (2, 32, 3, 4, 8)) == P(
      None, "fsdp", None, "tensor", None)
  assert spec("params/online/encoder/blocks/qkv/bias", (2, 3, 4, 8)) == P(
      None, None, "tensor", None)
  assert spec("params/online/encoder/blocks/proj/kernel", (2, 32, 32)) == P(
      None, "tensor", "fsdp")
  with pytest.raises(ValueError, match="cannot be split"):  # 3 heads over 2 devices
    spec("params/online/encoder/blocks/qkv/kernel", (2, 24, 3, 3, 8))


def test_checkpoint_restores_onto_other_topologies(tmp_path):
  devices = jax.devices()
  fsdp8 = small_config((("data", 1), ("fsdp", 8), ("tensor", 1)))
  _, _, _, _, _, _, state = built(fsdp8)
  assert qkv_spec(state) == P(None, "fsdp", None, None, None)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), keep=1)
  ckpt.save(3, state)
  ckpt.close()
  saved = [np.asarray(x) for x in jax.tree.leaves(state)]

  for config, subset in [(small_config((("data", 2), ("fsdp", 2), ("tensor", 1))), devices[:4]),
                         (small_config(), devices[:1]),
                         (small_config((("data", 4), ("fsdp", 1), ("tensor", 2))), devices)]:
    _, _, _, _, abstract, shardings, _ = built(config, subset)
    ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), keep=1)
    restored = ckpt.restore(3, checkpoint.abstract_with_shardings(abstract, shardings))
    ckpt.close()
    for a, b, s in zip(jax.tree.leaves(restored), saved, jax.tree.leaves(shardings)):
      np.testing.assert_array_equal(np.asarray(a), b)
      assert a.sharding == s and set(a.sharding.device_set) <= set(subset)


def test_checkpoint_from_one_device_restores_sharded_on_eight(tmp_path):
  devices = jax.devices()
  _, _, _, _, _, _, state = built(small_config(), devices[:1])
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), keep=1)
  ckpt.save(1, state)
  ckpt.close()
  config = small_config((("data", 2), ("fsdp", 2), ("tensor", 2)))
  _, _, _, _, abstract, shardings, _ = built(config, devices)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), keep=1)
  restored = ckpt.restore(1, checkpoint.abstract_with_shardings(abstract, shardings))
  ckpt.close()
  assert qkv_spec(restored) == P(None, "fsdp", None, "tensor", None)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_batch_and_mesh_errors():
  mesh = sharding.make_mesh((("data", 2), ("fsdp", 4), ("tensor", 1)))
  sharding.check_batch_size(16, mesh)
  with pytest.raises(ValueError, match="multiple of 8"):
    sharding.check_batch_size(12, mesh)
  with pytest.raises(ValueError, match="has 16 devices but 8"):
    sharding.make_mesh((("data", 2), ("fsdp", 8)))
  config = small_config((("data", -1), ("fsdp", 1)))
  config.partition_rules = ((r".*", (None, "model")),)  # no such axis
  with pytest.raises(ValueError, match="partition_rules"):
    validation.validate(config)
