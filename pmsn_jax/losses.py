"""PMSN loss: MSN with a (power-law) cluster prior.

MSN (Assran et al., 2022) matches soft prototype assignments of masked anchor
views to sharpened, Sinkhorn-balanced assignments of the unmasked target view,
and adds ME-MAX, which pushes the mean assignment p̄ towards uniform. That is a
hidden uniform cluster prior; PMSN (Assran et al., ICLR 2023) replaces it with
KL(p̄ ‖ π) for a prior π, e.g. a power law for long-tailed data.

MSN is exactly `pmsn_loss(..., prior=uniform_prior(K),
sinkhorn_marginal="uniform")`: with uniform π, KL(p̄ ‖ π) = log K − H(p̄),
i.e. MSN's ME-MAX term up to a constant.

All functions are single-device math. Under `jax.jit` on a batch-sharded
global array the batch means / sums below become cross-device reductions, so
there are no hand-written collectives. Everything is computed in float32.
"""
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

SINKHORN_MARGINALS = ("prior", "uniform")
KL_DIRECTIONS = ("mean_to_prior", "prior_to_mean")
PRIOR_ORDERS = ("fixed", "sorted")
_PRIOR_SUM_ATOL = 1e-4


def _is_concrete(x) -> bool:
  """Value checks need concrete data; under jit we only have shapes."""
  return not isinstance(x, jax.core.Tracer)


def power_law_prior(num_prototypes: int, exponent: float) -> jnp.ndarray:
  """π_k ∝ k^-exponent for k = 1..K, in fixed prototype order (no sorting).

  exponent 0 is uniform; 0.25 is the common default (π_1/π_K = 5.7 at K=1024).
  Computed in float64 NumPy (it is a constant) and returned as float32.
  """
  if int(num_prototypes) != num_prototypes or num_prototypes < 1:
    raise ValueError(
        f"num_prototypes must be a positive integer, got {num_prototypes!r}.")
  if not np.isfinite(exponent) or exponent < 0:
    raise ValueError(
        f"exponent must be a finite number >= 0 (0 gives a uniform prior), "
        f"got {exponent!r}.")
  k = np.arange(1, int(num_prototypes) + 1, dtype=np.float64)
  prior = k ** (-float(exponent))
  return jnp.asarray(prior / prior.sum(), dtype=jnp.float32)


def uniform_prior(num_prototypes: int) -> jnp.ndarray:
  """π_k = 1/K: the prior hidden in MSN's ME-MAX regulariser."""
  return power_law_prior(num_prototypes, 0.0)


def validate_prior(prior: Any, num_prototypes: int) -> None:
  """Checks a (e.g. user-given "custom") prior: shape [K], positive, sums to 1.

  The shape is always checked (it is static under jit); the values only when
  `prior` is concrete, so this is safe to call inside jitted code.
  """
  shape = np.shape(prior)
  if shape != (num_prototypes,):
    raise ValueError(
        f"prior must be a 1-D vector of length num_prototypes={num_prototypes} "
        f"(one mass per prototype), got shape {shape}; build it with e.g. "
        f"power_law_prior(num_prototypes, exponent).")
  if not _is_concrete(prior):
    return
  values = np.asarray(prior, dtype=np.float64)
  if not np.all(np.isfinite(values) & (values > 0)):
    raise ValueError(
        f"prior must be finite and strictly positive (log π enters the loss), "
        f"got min {np.nanmin(values)!r}; give every prototype some mass.")
  total = values.sum()
  if abs(total - 1.0) > _PRIOR_SUM_ATOL:
    raise ValueError(
        f"prior must sum to 1 (within {_PRIOR_SUM_ATOL}), got sum {total!r}; "
        f"normalise it, e.g. prior / prior.sum().")


