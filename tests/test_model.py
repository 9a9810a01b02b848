"""Model shapes, patch drop, position-embedding interpolation, EMA, schedules, decay mask."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import demo
from pmsn_jax import schedules, step
from pmsn_jax.models import msn, vit

TINY = vit.ViTConfig(width=32, depth=2, num_heads=4, patch_size=4, image_size=16, channels=3)


def count_params(module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


@pytest.mark.parametrize("variant,expected", [
    ("Ti/16", 5_524_416), ("S/16", 21_665_664), ("B/16", 85_798_656)])
def test_official_sizes_have_the_known_parameter_counts(variant, expected):
  # DeiT-Ti/S/B without their 1000-way classifier (5.72M/22.05M/86.57M with it).
  size, patch = vit.parse_variant(variant)
  cfg = vit.ViTConfig(**size, patch_size=patch, image_size=224)
  assert count_params(nnx.eval_shape(lambda: vit.ViT(cfg, rngs=nnx.Rngs(0)))) == expected


@pytest.mark.parametrize("variant", ["L/16", "H/16", "S/8", "B/4", "mu/7"])
def test_every_size_and_patch_builds(variant):
  size, patch = vit.parse_variant(variant)
  cfg = vit.ViTConfig(**size, patch_size=patch, image_size=patch * 4)
  model = nnx.eval_shape(lambda: vit.ViT(cfg, rngs=nnx.Rngs(0)))
  heads = size["num_heads"]
  assert model.blocks.qkv.kernel.shape == (size["depth"], size["width"], 3, heads,
                                           size["width"] // heads)


@pytest.mark.parametrize("bad", ["S", "S/5", "XL/16", "", "s/16"])
def test_bad_variant_is_a_clear_error(bad):
  with pytest.raises(ValueError, match="model.variant"):
    vit.parse_variant(bad)


def test_encoder_shapes_with_masking_and_focal_views():
  model = vit.ViT(TINY, rngs=nnx.Rngs(0))
  images = jnp.ones((3, 16, 16, 3))
  assert model(images).shape == (3, 32)
  assert model(images, mask_ratio=0.5, rng=jax.random.key(1)).shape == (3, 32)
  assert model(jnp.ones((5, 8, 8, 3))).shape == (5, 32)  # focal crop: 2x2 grid
  with pytest.raises(ValueError, match="rng"):
    model(images, mask_ratio=0.5)


def test_readouts_against_a_numpy_layer_norm():
  tokens = np.random.default_rng(0).normal(size=(3, 5, 32)).astype(np.float32)
  norm = nnx.LayerNorm(32, epsilon=1e-6, rngs=nnx.Rngs(0))  # scale 1, bias 0 at init
  normed = (tokens - tokens.mean(-1, keepdims=True)) / np.sqrt(tokens.var(-1, keepdims=True)
                                                                + 1e-6)
  got = {name: np.asarray(vit.readout(norm, jnp.asarray(tokens), name))
         for name in vit.FEATURE_READOUTS}
  np.testing.assert_allclose(got["cls"], normed[:, 0], atol=1e-5)
  np.testing.assert_allclose(got["avgpool"], normed[:, 1:].mean(1), atol=1e-5)
  np.testing.assert_allclose(got["cls_avgpool"],
                             np.concatenate([normed[:, 0], normed[:, 1:].mean(1)], -1), atol=1e-5)
  with pytest.raises(ValueError, match="features='mean' is not one of"):
    vit.readout(norm, jnp.asarray(tokens), "mean")


def test_the_model_readouts_share_the_cls_feature():
  model = vit.ViT(TINY, rngs=nnx.Rngs(0))
  images = jax.random.normal(jax.random.key(0), (3, 16, 16, 3))
  both = model(images, features="cls_avgpool")
  assert both.shape == (3, 64)
  np.testing.assert_allclose(both[:, :32], model(images), atol=1e-6)
  np.testing.assert_allclose(both[:, 32:], model(images, features="avgpool"), atol=1e-6)


def numpy_vit(model: vit.ViT, images: np.ndarray) -> np.ndarray:
  """An independent float64 forward pass of the encoder at its base grid: every token through
  every block, all tokens after the final LayerNorm [B, 1 + patches, D]."""
  cfg, p = model.cfg, model.cfg.patch_size
  par = lambda x: np.asarray(x[...], np.float64)  # noqa: E731
  def norm(x, ln, i=None):
    scale, bias = par(ln.scale), par(ln.bias)
    scale, bias = (scale, bias) if i is None else (scale[i], bias[i])
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6) * scale \
        + bias
  batch, grid = images.shape[0], cfg.grid
  x = np.zeros((batch, grid * grid, cfg.width))
  kernel = par(model.patch_embed.kernel)
  for i in range(grid):
    for j in range(grid):
      window = images[:, p * i:p * i + p, p * j:p * j + p]
      x[:, i * grid + j] = np.einsum("bhwc,hwcd->bd", window, kernel)
  x += par(model.patch_embed.bias) + par(model.pos_embed)[:, 1:]
  cls = par(model.cls_token) + par(model.pos_embed)[:, :1]
  x = np.concatenate([np.broadcast_to(cls, (batch, 1, cfg.width)), x], axis=1)
  blocks, heads, head_dim = model.blocks, cfg.num_heads, cfg.width // cfg.num_heads
  erf = np.vectorize(__import__("math").erf)
  for i in range(cfg.depth):
    linear = lambda x, layer: x @ par(layer.kernel)[i] + par(layer.bias)[i]  # noqa: E731
    # qkv's kernel [width, 3, heads, head_dim] is DeiT's [width, 3 * width] by another name.
    qkv = (norm(x, blocks.norm1, i) @ par(blocks.qkv.kernel)[i].reshape(cfg.width, -1)
           + par(blocks.qkv.bias)[i].reshape(-1))
    q, k, v = np.split(qkv, 3, axis=-1)
    q, k, v = (a.reshape(batch, -1, heads, head_dim) for a in (q, k, v))
    logits = np.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(head_dim)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    attn = np.einsum("bnqk,bknh->bqnh", weights, v).reshape(batch, -1, cfg.width)
    x = x + linear(attn, blocks.proj)
    hidden = linear(norm(x, blocks.norm2, i), blocks.fc1)
    x = x + linear(0.5 * hidden * (1 + erf(hidden / np.sqrt(2))), blocks.fc2)
  return norm(x, model.norm)


def test_encoder_readouts_match_an_independent_numpy_vit():
  # "cls" runs the last block for the CLS rows only; the other readouts run it for every token.
  model = vit.ViT(dataclasses.replace(TINY, depth=3), rngs=nnx.Rngs(0))
  images = np.random.default_rng(0).standard_normal((2, 16, 16, 3))
  expected = numpy_vit(model, images)
  pooled = expected[:, 1:].mean(1)
  for features, want in [("cls", expected[:, 0]), ("avgpool", pooled),
                         ("cls_avgpool", np.concatenate([expected[:, 0], pooled], -1))]:
    got = model(jnp.asarray(images, jnp.float32), features=features)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4, err_msg=features)


def test_gelu_is_the_exact_erf_gelu():
  import math
  x = np.linspace(-8, 8, 4001, dtype=np.float32)
  expected = np.array([v * 0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x.astype(np.float64)])
  np.testing.assert_allclose(np.asarray(vit.gelu(jnp.asarray(x))), expected, rtol=1e-5,
                             atol=1e-6)
  derivative = np.array([0.5 * (1 + math.erf(v / math.sqrt(2)))
                         + v * math.exp(-v * v / 2) / math.sqrt(2 * math.pi)
                         for v in x.astype(np.float64)])
  np.testing.assert_allclose(np.asarray(jax.vmap(jax.grad(vit.gelu))(jnp.asarray(x))),
                             derivative, rtol=1e-5, atol=1e-6)
  assert vit.gelu(jnp.ones(3, jnp.bfloat16)).dtype == jnp.bfloat16


def test_patch_embedding_is_the_strided_convolution_of_its_kernel():
  model = vit.ViT(dataclasses.replace(TINY, patch_size=4), rngs=nnx.Rngs(0))
  images = np.random.default_rng(0).standard_normal((2, 12, 12, 3)).astype(np.float32)
  kernel, bias = np.asarray(model.patch_embed.kernel[...]), np.asarray(model.patch_embed.bias[...])
  expected = np.zeros((2, 3, 3, TINY.width), np.float32)
  for i in range(3):  # one dot per patch: what a stride-4, 4x4 VALID convolution computes
    for j in range(3):
      window = images[:, 4 * i:4 * i + 4, 4 * j:4 * j + 4, :]
      expected[:, i, j] = np.einsum("bhwc,hwcd->bd", window, kernel) + bias
  got = np.asarray(model.embed_patches(jnp.asarray(images)))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  # and the nnx.Conv the checkpoints store the kernel of, applied as a convolution
  np.testing.assert_allclose(got, np.asarray(model.patch_embed(jnp.asarray(images))),
                             rtol=1e-6, atol=1e-6)


def test_patch_drop_keeps_a_per_sample_subset():
  tokens = jnp.arange(2 * 10, dtype=jnp.float32).reshape(2, 10, 1) + jnp.zeros((2, 10, 3))
  kept = vit.keep_random_patches(tokens, 7, jax.random.key(0))
  assert kept.shape == (2, 7, 3)
  for b in range(2):
    values = np.asarray(kept[b, :, 0])
    assert len(set(values)) == 7 and set(values) <= set(np.asarray(tokens[b, :, 0]))
  orders = [tuple(np.asarray(kept[b, :, 0]) - 10 * b) for b in range(2)]
  assert orders[0] != orders[1]  # independent permutations per sample


def test_position_embedding_interpolation_is_identity_at_base_grid_and_smooth_below():
  model = vit.ViT(TINY, rngs=nnx.Rngs(0))
  cls_pos, patch_pos = model.position_embedding(4)
  np.testing.assert_array_equal(jnp.concatenate([cls_pos, patch_pos], 1), model.pos_embed[...])
  cls_small, small = model.position_embedding(2)
  np.testing.assert_array_equal(cls_small, cls_pos)
  assert small.shape == (1, 4, 32) and np.isfinite(np.asarray(small)).all()
  # A constant table stays constant under resizing.
  model.pos_embed[...] = jnp.ones_like(model.pos_embed[...])
  np.testing.assert_allclose(model.position_embedding(2)[1], 1.0, rtol=1e-5)


def _tiny_msn():
  return msn.MSN(TINY, hidden_dim=16, out_dim=8, num_prototypes=6, rngs=nnx.Rngs(0))


def test_msn_projections_and_target_starts_as_copy():
  model = _tiny_msn()
  anchors = model.anchor_projections(jnp.ones((4, 16, 16, 3)), jnp.ones((4, 3, 8, 8, 3)),
                                     mask_ratio=0.25, rng=jax.random.key(0))
  assert anchors.shape == (4, 4, 8)
  assert model.target_projections(jnp.ones((4, 16, 16, 3))).shape == (4, 8)
  _, params, target, _ = step.split_model(model)
  for t, o in zip(jax.tree.leaves(target["target"]), jax.tree.leaves(params["online"])):
    np.testing.assert_array_equal(t, o)
  assert "prototypes" not in target


def test_ema_update_is_the_convex_combination():
  _, params, target, _ = step.split_model(_tiny_msn())
  params = jax.tree.map(lambda x: x + 1.0, params)
  moved = step.ema_update(target, params, 0.9)
  for new, old, online in zip(jax.tree.leaves(moved["target"]), jax.tree.leaves(target["target"]),
                              jax.tree.leaves(params["online"])):
    np.testing.assert_allclose(new, 0.9 * old + 0.1 * online, rtol=1e-6)


def test_decay_mask_skips_biases_norms_tokens_and_prototypes():
  _, params, _, _ = step.split_model(_tiny_msn())
  mask = step.decay_mask(params)
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): v
          for path, v in jax.tree_util.tree_leaves_with_path(mask)}
  assert any(v for k, v in flat.items() if "qkv/kernel" in k)
  for key, decays in flat.items():
    skip = any(s in key for s in ("bias", "scale", "prototypes"))
    assert decays != skip, key


def test_schedules_at_known_steps():
  c = demo.get_config()
  c.total_steps, c.optim.warmup_steps, c.optim.schedule_horizon_factor = 100, 10, 1.25
  c.optim.start_lr, c.optim.lr, c.optim.final_lr = 2e-4, 1e-3, 1e-6
  c.optim.weight_decay, c.optim.final_weight_decay = 0.04, 0.4
  c.optim.ema_momentum, c.optim.final_ema_momentum = 0.996, 1.0
  s = schedules.make_schedules(c)
  assert schedules.horizon_steps(c) == 125
  np.testing.assert_allclose(s.learning_rate(0), 2e-4, rtol=1e-6)
  np.testing.assert_allclose(s.learning_rate(10), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(s.learning_rate(125), 1e-6, rtol=1e-5)
  # cosine from the peak: halfway through the decay phase is the midpoint
  np.testing.assert_allclose(s.learning_rate(10 + 115 // 2), (1e-3 + 1e-6) / 2, rtol=2e-2)
  np.testing.assert_allclose(s.weight_decay(0), 0.04, rtol=1e-6)
  np.testing.assert_allclose(s.weight_decay(125), 0.4, rtol=1e-6)
  np.testing.assert_allclose(s.weight_decay(62.5), 0.22, rtol=1e-6)
  np.testing.assert_allclose(s.ema_momentum(0), 0.996, rtol=1e-7)
  np.testing.assert_allclose(s.ema_momentum(62.5), 0.998, rtol=1e-7)
  np.testing.assert_allclose(s.ema_momentum(125), 1.0, rtol=1e-7)
