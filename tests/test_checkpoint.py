"""Checkpoint round trip on an 8-device mesh, and export -> load_encoder equality."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import demo
from pmsn_jax import checkpoint, load_encoder, sharding, step
from pmsn_jax.models import vit


def small_config():
  c = demo.get_config("smoke")
  c.model.width, c.model.depth, c.model.num_heads = 32, 2, 2
  c.model.hidden_dim, c.model.output_dim, c.model.num_prototypes = 32, 16, 8
  return c


def build_state(config, mesh):
  vit_cfg = vit.vit_config_from(config)
  graphdef, _, _, create_state = step.build(config, vit_cfg)
  abstract = jax.eval_shape(create_state)
  shardings = sharding.state_shardings(abstract, mesh)
  return graphdef, vit_cfg, abstract, shardings, jax.jit(create_state, out_shardings=shardings)()


def test_save_restore_round_trip_is_exact(tmp_path):
  config = small_config()
  mesh = sharding.make_mesh(config.mesh)
  assert mesh.shape["data"] == 8  # conftest fakes 8 CPU devices
  _, _, abstract, shardings, state = build_state(config, mesh)
  state = state.replace(step=state.step + 7,
                        params=jax.tree.map(lambda x: x * 1.5 + 0.25, state.params))
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), keep=2)
  ckpt.save(7, state)
  ckpt.close()

  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), keep=2)
  assert ckpt.latest_step() == 7
  restored = ckpt.restore(7, checkpoint.abstract_with_shardings(abstract, shardings))
  ckpt.close()
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.sharding == b.sharding


def test_read_only_checkpointer_leaves_a_running_save_alone(tmp_path):
  """evaluate --checkpoint reads checkpoints a training run may still be writing: the
  read-only manager must not clean up that run's in-flight (temporary) save."""
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2)
  ckpt.save(7, {"w": jnp.arange(3.0)})
  ckpt.close()
  in_flight = tmp_path / "8.orbax-checkpoint-tmp-1733540000000000"
  in_flight.mkdir()
  for read_only, survives in ((True, True), (False, False)):
    ckpt = checkpoint.Checkpointer(str(tmp_path), read_only=read_only)
    assert ckpt.latest_step() == 7
    np.testing.assert_array_equal(ckpt.restore(7, {"w": jnp.zeros(3)})["w"], [0.0, 1.0, 2.0])
    ckpt.close()
    assert in_flight.exists() == survives, read_only


def test_restoring_into_another_model_is_a_clear_error(tmp_path):
  config = small_config()
  mesh = sharding.make_mesh(config.mesh)
  _, _, _, _, state = build_state(config, mesh)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), keep=1)
  ckpt.save(1, state)
  ckpt.close()
  config.model.num_prototypes = 12
  _, _, abstract, shardings, _ = build_state(config, mesh)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), keep=1)
  with pytest.raises(ValueError, match="does not match this config"):
    ckpt.restore(1, checkpoint.abstract_with_shardings(abstract, shardings))
  ckpt.close()


def test_export_then_load_encoder_gives_the_in_memory_features(tmp_path):
  config = small_config()
  mesh = sharding.make_mesh(config.mesh)
  graphdef, vit_cfg, _, _, state = build_state(config, mesh)
  model = nnx.merge(graphdef, state.params, state.target, state.batch_stats)
  # Make the target differ from the online encoder so the test knows which one was exported.
  encoder_state = jax.tree.map(lambda x: x + 0.01, nnx.state(model.target.encoder))
  checkpoint.export_encoder(str(tmp_path / "export"), encoder_state, vit_cfg,
                            config.data.mean, config.data.std)

  encode = load_encoder(str(tmp_path / "export"))
  images = np.random.default_rng(0).integers(0, 256, (5, 28, 28, 1), dtype=np.uint8)
  encoder = nnx.merge(nnx.graphdef(model.target.encoder), encoder_state)
  normalised = (images / 255.0 - np.asarray(config.data.mean)) / np.asarray(config.data.std)
  expected = encoder(jnp.asarray(normalised, jnp.float32))
  got = encode(images)
  assert got.shape == (5, vit_cfg.width)
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5)
  both = load_encoder(str(tmp_path / "export"), features="cls_avgpool")(images)
  assert both.shape == (5, 2 * vit_cfg.width)
  np.testing.assert_allclose(np.asarray(both[:, :vit_cfg.width]), np.asarray(expected),
                             rtol=1e-5, atol=1e-5)


def test_load_encoder_errors_name_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="model_config.json"):
    load_encoder(str(tmp_path / "nowhere"))
  with pytest.raises(ValueError, match="features='mean' is not one of"):
    load_encoder(str(tmp_path / "nowhere"), features="mean")


def flattened_qkv(tree):
  """`tree` as a writer before the qkv heads axis saved it: qkv kernels [.., width, 3 * width],
  biases [.., 3 * width] (the same numbers)."""
  def flat(path, x):
    if "qkv/" not in sharding.path_string(path):
      return x
    return np.asarray(x).reshape(*x.shape[:-3], -1)
  return jax.tree_util.tree_map_with_path(flat, tree)


def test_checkpoints_with_flat_qkv_kernels_restore_into_the_heads_layout(tmp_path):
  config = small_config()
  config.mesh = (("data", 2), ("fsdp", 2), ("tensor", 2))
  mesh = sharding.make_mesh(config.mesh)
  _, _, abstract, shardings, state = build_state(config, mesh)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), keep=1)
  ckpt.save(4, flattened_qkv(state))
  ckpt.close()
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), keep=1)
  restored = ckpt.restore(4, checkpoint.abstract_with_shardings(abstract, shardings))
  ckpt.close()
  qkv = restored.params["online"]["encoder"]["blocks"]["qkv"]["kernel"][...]
  assert qkv.ndim == 5 and qkv.sharding.spec[3] == "tensor"  # heads split over tensor
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.sharding == b.sharding


def test_version_1_exports_with_flat_qkv_kernels_still_load(tmp_path):
  config = small_config()
  mesh = sharding.make_mesh(config.mesh)
  graphdef, vit_cfg, _, _, state = build_state(config, mesh)
  model = nnx.merge(graphdef, state.params, state.target, state.batch_stats)
  encoder_state = nnx.state(model.target.encoder)
  checkpoint.export_encoder(str(tmp_path / "v2"), encoder_state, vit_cfg, config.data.mean,
                            config.data.std)
  # The same encoder as version 1 wrote it.
  checkpoint.export_encoder(str(tmp_path / "v1"), encoder_state, vit_cfg, config.data.mean,
                            config.data.std)
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "v1" / "params", flattened_qkv(encoder_state.to_pure_dict()),
              force=True)
  meta = (tmp_path / "v1" / "model_config.json")
  meta.write_text(meta.read_text().replace("pmsn_jax.encoder.v2", "pmsn_jax.encoder.v1"))
  images = np.random.default_rng(0).integers(0, 256, (3, 28, 28, 1), dtype=np.uint8)
  np.testing.assert_array_equal(np.asarray(load_encoder(str(tmp_path / "v1"))(images)),
                                np.asarray(load_encoder(str(tmp_path / "v2"))(images)))
