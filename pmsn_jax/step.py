"""The pure PMSN train step: loss, gradients, AdamW update, EMA of the target. No I/O.

State is functional (nnx.split once, nnx.merge inside the step) so the whole step is one
`jax.jit` with explicit shardings and a donated state; see train.py for how it is compiled.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pmsn_jax import losses
from pmsn_jax import schedules as schedules_lib
from pmsn_jax import photometric
from pmsn_jax.models import msn


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32 scalar: number of updates applied so far
  params: nnx.State        # online encoder + head + prototypes (what the optimizer moves)
  target: nnx.State        # EMA target encoder + head
  batch_stats: nnx.State   # BatchNorm running statistics (kept, never used for training)
  opt_state: Any


def split_model(model: msn.MSN):
  """-> graphdef, trainable params, target params, batch stats."""
  return nnx.split(model, msn.TRAINABLE, msn.TARGET_PARAMS, nnx.BatchStat)


def decay_mask(params: nnx.State) -> nnx.State:
  """Official MSN: weight decay on everything but biases, norm scales and the prototypes.

  Decided by name, not ndim: scanned blocks stack their biases and norms into 2-D arrays.
  (pos_embed and cls_token are decayed, as in MSN's parameter groups.)
  """
  def decays(path, leaf):
    del leaf
    names = [str(getattr(key, "key", getattr(key, "name", key))) for key in path]
    names = [n for n in names if n != "value"]
    return names[-1] not in ("bias", "scale") and "prototypes" not in names
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config, schedules) -> optax.GradientTransformation:
  """AdamW with scheduled lr and weight decay, after global-norm clipping.

  Official MSN clips the encoder's gradients only; we clip the global norm of all trainable
  parameters (head and prototypes included), which is simpler and bounds the same quantity.
  """
  return optax.chain(
      optax.clip_by_global_norm(config.optim.grad_clip),
      optax.adamw(schedules.learning_rate, b1=config.optim.b1, b2=config.optim.b2,
                  weight_decay=schedules.weight_decay, mask=decay_mask))


def init_state(model: msn.MSN, tx: optax.GradientTransformation) -> TrainState:
  _, params, target, batch_stats = split_model(model)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, target=target,
                    batch_stats=batch_stats, opt_state=tx.init(params))


def build(config, vit_cfg):
  """-> (graphdef, optimizer, schedules, create_state) for a config; nothing is allocated.

  `create_state()` builds a fresh model + optimizer state: jit it with out_shardings so the
  state is born sharded, or jax.eval_shape it for restore targets.
  """
  scheds = schedules_lib.make_schedules(config)
  tx = make_optimizer(config, scheds)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: msn.build_model(config.model, vit_cfg, 0)))

  def create_state() -> TrainState:
    return init_state(msn.build_model(config.model, vit_cfg, config.seed), tx)

  return graphdef, tx, scheds, create_state


def ema_update(target: nnx.State, params: nnx.State, momentum) -> nnx.State:
  """target <- m * target + (1 - m) * online (encoder + head; prototypes have no twin)."""
  moved = jax.tree.map(lambda t, o: momentum * t + (1.0 - momentum) * o,
                       target["target"], params["online"])
  return nnx.State({"target": moved.raw_mapping})


def prior_from_config(config) -> np.ndarray:
  """The cluster prior pi of config.loss (power_law | uniform | custom); a custom prior's values
  were checked with the rest of the config (validation.validate).

  prior = "fit" depends on data, not only on the config: prior_fit.PriorTracker resolves it.
  """
  k = config.model.num_prototypes
  if config.loss.prior == "fit":
    raise ValueError("config.loss.prior='fit' is estimated from data: use "
                     "prior_fit.PriorTracker (as train.py does), not step.prior_from_config")
  if config.loss.prior == "power_law":
    return np.asarray(losses.power_law_prior(k, config.loss.prior_exponent))
  if config.loss.prior == "uniform":
    return np.asarray(losses.uniform_prior(k))
  return np.asarray(config.loss.custom_prior, np.float32)


# What the step takes from each pipeline batch; "label" only feeds the diagnostics.
BATCH_KEYS = ("target", "anchor", "focal", "photometric", "label")


def abstract_batch(config, batch_sharding=None, prior_sharding=None
                   ) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes of the global batch the step is compiled for: the pipeline's BATCH_KEYS (uint8
  views and their photometric random numbers, see photometric.py), and the cluster prior
  [K], replicated (an input, so that prior = "fit" can change its value)."""
  d, b = config.data, config.batch_size
  batched = lambda dtype, *shape: jax.ShapeDtypeStruct(  # noqa: E731
      (b, *shape), dtype, sharding=batch_sharding)
  return {"target": batched(np.uint8, d.image_size, d.image_size, d.channels),
          "anchor": batched(np.uint8, d.image_size, d.image_size, d.channels),
          "focal": batched(np.uint8, d.num_focal, d.focal_size, d.focal_size, d.channels),
          "photometric": batched(np.float32, 2 + d.num_focal, len(photometric.COLUMNS)),
          "label": batched(np.int32),
          "prior": jax.ShapeDtypeStruct((config.model.num_prototypes,), np.float32,
                                        sharding=prior_sharding)}


def make_loss_fn(graphdef, config):
  """-> loss_fn(params, target, batch_stats, batch, rng)
        -> (loss, (metrics, batch_stats, aux)).

  The cluster prior is batch["prior"] ([K] float32): an input, not a constant, so that its
  value can change (prior = "fit") without recompiling. aux holds the loss's diagnostic vectors
  (losses.pmsn_loss_with_aux); under jit they cost nothing where unused.
  """
  loss_kwargs = dict(
      temperature=config.loss.temperature, target_temperature=config.loss.target_temperature,
      sinkhorn_iters=config.loss.sinkhorn_iters, sinkhorn_marginal=config.loss.sinkhorn_marginal,
      reg_weight=config.loss.reg_weight, kl_direction=config.loss.kl_direction,
      prior_order=config.loss.prior_order)
  mask_ratio = float(config.model.mask_ratio)

  def loss_fn(params, target, batch_stats, batch, rng):
    if "prior" not in batch:
      raise KeyError('the train step reads the cluster prior from batch["prior"] ([K] float32, '
                     'replicated; e.g. step.prior_from_config(config)); the batch has only '
                     + ", ".join(sorted(batch)))
    cluster_prior = batch["prior"]
    model = nnx.merge(graphdef, params, target, batch_stats, copy=True)
    anchors = model.anchor_projections(batch["anchor"], batch["focal"],
                                       mask_ratio=mask_ratio, rng=rng)
    targets = model.target_projections(batch["target"])
    loss, metrics, aux = losses.pmsn_loss_with_aux(
        anchors, targets, model.prototypes(), cluster_prior, **loss_kwargs)
    batch_stats = nnx.state(model, nnx.BatchStat)
    return loss, (metrics, batch_stats, aux)

  return loss_fn


def make_train_step(graphdef, tx, schedules, config):
  """Returns train_step(state, batch) -> (state, metrics, aux) for jax.jit.

  batch: the uint8 views ("target", "anchor", "focal") with their "photometric" random
    numbers, which the step first turns into normalised views (photometric.py); "prior" (the
    [K] cluster prior, an input: only its shape, dtype and sharding are compiled in, so prior
    = "fit" swaps the uniform warm-up prior for the fitted one without recompiling); and
    optionally "label".
  aux: the [K] prototype-usage vectors and [B] hard assignments of losses.pmsn_loss_with_aux,
    plus batch["label"] as "labels" when the batch has it, for the diagnostics at log steps.
    Labels go through the step so assignments and labels come back in the same global row
    order on every host (both replicated by the caller's out_shardings). Steps whose aux is
    not fetched only pay for the [K] and [B] outputs.
  """
  loss_fn = make_loss_fn(graphdef, config)
  base_key = jax.random.key(config.seed)

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    batch = photometric.batch_views(batch, config.data)  # uint8 -> normalised float32 views
    # Masks are a pure function of (seed, step): resuming at step t replays them exactly.
    rng = jax.random.fold_in(base_key, state.step)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (_, (metrics, batch_stats, aux)), grads = grad_fn(state.params, state.target,
                                                      state.batch_stats, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    momentum = schedules.ema_momentum(state.step)
    metrics = dict(metrics, grad_norm=optax.global_norm(grads),
                   learning_rate=schedules.learning_rate(state.step),
                   weight_decay=schedules.weight_decay(state.step), ema_momentum=momentum)
    new_state = state.replace(step=state.step + 1, params=params,
                              target=ema_update(state.target, params, momentum),
                              batch_stats=batch_stats, opt_state=opt_state)
    aux = dict(aux, **({"labels": batch["label"]} if "label" in batch else {}))
    return new_state, metrics, aux

  return train_step
