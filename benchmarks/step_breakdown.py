"""Where the train step's time goes: its pieces compiled and timed alone.

  python benchmarks/step_breakdown.py --config=configs/demo.py
  python benchmarks/step_breakdown.py --config=benchmarks/configs/vit_ti16_official.py

Pieces (each its own jit, inputs already on device, best of --repeats means of --steps calls):
  step            the whole train step (benchmarks/train_step.py times the same thing)
  grad            value_and_grad of the loss: every forward and backward pass, no update
  encoder_fwd     the online encoder forward on the anchor + focal groups
  target_fwd      the EMA target encoder + head forward on the target views
  loss            PMSN loss + Sinkhorn, forward and backward, on projections of the step's
                  shapes (B x (1+F) anchors, B targets, K prototypes)
  ema             the EMA update of the target parameters
  optimizer       clip + AdamW update + apply
The last lines are machine-readable: piece=<name> ms=<t> fraction_of_step=<f>
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import step_setup  # noqa: E402  (benchmarks/, beside this file)
from pmsn_jax import losses, photometric, step  # noqa: E402
from pmsn_jax.models import vit  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config.", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed calls per repeat.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Repeats; the best mean is reported.")


def time_ms(fn, *args) -> float:
  """Best mean milliseconds per call of a jitted fn (compiled and warmed first)."""
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(_REPEATS.value):
    t = time.perf_counter()
    for _ in range(_STEPS.value):
      out = fn(*args)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - t) / _STEPS.value)
  return best * 1e3


def main(argv):
  del argv
  config = _CONFIG.value
  vit_cfg = vit.vit_config_from(config)
  graphdef, tx, scheds, create_state = step.build(config, vit_cfg)
  state = jax.jit(create_state)()
  batch = jax.tree.map(jnp.asarray, step_setup.random_host_batch(config))
  batch = photometric.batch_views(batch, config.data)  # the model's parts see float views
  d, b = config.data, config.batch_size
  keys = iter(jax.random.split(jax.random.key(0), 3))
  rng = jax.random.key(1)
  loss_fn = step.make_loss_fn(graphdef, config)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def encoder_fwd(params, batch):
    model = nnx.merge(graphdef, params, state.target, state.batch_stats, copy=True)
    return model.anchor_projections(batch["anchor"], batch["focal"],
                                    mask_ratio=config.model.mask_ratio, rng=rng)

  def target_fwd(target, batch):
    model = nnx.merge(graphdef, state.params, target, state.batch_stats, copy=True)
    return model.target_projections(batch["target"])

  out_dim, k = config.model.output_dim, config.model.num_prototypes
  anchors = jax.random.normal(next(keys), (b, 1 + d.num_focal, out_dim))
  targets = jax.random.normal(next(keys), (b, out_dim))
  prototypes = jax.random.normal(next(keys), (k, out_dim))
  loss_kwargs = dict(
      temperature=config.loss.temperature, target_temperature=config.loss.target_temperature,
      sinkhorn_iters=config.loss.sinkhorn_iters, sinkhorn_marginal=config.loss.sinkhorn_marginal,
      reg_weight=config.loss.reg_weight, kl_direction=config.loss.kl_direction)
  loss_grad = jax.grad(
      lambda a, p: losses.pmsn_loss(a, targets, p, batch["prior"], **loss_kwargs)[0],
      argnums=(0, 1))

  def optimizer(grads, opt_state, params):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  grads = jax.tree.map(jnp.ones_like, state.params)
  pieces = {
      "grad": (jax.jit(grad_fn), state.params, state.target, state.batch_stats, batch, rng),
      "encoder_fwd": (jax.jit(encoder_fwd), state.params, batch),
      "target_fwd": (jax.jit(target_fwd), state.target, batch),
      "loss": (jax.jit(loss_grad), anchors, prototypes),
      "ema": (jax.jit(step.ema_update), state.target, state.params, 0.99),
      "optimizer": (jax.jit(optimizer), grads, state.opt_state, state.params),
  }
  times = {name: time_ms(*piece) for name, piece in pieces.items()}
  train_step = jax.jit(step.make_train_step(graphdef, tx, scheds, config))
  times = {"step": time_ms(train_step, state, batch), **times}
  print(f"backend={jax.default_backend()} model={config.model.variant} batch={b} "
        f"dtype={config.compute_dtype}")
  print("| piece | ms | % of step |")
  print("|---|---:|---:|")
  for name, ms in times.items():
    print(f"| {name} | {ms:.2f} | {100 * ms / times['step']:.1f} |")
  share = (times["loss"] + times["ema"]) / times["step"]
  print(f"loss_sinkhorn_ema_fraction={share:.4f}")
  for name, ms in times.items():
    print(f"piece={name} ms={ms:.3f} fraction_of_step={ms / times['step']:.4f}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
