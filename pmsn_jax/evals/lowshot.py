"""Low-shot evaluation as in MSN: logistic regression on 1, 2 and 5 labelled images per class.

Protocol (MSN's logistic_eval.py, with its cyanure solver replaced by JAX):
  * k images of each class are drawn from the balanced train split; the draw is repeated for
    several label splits (MSN ships three fixed ImageNet subsets; here a split is a seed);
  * frozen features are L2-normalised and an L2-regularised multinomial logistic regression
    (mean cross-entropy + (l2 / 2) ||W||^2, bias unregularised) is fit to convergence;
  * top-1 on the whole test set, reported as mean and std over the splits.

Why full-batch L-BFGS (optax.lbfgs with a zoom line search) rather than SGD: the problem is
small (k x num_classes rows) and strongly convex, so its minimiser is unique and a quasi-Newton
method reaches it in tens to a few hundred iterations; the result then depends on the
objective only, not on a learning rate, an epoch count or the order of mini-batches. Plain
gradient descent needs ~(1 / l2) iterations for the same accuracy.

Differences from MSN: MSN's cyanure fit has no bias, centres each feature vector (over its
dimensions) before normalising it, and uses lambda = 2.5e-4 / n (n = labelled images). A
few-shot problem is separable, so with so small a lambda the optimum has a huge ||W|| and the
result also depends on the solver's stopping rule (relative duality gap 1e-3, at most 300
epochs). Here lambda is fixed and larger (DEFAULT_L2) and the fit is solved to a gradient
tolerance, so the number depends on the objective alone.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from pmsn_jax.evals import classwise, knn, linear
from pmsn_jax.losses import l2_normalize

# lambda of mean CE + (lambda / 2) ||W||^2 on unit-norm features. A few-shot problem is
# separable, so only lambda keeps ||W|| finite; the condition number grows like 1 / lambda as
# lambda falls, and W shrinks towards (bias-shifted) class means as it rises.
# Measured on raw-pixel Fashion-MNIST (3 splits): 1/2/5-shot top-1 is flat within ~1 point for
# lambda in [1e-5, 1e-2] (46 / 55-57 / 65-66%) and drops at 5 shots for lambda >= 0.1 (61%);
# 1e-3 sits in the flat range a decade from the drop, and L-BFGS reaches the tolerance there
# in <= 62 steps.
DEFAULT_L2 = 1e-3
DEFAULT_STEPS = 1000  # L-BFGS iteration cap; the fit stops earlier at DEFAULT_TOL.
DEFAULT_TOL = 1e-5    # On the gradient norm; float32 objectives stall not far below it.


def _logits(params, x):
  # HIGHEST: tf32/bf16 matmuls on GPU/TPU would put rounding noise into the gradient that the
  # tolerance is measured against; the matmul is tiny next to feature extraction.
  return jnp.matmul(x, params["kernel"], precision=jax.lax.Precision.HIGHEST) + params["bias"]


def objective(params, features, labels, l2, mask=None):
  """Mean softmax cross-entropy + (l2 / 2) ||kernel||^2; the bias is not regularised.

  mask: optional [N] 0/1 weights; the mean is over the rows with weight 1 (padding rows with
  weight 0 change neither the value nor the gradient).
  """
  ce = optax.softmax_cross_entropy_with_integer_labels(_logits(params, features), labels)
  mean_ce = jnp.mean(ce) if mask is None else jnp.sum(ce * mask) / jnp.sum(mask)
  return mean_ce + 0.5 * l2 * jnp.sum(jnp.square(params["kernel"]))


@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def _fit(features, labels, mask, l2, tol, *, num_classes, steps):
  params = {"kernel": jnp.zeros((features.shape[1], num_classes), jnp.float32),
            "bias": jnp.zeros((num_classes,), jnp.float32)}
  fun = functools.partial(objective, features=features, labels=labels, l2=l2, mask=mask)
  solver = optax.lbfgs()
  # Reuses the value and gradient the line search already computed at the accepted point.
  value_and_grad = optax.value_and_grad_from_state(fun)

  def step(carry):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=fun)
    return optax.apply_updates(params, updates), state

  def keep_going(carry):
    _, state = carry
    count = optax.tree.get(state, "count")
    grad_norm = optax.tree.norm(optax.tree.get(state, "grad"))
    return (count == 0) | ((count < steps) & (grad_norm >= tol))

  params, state = jax.lax.while_loop(keep_going, step, (params, solver.init(params)))
  return params, optax.tree.get(state, "count"), optax.tree.norm(optax.tree.get(state, "grad"))


def fit_logistic_regression(features, labels, *, num_classes, l2=DEFAULT_L2,
                            steps=DEFAULT_STEPS, tol=DEFAULT_TOL, pad_to=0):
  """Minimises `objective` on the features as given (no normalisation) with L-BFGS.

  pad_to: if larger than N, zero-weight rows are appended up to this many, so fits of
  different sizes (1, 2, 5 shots) share one compiled solver; the optimum is unchanged.

  Returns ({"kernel": [D, C], "bias": [C]}, {"steps": iterations run, "grad_norm": final
  gradient norm}). Starts from zero weights, so the result is deterministic; the bias is only
  defined up to a constant shared by all classes (softmax is shift-invariant), which leaves
  predictions unchanged.
  """
  if not l2 > 0:
    raise ValueError(f"l2 must be > 0 (the objective is then strongly convex), got {l2}")
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  features, labels = np.asarray(features, np.float32), np.asarray(labels, np.int32)
  extra = max(0, pad_to - features.shape[0])
  mask = np.concatenate([np.ones(features.shape[0], np.float32), np.zeros(extra, np.float32)])
  params, count, grad_norm = _fit(
      np.pad(features, ((0, extra), (0, 0))), np.pad(labels, (0, extra)), mask, jnp.float32(l2),
      jnp.float32(tol), num_classes=num_classes, steps=int(steps))
  return jax.device_get(params), {"steps": int(count), "grad_norm": float(grad_norm)}


_normalize = jax.jit(l2_normalize)


@jax.jit
def _predict(params, x):
  return jnp.argmax(_logits(params, l2_normalize(x)), axis=-1).astype(jnp.int32)


def logistic_regression(train_features, train_labels, test_features, *, num_classes,
                        l2=DEFAULT_L2, steps=DEFAULT_STEPS, tol=DEFAULT_TOL,
                        pad_to=0) -> np.ndarray:
  """Fits the L2-regularised logistic regression on L2-normalised train features.

  Args:
    train_features: [N, D] frozen features; train_labels: [N] ints in [0, num_classes).
    test_features: [M, D] features to classify (normalised the same way).
    num_classes: classes of the linear layer.
    l2: lambda of the objective, see DEFAULT_L2.
    steps, tol: L-BFGS iteration cap and gradient-norm tolerance. Not reaching the tolerance
      logs a warning rather than failing: the weights are then close to, not at, the optimum.
    pad_to: see fit_logistic_regression (compile once for several train sizes).

  Returns:
    [M] int32 numpy array of predicted labels.
  """
  train_features, train_labels, test_features = knn.check_probe_inputs(
      train_features, train_labels, test_features, num_classes)
  params, info = fit_logistic_regression(np.asarray(_normalize(train_features)), train_labels,
                                         num_classes=num_classes, l2=l2, steps=steps, tol=tol,
                                         pad_to=pad_to)
  if not info["grad_norm"] < tol:
    logging.warning("low-shot logistic regression stopped after %d L-BFGS steps with gradient "
                    "norm %.2e (tolerance %.0e)", info["steps"], info["grad_norm"], tol)
  return linear.predict_in_chunks(_predict, params, test_features)


def check_shots(train_labels, num_classes, shots) -> None:
  """Raises ValueError (one line, naming the fix) unless every class has >= shots train rows.

  Cheap: callers run it before extracting features so a bad setting fails in seconds.
  """
  if not isinstance(shots, (int, np.integer)) or shots < 1:
    raise ValueError(f"low-shot needs a positive number of images per class, got {shots!r}")
  counts = np.bincount(classwise.check_labels(train_labels, num_classes, "train_labels"),
                       minlength=num_classes)
  short = np.flatnonzero(counts < shots)
  if short.size:
    raise ValueError(
        f"low-shot with {shots} images per class needs {shots} train images of every class, "
        f"but class {short[0]} has {counts[short[0]]} ({short.size} classes short); lower "
        f"eval.lowshot_shots or raise eval.max_train_examples")


def sample_shots(train_labels, num_classes, shots, *, seed, split) -> np.ndarray:
  """Rows of `shots` random train images per class: [num_classes * shots] ints, class-major.

  The draw is a function of (seed, split) only: within each class, rows are ranked by one
  random key per row, and the first `shots` are taken. So a split is reproducible, splits
  differ, and the 1-shot set of a split is inside its 2-shot set, which is inside its 5-shot
  set: the shot levels differ in how many labels they get, not in which images were drawn.
  """
  check_shots(train_labels, num_classes, shots)
  labels = np.asarray(train_labels)
  keys = np.random.default_rng([seed, split]).random(labels.shape[0])
  order = np.lexsort((keys, labels))  # By class, then by random key within the class.
  starts = np.searchsorted(labels[order], np.arange(num_classes))
  return order[starts[:, None] + np.arange(shots)].reshape(-1)


def summarize(accuracies) -> dict:
  """{"mean", "std", "per_split"} of per-split accuracies; std is the sample standard
  deviation (ddof=1, the honest spread for 3 splits), 0.0 for a single split."""
  accuracies = [float(a) for a in accuracies]
  if not accuracies:
    raise ValueError("summarize needs at least one accuracy")
  std = float(np.std(accuracies, ddof=1)) if len(accuracies) > 1 else 0.0
  return {"mean": float(np.mean(accuracies)), "std": std, "per_split": accuracies}


def lowshot(train_features, train_labels, test_features, test_labels, *, num_classes,
            shots=(1, 2, 5), splits=3, seed=0, l2=DEFAULT_L2, steps=DEFAULT_STEPS,
            tol=DEFAULT_TOL) -> dict:
  """Top-1 of `logistic_regression` fit on k images per class, for each k in `shots`.

  Args:
    train_features, train_labels: the labelled pool the k-shot sets are drawn from (the
      balanced train split).
    test_features, test_labels: every test image is scored.
    num_classes: number of classes; each must have >= max(shots) train rows.
    shots: images per class, e.g. (1, 2, 5).
    splits: label splits per k; split s uses the same rows for every k (see sample_shots).
    seed: seeds the splits. Keep it fixed across the runs being compared, so they are scored
      on the same labelled images.
    l2, steps, tol: see logistic_regression.

  Returns:
    {"<k>": {"mean": float, "std": float, "per_split": [float, ...]}, ...}, string keys so the
    dict is JSON as is.
  """
  train_features, train_labels, test_features = knn.check_probe_inputs(
      train_features, train_labels, test_features, num_classes)
  return lowshot_from(train_labels, lambda rows: train_features[rows], test_features,
                      test_labels, num_classes=num_classes, shots=shots, splits=splits,
                      seed=seed, l2=l2, steps=steps, tol=tol)


def lowshot_from(pool_labels, take: Callable[[np.ndarray], np.ndarray], test_features,
                 test_labels, *, num_classes, shots=(1, 2, 5), splits=3, seed=0, l2=DEFAULT_L2,
                 steps=DEFAULT_STEPS, tol=DEFAULT_TOL) -> dict:
  """`lowshot` with the pool given as its labels [N] and take(rows) -> features [n, D]: only
  the drawn rows are read, e.g. from features sharded over devices (features.SplitFeatures)."""
  pool_labels = classwise.check_labels(pool_labels, num_classes, "train_labels")
  test_features = np.asarray(test_features, np.float32)
  test_labels = classwise.check_labels(test_labels, num_classes, "test_labels")
  if test_labels.shape[0] != test_features.shape[0] or not test_labels.size:
    raise ValueError(f"test_labels has {test_labels.shape[0]} entries but test_features has "
                     f"{test_features.shape[0]} rows (need >= 1)")
  shots = tuple(shots)
  if (not shots or len(set(shots)) != len(shots)
      or not all(isinstance(k, (int, np.integer)) and k >= 1 for k in shots)):
    raise ValueError(f"shots must be distinct positive ints, got {shots}")
  if not isinstance(splits, (int, np.integer)) or splits < 1:
    raise ValueError(f"splits must be a positive int, got {splits!r}")
  check_shots(pool_labels, num_classes, max(shots))  # Before any fit, not after the 1-shot.
  result = {}
  for k in shots:
    accuracies = []
    for split in range(splits):
      rows = sample_shots(pool_labels, num_classes, k, seed=seed, split=split)
      pred = logistic_regression(take(rows), pool_labels[rows], test_features,
                                 num_classes=num_classes, l2=l2, steps=steps, tol=tol,
                                 pad_to=max(shots) * num_classes)  # One compile for all k.
      accuracies.append(classwise.top1(pred, test_labels))
    result[str(k)] = summarize(accuracies)
  return result
