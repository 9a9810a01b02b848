"""Tests for pmsn_jax.losses against an independent float64 NumPy reference.

The reference follows the PMSN/MSN equations literally, in the probability domain
(sharpen by p^(1/T), official-order Sinkhorn with plain divisions), so it
shares no code or numerical tricks with the log-domain implementation.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pmsn_jax import losses

SHAPES = [(4, 1, 8, 16), (16, 3, 32, 64), (8, 11, 16, 10)]  # (B, V, d, K)


# ----------------------------------------------------------------------------
# Independent NumPy (float64) reference.
# ----------------------------------------------------------------------------
def np_softmax(x, axis=-1):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def np_normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_power_law(k, exponent):
  p = np.arange(1, k + 1, dtype=np.float64) ** -exponent
  return p / p.sum()


def np_sinkhorn(p, marginal, num_iters):
  if num_iters == 0:
    return p / p.sum(axis=1, keepdims=True)
  b = p.shape[0]
  q = p / p.sum()
  for _ in range(num_iters):
    q = q / q.sum(axis=0, keepdims=True) * marginal[None, :]  # columns -> m_k
    q = q / q.sum(axis=1, keepdims=True) / b                  # rows -> 1/B
  return q * b


def np_pmsn(anchors, targets, prototypes, prior, *, temperature,
            target_temperature, sinkhorn_iters, sinkhorn_marginal, reg_weight,
            kl_direction, prior_order="fixed"):
  a, t, q = (np_normalize(np.asarray(x, np.float64))
             for x in (anchors, targets, prototypes))
  prior = np.asarray(prior, np.float64)
  k = q.shape[0]
  p_a = np_softmax(a @ q.T / temperature)                       # [B, V, K]
  p_t = np_softmax(t @ q.T / temperature)
  p_plus = p_t ** (1.0 / target_temperature)
  p_plus /= p_plus.sum(axis=1, keepdims=True)
  if prior_order == "sorted":  # the largest prior value to the most used prototype
    ranked = np.empty_like(prior)
    ranked[np.argsort(-p_plus.mean(axis=0), kind="stable")] = np.sort(prior)[::-1]
    prior = ranked
  marginal = prior if sinkhorn_marginal == "prior" else np.full(k, 1.0 / k)
  p = np_sinkhorn(p_plus, marginal, sinkhorn_iters)
  ce = np.mean(-np.sum(p[:, None, :] * np.log(p_a), axis=-1))
  p_mean = p_a.mean(axis=(0, 1))
  if kl_direction == "mean_to_prior":
    reg = np.sum(p_mean * (np.log(p_mean) - np.log(prior)))
  else:
    reg = np.sum(prior * (np.log(prior) - np.log(p_mean)))
  return {
      "loss": ce + reg_weight * reg,
      "ce": ce,
      "reg": reg,
      "mean_entropy": -np.sum(p_mean * np.log(p_mean)),
      "target_entropy": np.mean(-np.sum(p * np.log(p), axis=1)),
      "prototypes_in_use": float(len(np.unique(p.argmax(axis=1)))),
  }


def make_inputs(b, v, d, k, seed):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(b, v, d)).astype(np.float32),
          rng.normal(size=(b, d)).astype(np.float32),
          rng.normal(size=(k, d)).astype(np.float32))


# ----------------------------------------------------------------------------
# Loss vs reference.
# ----------------------------------------------------------------------------
# XLA compiles dominate the run time on CPU, so every static configuration is
# traced into ONE jitted program per input shape; priors, temperatures and
# reg_weight are traced arguments (value checks are skipped for tracers).
CONFIGS = [dict(sinkhorn_marginal="prior", sinkhorn_iters=0, kl_direction=k)
           for k in losses.KL_DIRECTIONS]  # The marginal is unused at 0 iters.
CONFIGS += [dict(sinkhorn_marginal=m, sinkhorn_iters=3, kl_direction=k)
            for m in losses.SINKHORN_MARGINALS for k in losses.KL_DIRECTIONS]
EXPONENTS = (0.0, 0.25, 1.0)
DEFAULT = dict(temperature=0.1, target_temperature=0.25, sinkhorn_iters=3,
               sinkhorn_marginal="prior", reg_weight=1.0,
               kl_direction="mean_to_prior")


@jax.jit
def all_configs(anchors, targets, prototypes, priors, temps, reg_weight):
  """[(loss, metrics) per CONFIGS entry], each vmapped over stacked priors."""
  return [jax.vmap(lambda p, c=c: losses.pmsn_loss(
      anchors, targets, prototypes, p, temperature=temps[0],
      target_temperature=temps[1], reg_weight=reg_weight, **c))(priors)
          for c in CONFIGS]


def _priors(k):
  return jnp.stack([losses.power_law_prior(k, e) for e in EXPONENTS])


@pytest.mark.parametrize("shape", SHAPES)
def test_loss_matches_numpy_reference(shape):
  b, v, d, k = shape
  for seed, temps, reg_weight in [(0, (0.1, 0.25), 1.0), (1, (0.1, 0.25), 0.7),
                                  (2, (0.2, 0.5), 2.0), (3, (0.1, 1.0), 1.0)]:
    anchors, targets, prototypes = make_inputs(b, v, d, k, seed=100 * k + seed)
    results = all_configs(anchors, targets, prototypes, _priors(k),
                          jnp.array(temps), reg_weight)
    for config, (loss, metrics) in zip(CONFIGS, results):
      assert loss.dtype == jnp.float32 and loss.shape == (len(EXPONENTS),)
      for i, exponent in enumerate(EXPONENTS):
        ref = np_pmsn(anchors, targets, prototypes, np_power_law(k, exponent),
                      temperature=temps[0], target_temperature=temps[1],
                      reg_weight=reg_weight, **config)
        where = f"{shape} seed={seed} exponent={exponent} {config}"
        np.testing.assert_allclose(loss[i], ref["loss"], rtol=1e-5, atol=1e-5,
                                   err_msg=where)
        for key in ("loss", "ce", "reg", "mean_entropy", "target_entropy"):
          np.testing.assert_allclose(metrics[key][i], ref[key], rtol=1e-5,
                                     atol=1e-5, err_msg=f"{key} {where}")
        assert metrics["prototypes_in_use"][i] == ref["prototypes_in_use"]
        if exponent == 0.0 and config["kl_direction"] == "mean_to_prior":
          # Uniform prior: the regulariser is MSN's ME-MAX, log K - H(p̄).
          np.testing.assert_allclose(
              metrics["reg"][i], np.log(k) - metrics["mean_entropy"][i],
              atol=1e-5, err_msg=where)


@pytest.mark.parametrize("kl_direction", losses.KL_DIRECTIONS)
def test_sorted_prior_matches_numpy_reference(kl_direction):
  b, v, d, k = 8, 3, 16, 12
  config = dict(DEFAULT, kl_direction=kl_direction, prior_order="sorted")
  for seed in range(3):
    anchors, targets, prototypes = make_inputs(b, v, d, k, seed=seed)
    # A custom prior in no particular order: sorting it is part of what is checked.
    prior = np.random.default_rng(seed).permutation(np_power_law(k, 1.0))
    _, metrics = losses.pmsn_loss(anchors, targets, prototypes, prior, **config)
    ref = np_pmsn(anchors, targets, prototypes, prior, **config)
    for key in ("loss", "ce", "reg"):
      np.testing.assert_allclose(metrics[key], ref[key], rtol=1e-5, atol=1e-5,
                                 err_msg=f"{key} seed={seed}")
    fixed = np_pmsn(anchors, targets, prototypes, prior, **dict(config, prior_order="fixed"))
    assert abs(fixed["loss"] - ref["loss"]) > 1e-3  # the ranking changed something


def test_sorted_prior_ignores_prototype_order_and_fixed_does_not():
  anchors, targets, prototypes = make_inputs(8, 3, 16, 12, seed=7)
  prior = losses.power_law_prior(12, 1.0)
  permuted = prototypes[np.random.default_rng(0).permutation(12)]
  loss = {order: [float(losses.pmsn_loss(anchors, targets, q, prior, prior_order=order)[0])
                  for q in (prototypes, permuted)] for order in losses.PRIOR_ORDERS}
  np.testing.assert_allclose(loss["sorted"][0], loss["sorted"][1], rtol=1e-5)
  assert abs(loss["fixed"][0] - loss["fixed"][1]) > 1e-3


def test_rank_matched_prior_gives_the_largest_value_to_the_most_used():
  prior = jnp.array([0.5, 0.3, 0.2])
  ranked = losses.rank_matched_prior(prior, jnp.array([0.1, 0.6, 0.3]))
  np.testing.assert_allclose(ranked, [0.2, 0.5, 0.3])
  tied = losses.rank_matched_prior(prior, jnp.full(3, 1 / 3))  # ties: prototype order
  np.testing.assert_allclose(tied, prior)
  unsorted = losses.rank_matched_prior(jnp.array([0.3, 0.2, 0.5]), jnp.array([0.1, 0.6, 0.3]))
  np.testing.assert_allclose(unsorted, [0.2, 0.5, 0.3])


def test_extreme_temperatures_stay_finite():
  # τ=0.005, T=0.1: target logits span ±2000 and p̄ underflows in float32.
  b, v, d, k = SHAPES[0]
  inputs = make_inputs(b, v, d, k, seed=5)
  for _, metrics in all_configs(*inputs, _priors(k), jnp.array([0.005, 0.1]),
                                1.0):
    for key, value in metrics.items():
      assert np.all(np.isfinite(value)), key


def test_bfloat16_inputs_are_computed_in_float32():
  # Traced, not compiled (compiles dominate test time): after the entry casts
  # no bfloat16 value is produced anywhere in the computation.
  b, v, d, k = SHAPES[0]
  bf16 = [jnp.asarray(x, jnp.bfloat16) for x in make_inputs(b, v, d, k, 0)]
  jaxpr = jax.make_jaxpr(losses.pmsn_loss)(*bf16, losses.uniform_prior(k))
  out_dtypes = [var.aval.dtype for eqn in jaxpr.eqns for var in eqn.outvars]
  assert jnp.bfloat16 not in out_dtypes
  loss, metrics = jax.eval_shape(losses.pmsn_loss, *bf16,
                                 losses.uniform_prior(k))
  assert loss.dtype == jnp.float32
  assert all(m.dtype == jnp.float32 and m.shape == () for m in metrics.values())


@jax.jit
def _values_and_grads(anchors, targets, prototypes, prior):
  """Both KL directions: ((loss, metrics), (d/d anchors, targets, protos))."""
  return [jax.value_and_grad(
      lambda *x, d=d: losses.pmsn_loss(*x, prior, kl_direction=d),
      argnums=(0, 1, 2), has_aux=True)(anchors, targets, prototypes)
          for d in losses.KL_DIRECTIONS]


def test_gradients_under_jit_on_batch_sharded_arrays():
  # The batch is sharded over the 8 fake devices (conftest): the batch means
  # become cross-device reductions inside jit, with no code change.
  devices = np.array(jax.devices())
  assert len(devices) == 8
  shard = jax.sharding.NamedSharding(jax.sharding.Mesh(devices, ("data",)),
                                     jax.sharding.PartitionSpec("data"))
  b, v, d, k = SHAPES[1]
  anchors, targets, prototypes = make_inputs(b, v, d, k, seed=21)
  results = _values_and_grads(jax.device_put(anchors, shard),
                              jax.device_put(targets, shard), prototypes,
                              losses.power_law_prior(k, 0.25))
  for direction, ((loss, _), grads) in zip(losses.KL_DIRECTIONS, results):
    ref = np_pmsn(anchors, targets, prototypes, np_power_law(k, 0.25),
                  **dict(DEFAULT, kl_direction=direction))
    np.testing.assert_allclose(loss, ref["loss"], rtol=1e-5, atol=1e-5)
    grad_anchors, grad_targets, grad_prototypes = grads
    for g in (grad_anchors, grad_prototypes):
      assert np.all(np.isfinite(g)) and np.abs(g).max() > 1e-4
    # Targets only feed the stop-gradient target path.
    np.testing.assert_array_equal(grad_targets, np.zeros_like(targets))


# ----------------------------------------------------------------------------
# Sinkhorn.
# ----------------------------------------------------------------------------
def _probs(b, k, seed, scale=2.0):
  rng = np.random.default_rng(seed)
  return np_softmax(scale * rng.normal(size=(b, k)))


@pytest.mark.parametrize("marginal_kind", ["uniform", "power"])
def test_sinkhorn_marginals(marginal_kind):
  b, k = 16, 32
  probs = _probs(b, k, seed=11)
  m = np_power_law(k, 0.0 if marginal_kind == "uniform" else 0.5)
  errors = []
  for n in (1, 3, 50):
    out = np.asarray(losses.sinkhorn(jnp.asarray(probs, jnp.float32), m, n))
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)
    errors.append(np.abs(out.sum(axis=0) - b * m).max())
  assert errors[2] < 1e-3
  assert errors[0] > errors[1] > errors[2]


def test_sinkhorn_matches_numpy_probability_domain():
  probs = _probs(16, 32, seed=12)
  m = np_power_law(32, 0.25)
  out = losses.sinkhorn(jnp.asarray(probs, jnp.float32), m, 3)
  np.testing.assert_allclose(out, np_sinkhorn(probs, m, 3), rtol=1e-5,
                             atol=1e-6)
  # The logits entry point agrees (logits = log p up to a per-row constant).
  logits = np.log(probs) + np.arange(16)[:, None]
  out2 = losses.sinkhorn_from_logits(jnp.asarray(logits, jnp.float32), m, 3)
  np.testing.assert_allclose(out2, out, rtol=1e-5, atol=1e-6)


def test_sinkhorn_zero_iters_is_row_normalisation():
  probs = 3.0 * _probs(16, 32, seed=13)
  out = losses.sinkhorn(jnp.asarray(probs, jnp.float32), np.full(32, 1 / 32), 0)
  np.testing.assert_allclose(out, probs / probs.sum(1, keepdims=True),
                             atol=1e-6)


def test_sinkhorn_peaked_logits_and_zeros_stay_finite():
  rng = np.random.default_rng(14)
  logits = jnp.asarray(1e4 * rng.normal(size=(16, 32)), jnp.float32)
  m = losses.power_law_prior(32, 0.25)
  out = np.asarray(losses.sinkhorn_from_logits(logits, m, 3))
  assert np.all(np.isfinite(out))
  np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)
  # Exact zeros (e.g. an underflowed sharpened softmax) stay zero, no NaN.
  probs = _probs(16, 32, seed=15)
  probs[:, 0] = 0.0
  probs[0, 1:] = 0.0
  probs[0, 1] = 1.0
  out = np.asarray(losses.sinkhorn(jnp.asarray(probs, jnp.float32),
                                   np.full(32, 1 / 32), 3))
  assert np.all(np.isfinite(out))
  assert np.all(out[:, 0] == 0) and np.all(out[0, 2:] == 0)
  np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)


# ----------------------------------------------------------------------------
# Priors.
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("k,exponent", [(1, 0.5), (10, 0.25), (1024, 0.25),
                                        (1024, 1.0), (7, 2.0)])
def test_power_law_prior(k, exponent):
  prior = losses.power_law_prior(k, exponent)
  assert prior.dtype == jnp.float32 and prior.shape == (k,)
  np.testing.assert_allclose(prior, np_power_law(k, exponent), rtol=1e-6)
  np.testing.assert_allclose(float(jnp.sum(prior)), 1.0, atol=1e-6)
  losses.validate_prior(prior, k)


def test_power_law_special_values():
  np.testing.assert_array_equal(losses.power_law_prior(64, 0.0),
                                losses.uniform_prior(64))
  np.testing.assert_allclose(losses.uniform_prior(64), 1 / 64, rtol=1e-6)
  prior = np.asarray(losses.power_law_prior(1024, 0.25))
  np.testing.assert_allclose(prior[0] / prior[-1], 1024 ** 0.25, rtol=1e-5)
  assert abs(prior[0] / prior[-1] - 5.66) < 0.01
  np.testing.assert_allclose(prior[:102].sum(), 0.175, atol=2e-3)  # top 10% hold 17.5%


# ----------------------------------------------------------------------------
# Errors name the offending argument.
# ----------------------------------------------------------------------------
def _call(**overrides):
  args = dict(anchors=np.ones((4, 2, 8), np.float32),
              targets=np.ones((4, 8), np.float32),
              prototypes=np.ones((16, 8), np.float32),
              prior=losses.uniform_prior(16))
  args.update(overrides)
  pos = [args.pop(n) for n in ("anchors", "targets", "prototypes", "prior")]
  return losses.pmsn_loss(*pos, **args)


@pytest.mark.parametrize("overrides,match", [
    (dict(anchors=np.ones((4, 8), np.float32)), "anchors"),
    (dict(targets=np.ones((4, 1, 8), np.float32)), "targets"),
    (dict(prototypes=np.ones((16,), np.float32)), "prototypes"),
    (dict(targets=np.ones((5, 8), np.float32)), "targets batch 5"),
    (dict(targets=np.ones((4, 7), np.float32)), "targets 7"),
    (dict(prototypes=np.ones((16, 9), np.float32)), "prototypes 9"),
    (dict(prior=losses.uniform_prior(15)), "prior must be a 1-D vector of "
     "length num_prototypes=16"),
    (dict(prior=np.full(16, -1 / 16)), "prior must be finite and strictly"),
    (dict(prior=np.full(16, 0.1)), "prior must sum to 1"),
    (dict(sinkhorn_marginal="sorted"), "sinkhorn_marginal.*'prior', 'uniform'"),
    (dict(kl_direction="reverse"),
     "kl_direction.*'mean_to_prior', 'prior_to_mean'"),
    (dict(prior_order="ranked"), "prior_order.*'fixed', 'sorted'"),
    (dict(temperature=0.0), "temperature"),
    (dict(target_temperature=-1.0), "target_temperature"),
    (dict(sinkhorn_iters=-1), "sinkhorn_iters"),
    (dict(sinkhorn_iters=1.5), "sinkhorn_iters"),
])
def test_pmsn_loss_errors(overrides, match):
  with pytest.raises(ValueError, match=match):
    _call(**overrides)


def test_prior_and_sinkhorn_errors():
  with pytest.raises(ValueError, match="num_prototypes"):
    losses.power_law_prior(0, 0.25)
  with pytest.raises(ValueError, match="exponent"):
    losses.power_law_prior(8, -0.5)
  with pytest.raises(ValueError, match="num_prototypes"):
    losses.uniform_prior(0)
  with pytest.raises(ValueError, match="prior must be a 1-D"):
    losses.validate_prior(np.full((2, 4), 1 / 8), 8)
  with pytest.raises(ValueError, match="prior must be finite"):
    losses.validate_prior(np.array([0.5, 0.5, 0.0]), 3)
  with pytest.raises(ValueError, match="prior must be finite"):
    losses.validate_prior(np.array([0.5, np.nan, 0.5]), 3)
  with pytest.raises(ValueError, match="prior must sum to 1"):
    losses.validate_prior(np.array([0.5, 0.5, 0.1]), 3)
  probs = jnp.full((4, 3), 1 / 3)
  with pytest.raises(ValueError, match="probs"):
    losses.sinkhorn(jnp.ones((4,)), jnp.full(3, 1 / 3), 3)
  with pytest.raises(ValueError, match="logits"):
    losses.sinkhorn_from_logits(jnp.ones((2, 4, 3)), jnp.full(3, 1 / 3), 3)
  with pytest.raises(ValueError, match="marginal"):
    losses.sinkhorn(probs, jnp.full(4, 1 / 4), 3)
  with pytest.raises(ValueError, match="num_iters"):
    losses.sinkhorn(probs, jnp.full(3, 1 / 3), -1)


def test_validate_prior_skips_values_under_jit():
  # Shape is static and still checked; values are tracers and are not.
  jax.jit(lambda p: losses.validate_prior(p, 3))(jnp.array([0.5, 0.5, 0.5]))
  with pytest.raises(ValueError, match="prior must be a 1-D"):
    jax.jit(lambda p: losses.validate_prior(p, 4))(jnp.array([0.5, 0.5, 0.5]))


def test_validate_prior_accepts_custom_priors():
  losses.validate_prior([0.2, 0.3, 0.5], 3)  # A config list is fine.
  losses.validate_prior(np.array([0.2, 0.3, 0.5 + 5e-5]), 3)  # Within 1e-4.
