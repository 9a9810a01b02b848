"""The PMSN train loop, top to bottom:
mesh -> data -> model/optimizer -> shardings -> init or restore -> jitted step -> loop ->
export -> evaluation.
"""

from __future__ import annotations

import functools
import json
import math
import os

import jax
import numpy as np
from flax import nnx

from pmsn_jax import checkpoint, metrics, sharding, step, validation
from pmsn_jax.data import pipeline, sampling, sources
from pmsn_jax.evals import suite
from pmsn_jax.models import vit


def load_data(config):
  """-> (balanced train split, test split, rows of the train split used for pretraining)."""
  d = config.data
  train = sources.load_source(d.source, d.train_split)
  test = sources.load_source(d.source, d.test_split)
  if train.images.shape[-1] != d.channels:
    raise ValueError(f"config.data.channels={d.channels} but {d.source} has "
                     f"{train.images.shape[-1]} channels; set --config.data.channels="
                     f"{train.images.shape[-1]} (and data.mean/std to match).")
  rows = np.arange(len(train.labels))
  if d.imbalance_ratio > 1:
    counts = sampling.long_tail_counts(d.max_per_class, train.num_classes, d.imbalance_ratio)
    rows = sampling.subsample_to_counts(train.labels, counts, d.subsample_seed)
  return train, test, rows


def say(message: str) -> None:
  """Progress messages for the user, from process 0 only (absl INFO is left to libraries)."""
  if jax.process_index() == 0:
    print(message, flush=True)


def save_config(config, workdir: str) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def train_and_evaluate(config, workdir: str) -> dict:
  validation.validate(config)
  os.makedirs(workdir, exist_ok=True)
  save_config(config, workdir)

  # ----------------------------------------------------------------------- mesh
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(config.batch_size, mesh)
  say(f"mesh {dict(mesh.shape)} over {jax.process_count()} process(es), "
      f"{jax.device_count()} {jax.default_backend()} device(s)")

  # ----------------------------------------------------------------------- data
  train_split, test_split, pretrain_rows = load_data(config)
  pretrain = train_split.subset(pretrain_rows)
  say(f"pretraining on {len(pretrain.labels)} images of {config.data.source}, class counts "
      f"{pretrain.class_counts().tolist()}")

  # ------------------------------------------------------------ model/optimizer
  vit_cfg = vit.vit_config_from(config.model, config.data.image_size, config.data.channels)
  graphdef, tx, scheds, create_state = step.build(config, vit_cfg)
  abstract_state = jax.eval_shape(create_state)

  # ----------------------------------------------------------------- shardings
  state_shardings = sharding.state_shardings(abstract_state, mesh)
  batch_sharding = sharding.batch_sharding(mesh)

  # ---------------------------------------------------------- init or restore
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                 keep=config.keep_checkpoints)
  latest = ckpt.latest_step()
  if latest is None:
    state = jax.jit(create_state, out_shardings=state_shardings)()
  else:
    say(f"resuming from {workdir}/checkpoints/{latest}")
    state = ckpt.restore(latest, checkpoint.abstract_with_shardings(abstract_state,
                                                                    state_shardings))
  start_step = int(jax.device_get(state.step))

  # --------------------------------------------------------------- jitted step
  train_step = jax.jit(
      step.make_train_step(graphdef, tx, scheds, step.prior_from_config(config), config),
      in_shardings=(state_shardings, batch_sharding),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnums=0)

  # ---------------------------------------------------------------------- loop
  batches = pipeline.train_batches(
      pretrain, config.data, global_batch_size=config.batch_size, seed=config.seed,
      start_step=start_step, process_index=jax.process_index(),
      process_count=jax.process_count())
  writer = metrics.MetricWriter(workdir)
  progress = metrics.Progress(start_step, config.total_steps, config.batch_size)
  eval_data = suite.EvalData(train_split.images, train_split.labels, test_split.images,
                             test_split.labels, pretrain_rows, train_split.num_classes
                             ).capped(config.eval.max_train_examples, config.eval.max_test_examples)

  try:
    for current in range(start_step + 1, config.total_steps + 1):
      batch = next(batches)
      batch = sharding.to_global({k: batch[k] for k in ("target", "anchor", "focal")}, mesh)
      state, step_metrics = train_step(state, batch)

      if current % config.log_every_steps == 0 or current == config.total_steps:
        # The only host sync of the loop: metrics are fetched at log steps only.
        scalars = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        bad = [k for k, v in scalars.items() if not math.isfinite(v)]
        if bad:
          raise FloatingPointError(
              f"non-finite {bad} at step {current}; the last good checkpoint is "
              f"{ckpt.latest_step()} (not overwritten). Lower optim.lr or check the data.")
        scalars.update(progress.update(current))
        writer.write(current, scalars)
        say(metrics.format_line(current, config.total_steps, scalars))

      if current % config.checkpoint_every_steps == 0 or current == config.total_steps:
        ckpt.save(current, state)

      if (config.eval.enabled and config.eval_every_steps and current < config.total_steps
          and current % config.eval_every_steps == 0):
        result = suite.evaluate(target_encoder(graphdef, state), None, eval_data, config, mesh,
                                linear_probe=False)
        writer.write(current, suite.scalars(result))
  finally:
    ckpt.close()  # never leave with an async save in flight

  # -------------------------------------------------------------------- export
  encode = target_encoder(graphdef, state)
  checkpoint.export_encoder(os.path.join(workdir, "export"), encode.args[0], vit_cfg,
                            config.data.mean, config.data.std)

  # ---------------------------------------------------------------- evaluation
  result = {}
  if config.eval.enabled:
    # The reference encoder is this run's own initialisation (same config, same seed).
    initial_state = jax.jit(create_state, out_shardings=state_shardings)()
    result = suite.evaluate(encode, target_encoder(graphdef, initial_state), eval_data,
                            config, mesh)
    result["step"] = config.total_steps
    writer.write(config.total_steps, suite.scalars(result))
    if jax.process_index() == 0:
      with open(os.path.join(workdir, "eval.json"), "w") as f:
        json.dump(result, f, indent=2)
    say(suite.format_table(result))
  writer.close()
  return result


def target_encoder(graphdef, state: step.TrainState) -> functools.partial:
  """images -> CLS features of the EMA target encoder in `state`.

  A partial over a jitted function: the encoder parameters (`.args[0]`) are an argument, not
  constants baked into the compiled program.
  """
  model = nnx.merge(graphdef, state.params, state.target, state.batch_stats)
  encoder_graph, encoder_state = nnx.split(model.target.encoder)
  encode = jax.jit(lambda params, images: nnx.merge(encoder_graph, params)(images))
  return functools.partial(encode, encoder_state)
