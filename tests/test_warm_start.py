"""config.init_from (warm_start.py): a fresh train state warm-started from a fake official MSN
checkpoint or a pmsn_jax export, on an 8-device mesh with FSDP-sharded leaves."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import demo
from pmsn_jax import checkpoint, msn_reader, sharding, step, validation, warm_start
from pmsn_jax.models import vit

# A safety net: requirements-test.txt installs torch and timm (msn_fixture imports both).
torch = pytest.importorskip("torch")
msn_fixture = pytest.importorskip("tests.msn_fixture")

# The demo's images (28 px, 1 channel, patch 7) and a tiny model.
SIZE = msn_fixture.Size(width=32, depth=2, num_heads=2, patch=7, image=28, channels=1,
                        hidden=32, output=16, prototypes=8)


def tiny_config(init_from=""):
  c = demo.get_config("smoke")
  c.model.width, c.model.depth, c.model.num_heads = SIZE.width, SIZE.depth, SIZE.num_heads
  c.model.hidden_dim, c.model.output_dim = SIZE.hidden, SIZE.output
  c.model.num_prototypes = SIZE.prototypes
  c.mesh = (("data", 2), ("fsdp", 4), ("tensor", 1))
  c.fsdp_min_size = 2 ** 8  # so that the bigger kernels are sharded over fsdp
  c.init_from = init_from
  return c


@pytest.fixture(scope="module")
def fresh():
  """(graphdef, a fresh train state born sharded) of tiny_config."""
  config = tiny_config()
  mesh = sharding.make_mesh(config.mesh)
  graphdef, _, _, create_state = step.build(config, vit.vit_config_from(config))
  abstract = jax.eval_shape(create_state)
  shardings = sharding.state_shardings(abstract, mesh, config.partition_rules,
                                       config.fsdp_min_size)
  state = jax.jit(create_state, out_shardings=shardings)()
  assert any(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(state.params))
  return graphdef, state


@pytest.fixture(scope="module")
def msn_file(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("msn") / "msn.pth.tar")
  return path, msn_fixture.write_checkpoint(path, SIZE)


def features(torch_vit, images):
  with torch.no_grad():
    return torch_vit(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()


def head_outputs(torch_head, x):
  """MSN's head in training mode (batch statistics, as pmsn_jax's head computes), on a copy."""
  with torch.no_grad():
    return copy.deepcopy(torch_head).train()(torch.from_numpy(x)).numpy()


def assert_same_placement(new, old):
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(old)):
    assert a.sharding == b.sharding and a.dtype == b.dtype and a.shape == b.shape


def test_warm_start_from_an_msn_checkpoint(fresh, msn_file):
  graphdef, state = fresh
  path, modules = msn_file
  said = []
  new = warm_start.warm_start(state, tiny_config(path), report=said.append)
  assert len(said) == 1 and "loaded encoders, heads, prototypes" in said[0]

  assert_same_placement(new, state)
  assert new.step == 0 and new.opt_state is state.opt_state  # a fresh optimizer
  # copy=True: training-mode BatchNorm calls below must not write into `new`.
  model = nnx.merge(graphdef, new.params, new.target, new.batch_stats, copy=True)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(3, 28, 28, 1)).astype(np.float32)
  x = rng.normal(size=(16, SIZE.width)).astype(np.float32)
  for ours, theirs in ((model.online, "encoder"), (model.target, "target_encoder")):
    torch_vit, torch_head = modules[theirs]
    np.testing.assert_allclose(np.asarray(ours.encoder(jnp.asarray(images))),
                               features(torch_vit, images), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(ours.head(jnp.asarray(x))),
                               head_outputs(torch_head, x), atol=1e-4, rtol=0)
  np.testing.assert_array_equal(np.asarray(new.params["prototypes"]["vectors"]),
                                modules["prototypes"].numpy())
  np.testing.assert_array_equal(np.asarray(new.batch_stats["target"]["head"]["bn2"]["var"]),
                                modules["target_encoder"][1].bn2.running_var.numpy())
  # Pure: the fresh state is as it was.
  fresh_model = nnx.merge(graphdef, state.params, state.target, state.batch_stats,
                          copy=True)
  assert not np.allclose(np.asarray(fresh_model.online.encoder(jnp.asarray(images))),
                         features(modules["encoder"][0], images), atol=1e-2)


def test_warm_start_from_a_converted_export(fresh, msn_file, tmp_path):
  graphdef, state = fresh
  path, modules = msn_file
  export = str(tmp_path / "export")
  with pytest.raises(ValueError, match="a 1-channel model, not MSN's RGB one: pass the --config"):
    msn_reader.from_msn(path, export, num_heads=SIZE.num_heads)  # whose mean/std to export?
  msn_reader.from_msn(path, export, config=tiny_config())
  new = warm_start.warm_start(state, tiny_config(export))
  assert_same_placement(new, state)
  model = nnx.merge(graphdef, new.params, new.target, new.batch_stats, copy=True)
  images = np.random.default_rng(1).normal(size=(2, 28, 28, 1)).astype(np.float32)
  expected = features(modules["target_encoder"][0], images)  # from-msn exports the target
  for backbone in (model.online, model.target):  # both start from the exported encoder
    np.testing.assert_allclose(np.asarray(backbone.encoder(jnp.asarray(images))), expected,
                               atol=1e-4, rtol=0)
  np.testing.assert_array_equal(np.asarray(new.params["online"]["head"]["fc3"]["kernel"]),
                                modules["target_encoder"][1].fc3.weight.detach().numpy().T)
  np.testing.assert_array_equal(np.asarray(new.params["prototypes"]["vectors"]),
                                modules["prototypes"].numpy())


def test_a_training_export_warm_starts_the_encoders_only(fresh, tmp_path):
  graphdef, state = fresh
  cfg = vit.vit_config_from(tiny_config())
  encoder = vit.ViT(cfg, rngs=nnx.Rngs(42))
  checkpoint.export_encoder(str(tmp_path), nnx.state(encoder), cfg, demo.FMNIST_MEAN,
                            demo.FMNIST_STD)
  said = []
  new = warm_start.warm_start(state, tiny_config(str(tmp_path)), report=said.append)
  assert "freshly initialised: heads, prototypes" in said[0]
  for ours in (new.params["online"]["encoder"], new.target["target"]["encoder"]):
    np.testing.assert_array_equal(np.asarray(ours["pos_embed"]),
                                  np.asarray(encoder.pos_embed[...]))
  kept = lambda s: (s.params["online"]["head"], s.params["prototypes"])  # noqa: E731
  for a, b in zip(jax.tree.leaves(kept(new)), jax.tree.leaves(kept(state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_model_of_another_size_is_one_line_naming_the_fix(fresh, msn_file):
  _, state = fresh
  path, _ = msn_file
  config = tiny_config(path)
  config.model.width = 64
  with pytest.raises(ValueError, match=r"^embed dim 32 in .*msn\.pth\.tar\['target_encoder'\], "
                                       r"64 in the config: pass --config\.model\.width=32"):
    warm_start.warm_start(state, config)
  config = tiny_config(path)
  config.model.num_prototypes = 16
  with pytest.raises(ValueError, match=r"prototypes 8 in .*, 16 in the config: pass "
                                       r"--config\.model\.num_prototypes=8"):
    warm_start.warm_start(state, config)


def test_validation_names_a_missing_init_from_and_the_fix(tmp_path):
  config = tiny_config(str(tmp_path / "nowhere.pth.tar"))
  with pytest.raises(ValueError, match=r"config\.init_from=.*nowhere\.pth\.tar' does not exist: "
                                       r"pass an official MSN checkpoint .*convert from-msn"):
    validation.validate(config)
  config.init_from = str(tmp_path)
  with pytest.raises(ValueError, match="is a directory without model_config.json"):
    validation.validate(config)
  (tmp_path / "msn.pth.tar").write_bytes(b"")
  config.init_from = str(tmp_path / "msn.pth.tar")
  validation.validate(config)  # exists: what it holds is read (and checked) by warm_start
  config.init_from = ""
  validation.validate(config)