def _log_rescale(log_p: jnp.ndarray, axis, log_mass) -> jnp.ndarray:
  """Rescales slices along `axis` to total mass exp(log_mass), in log domain.

  An all-zero slice (logsumexp = -inf) cannot be rescaled; it is left at zero
  instead of turning into NaN (-inf - -inf).
  """
  lse = jax.nn.logsumexp(log_p, axis=axis, keepdims=True)
  lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
  return log_p - lse + log_mass


def _log_sinkhorn(x: jnp.ndarray, marginal: jnp.ndarray, num_iters: int,
                  name: str, from_logits: bool) -> jnp.ndarray:
  """Log-domain Sinkhorn; x is logits or log p (any scale). Returns log P."""
  if x.ndim != 2:
    raise ValueError(f"{name} must be rank 2 [B, K], got shape {x.shape}.")
  batch, num_prototypes = x.shape
  if np.shape(marginal) != (num_prototypes,):
    raise ValueError(f"marginal must have shape [K]=({num_prototypes},), "
                     f"got {np.shape(marginal)}.")
  if int(num_iters) != num_iters or num_iters < 0:
    raise ValueError(f"num_iters must be an integer >= 0, got {num_iters!r}.")
  log_p = x.astype(jnp.float32)
  if from_logits:
    log_p = jax.nn.log_softmax(log_p, axis=-1)
  if num_iters == 0:  # Sinkhorn off: plain row normalisation.
    return _log_rescale(log_p, 1, 0.0)
  log_marginal = jnp.log(jnp.asarray(marginal, jnp.float32))[None, :]
  log_batch = jnp.log(jnp.float32(batch))
  # P = p / sum(P): a global shift, absorbed by the first column rescale, kept
  # to mirror the official code (and to keep magnitudes near 0).
  log_p = _log_rescale(log_p, (0, 1), 0.0)
  for _ in range(int(num_iters)):  # Official MSN order: columns, then rows.
    log_p = _log_rescale(log_p, 0, log_marginal)  # prototype k -> mass m_k
    log_p = _log_rescale(log_p, 1, -log_batch)    # sample b -> mass 1/B
  return log_p + log_batch  # Each row is an assignment summing to 1.


def sinkhorn_from_logits(logits: jnp.ndarray, marginal: jnp.ndarray,
                         num_iters: int) -> jnp.ndarray:
  """Sinkhorn-Knopp balancing of softmax(logits, -1) [B, K] to `marginal`.

  Equals `sinkhorn(softmax(logits), ...)` but never leaves the log domain, so
  a very peaked sharpened target (logits / (τT) span hundreds) cannot
  underflow. The softmax matters: a per-row offset of the logits is not a
  no-op, since the first step rescales columns. Rows of the result sum to 1,
  column k to ≈ B·marginal_k. No stop_gradient here: the caller decides.
  """
  logits = jnp.asarray(logits)
  return jnp.exp(_log_sinkhorn(logits, marginal, num_iters, "logits", True))


def sinkhorn(probs: jnp.ndarray, marginal: jnp.ndarray,
             num_iters: int) -> jnp.ndarray:
  """Official MSN Sinkhorn on non-negative probs [B, K] (e.g. sharpened).

  Runs in the log domain on log(probs): zeros stay exactly zero, as in the
  probability domain, and an all-zero row or column stays zero, not NaN.
  For row-normalised probs this is `sinkhorn_from_logits(log(probs), ...)`.
  """
  probs = jnp.asarray(probs, jnp.float32)
  positive = probs > 0
  log_p = jnp.where(positive, jnp.log(jnp.where(positive, probs, 1.0)),
                    -jnp.inf)
  return jnp.exp(_log_sinkhorn(log_p, marginal, num_iters, "probs", False))


def rank_matched_prior(prior: jnp.ndarray, usage: jnp.ndarray) -> jnp.ndarray:
  """The prior's values reordered so that the most used prototype gets the largest one.

  Ties in `usage` keep prototype order (a stable sort). No gradient flows through the
  ranking: it only decides which prototype each prior value is asked of.
  """
  order = jnp.argsort(-jax.lax.stop_gradient(usage), stable=True)
  return jnp.zeros_like(prior).at[order].set(jnp.sort(prior)[::-1])


def l2_normalize(x: jnp.ndarray, eps: float = 1e-12) -> jnp.ndarray:
  """x / max(‖x‖, eps) along the last axis, like torch F.normalize (zero rows stay zero), with a
  finite gradient at x = 0. The loss, the linear probe and low-shot use it; the k-NN keeps its
  own division form (evals/knn.py says why)."""
  sq = jnp.sum(x * x, axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def pmsn_loss(anchors: jnp.ndarray, targets: jnp.ndarray, prototypes: jnp.ndarray,
              prior: jnp.ndarray, **kwargs) -> Tuple[jnp.ndarray, Dict[str, jnp.ndarray]]:
  """PMSN loss and scalar metrics: `pmsn_loss_with_aux` without the vectors.

  Under jit the unused diagnostic vectors cost nothing (XLA drops them).
  """
  loss, metrics, _ = pmsn_loss_with_aux(anchors, targets, prototypes, prior, **kwargs)
  return loss, metrics


def pmsn_loss_with_aux(
    anchors: jnp.ndarray,
    targets: jnp.ndarray,
    prototypes: jnp.ndarray,
    prior: jnp.ndarray,
    *,
    temperature: float = 0.1,
    target_temperature: float = 0.25,
    sinkhorn_iters: int = 3,
    sinkhorn_marginal: str = "prior",
    reg_weight: float = 1.0,
    kl_direction: str = "mean_to_prior",
    prior_order: str = "fixed",
) -> Tuple[jnp.ndarray, Dict[str, jnp.ndarray], Dict[str, jnp.ndarray]]:
  """PMSN loss L = CE(P, p_a) + reg_weight · KL against the prior.

  Args:
    anchors: [B, V, d] anchor-view projections (masked + focal views).
    targets: [B, d] target-encoder projections; no gradient flows through them
      (nor through the prototypes on the target path), as in official MSN.
    prototypes: [K, d] learnable prototypes.
    prior: [K] cluster prior π (positive, sums to 1).
    temperature: τ of the anchor (and target) softmax over prototypes.
    target_temperature: sharpening T; target logits are scaled by 1/(τT).
    sinkhorn_iters: Sinkhorn iterations on the targets; 0 disables it.
    sinkhorn_marginal: "prior" balances target clusters to B·π (PMSN's default
      here); "uniform" to B/K (MSN, lightly's PMSN).
    reg_weight: λ on the regulariser.
    kl_direction: "mean_to_prior" R = KL(p̄‖π) (default; ME-MAX for uniform π)
      or "prior_to_mean" R = KL(π‖p̄) (what lightly computes).
    prior_order: "fixed" (π_k belongs to prototype k: the paper and every known
      implementation) or "sorted" (not in the paper; docs/sorted_prior.md): each
      step gives the largest π to the prototype the batch's raw targets use most,
      the second largest to the next, and so on, for both Sinkhorn and the KL. A
      fixed order asks prototype 1 to take π_1 of every batch, whichever class
      fills it; the sorted order asks only that the batch's cluster sizes have
      the prior's shape (permuting the prototypes permutes nothing in the loss).

  Returns:
    (loss, metrics, aux): scalar float32 loss; float32 scalars "loss", "ce",
    "reg", "mean_entropy" H(p̄), "target_entropy" (mean row entropy of P) and
    "prototypes_in_use" (prototypes that are the argmax of some row of P);
    aux holds the vectors the prototype diagnostics (diagnostics.py) need,
    kept apart because metric writers take scalars only:
    "target_usage" [K] column mass of P / B (prototype usage by the balanced
    targets), "raw_target_usage" [K] the same before Sinkhorn (the model's own
    cluster sizes, which Sinkhorn would otherwise flatten to its marginal),
    "mean_prediction" [K] p̄, and "assignments" [B] int32 argmax_k P[b, k].
  """
  _check_inputs(anchors, targets, prototypes, prior, sinkhorn_marginal=sinkhorn_marginal,
                kl_direction=kl_direction, prior_order=prior_order, temperature=temperature,
                target_temperature=target_temperature, sinkhorn_iters=sinkhorn_iters)
  f32 = jnp.float32
  anchors, targets, prototypes = (
      l2_normalize(x.astype(f32)) for x in (anchors, targets, prototypes))
  prior = jnp.asarray(prior, f32)

  log_p_anchor = anchor_log_predictions(anchors, prototypes, temperature)
  p_target, raw_target_usage, prior = balanced_targets(
      targets, prototypes, prior, temperature=temperature,
      target_temperature=target_temperature, sinkhorn_iters=sinkhorn_iters,
      sinkhorn_marginal=sinkhorn_marginal, prior_order=prior_order)
  ce = cross_entropy(p_target, log_p_anchor)
  reg, p_mean, log_p_mean = prior_regulariser(log_p_anchor, prior, kl_direction)
  loss = ce + reg_weight * reg
  metrics, aux = _metrics_and_aux(loss, ce, reg, p_target, raw_target_usage, p_mean,
                                  log_p_mean)
  return loss, metrics, aux


def anchor_log_predictions(anchors, prototypes, temperature):
  """log p_a = log softmax(â Q̂ᵀ / τ) of unit-norm anchors [B, V, d] and prototypes [K, d]:
  [B, V, K]."""
  return jax.nn.log_softmax(
      jnp.einsum("bvd,kd->bvk", anchors, prototypes) / temperature, axis=-1)


def balanced_targets(targets, prototypes, prior, *, temperature, target_temperature,
                     sinkhorn_iters, sinkhorn_marginal, prior_order):
  """The targets P [B, K]: sharpened softmax(t̂ Q̂ᵀ / (τT)) of unit-norm targets, balanced by
  Sinkhorn to the marginal (the prior or uniform). The stop gradient on the logits covers the
  whole target path (targets, prototypes), as in official MSN.

  Returns (P, raw usage [K]: the column mass before Sinkhorn, the prior as used: rank-matched
  to the raw usage when prior_order = "sorted", else `prior`)."""
  num_prototypes = prototypes.shape[0]
  target_logits = jax.lax.stop_gradient(
      targets @ prototypes.T / (temperature * target_temperature))
  raw_target_usage = jnp.mean(jax.nn.softmax(target_logits, axis=-1), axis=0)
  if prior_order == "sorted":
    prior = rank_matched_prior(prior, raw_target_usage)
  marginal = (prior if sinkhorn_marginal == "prior"
              else jnp.full((num_prototypes,), 1.0 / num_prototypes, jnp.float32))
  p_target = jnp.exp(_log_sinkhorn(target_logits, marginal, sinkhorn_iters,
                                   "targets", from_logits=True))
  return p_target, raw_target_usage, prior


def cross_entropy(p_target, log_p_anchor):
  """Mean over batch rows and anchor views of −Σ_k P[b, k] log p_a[b, v, k]."""
  return -jnp.mean(jnp.sum(p_target[:, None, :] * log_p_anchor, axis=-1))


def prior_regulariser(log_p_anchor, prior, kl_direction):
  """(R, p̄, log p̄): R = KL(p̄ ‖ π) ("mean_to_prior", ME-MAX for a uniform π) or KL(π ‖ p̄)
  ("prior_to_mean"), p̄ the mean anchor prediction over batch rows and views.

  log p̄ comes from a logsumexp over (b, v): an exact "safe log" (no epsilon), finite even
  where p̄_k underflows, so both KL directions stay finite."""
  num_rows = log_p_anchor.shape[0] * log_p_anchor.shape[1]
  log_p_mean = (jax.nn.logsumexp(log_p_anchor, axis=(0, 1))
                - jnp.log(jnp.float32(num_rows)))
  p_mean = jnp.exp(log_p_mean)
  log_prior = jnp.log(prior)
  if kl_direction == "mean_to_prior":
    reg = jnp.sum(p_mean * (log_p_mean - log_prior))
  else:
    reg = jnp.sum(prior * (log_prior - log_p_mean))
  return reg, p_mean, log_p_mean


def _metrics_and_aux(loss, ce, reg, p_target, raw_target_usage, p_mean, log_p_mean):
  """The loss's scalar metrics and diagnostic vectors (see pmsn_loss_with_aux)."""
  f32 = jnp.float32
  assignments = jnp.argmax(p_target, axis=-1).astype(jnp.int32)
  assigned = jax.nn.one_hot(assignments, p_target.shape[-1])
  metrics = {
      "loss": loss,
      "ce": ce,
      "reg": reg,
      "mean_entropy": -jnp.sum(p_mean * log_p_mean),
      "target_entropy": jnp.mean(jnp.sum(
          jax.scipy.special.entr(p_target), axis=-1)),
      "prototypes_in_use": jnp.sum(jnp.max(assigned, axis=0)).astype(f32),
  }
  aux = {
      "target_usage": jnp.mean(p_target, axis=0),
      "raw_target_usage": raw_target_usage,
      "mean_prediction": p_mean,
      "assignments": assignments,
  }
  return metrics, aux


def _check_inputs(anchors, targets, prototypes, prior, *, sinkhorn_marginal, kl_direction,
                  prior_order, temperature, target_temperature, sinkhorn_iters):
  """Shapes, the prior and the options of pmsn_loss_with_aux, checked at trace time: a
  library call with a wrong argument fails with its name, before any compile."""
  if anchors.ndim != 3:
    raise ValueError(f"anchors must be rank 3 [B, V, d], got {anchors.shape}.")
  if targets.ndim != 2:
    raise ValueError(f"targets must be rank 2 [B, d], got {targets.shape}.")
  if prototypes.ndim != 2:
    raise ValueError(f"prototypes must be rank 2 [K, d], got "
                     f"{prototypes.shape}.")
  if targets.shape[0] != anchors.shape[0]:
    raise ValueError(f"targets batch {targets.shape[0]} != anchors batch "
                     f"{anchors.shape[0]} (anchors [B, V, d], targets [B, d]).")
  dims = (anchors.shape[-1], targets.shape[-1], prototypes.shape[-1])
  if len(set(dims)) != 1:
    raise ValueError(f"feature dim mismatch: anchors {dims[0]}, targets "
                     f"{dims[1]}, prototypes {dims[2]} must all be equal.")
  validate_prior(prior, prototypes.shape[0])
  if sinkhorn_marginal not in SINKHORN_MARGINALS:
    raise ValueError(f"sinkhorn_marginal must be one of {SINKHORN_MARGINALS}, "
                     f"got {sinkhorn_marginal!r}.")
  if kl_direction not in KL_DIRECTIONS:
    raise ValueError(f"kl_direction must be one of {KL_DIRECTIONS}, "
                     f"got {kl_direction!r}.")
  if prior_order not in PRIOR_ORDERS:
    raise ValueError(f"prior_order must be one of {PRIOR_ORDERS}, got {prior_order!r}.")
  for name, value in (("temperature", temperature),
                      ("target_temperature", target_temperature)):
    if _is_concrete(value) and not value > 0:
      raise ValueError(f"{name} must be > 0, got {value!r}.")
  if int(sinkhorn_iters) != sinkhorn_iters or sinkhorn_iters < 0:
    raise ValueError(f"sinkhorn_iters must be an integer >= 0 (0 disables "
                     f"Sinkhorn), got {sinkhorn_iters!r}.")
