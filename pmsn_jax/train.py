"""The PMSN train loop, top to bottom:
mesh -> data -> model/optimizer -> shardings -> init or restore -> jitted step -> loop ->
export -> evaluation.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.experimental.compilation_cache import compilation_cache as jax_compilation_cache

from pmsn_jax import (checkpoint, diagnostics, metrics, paths, prior_fit, program, run_log,
                      sharding, step, validation)
from pmsn_jax.data import feeding, pipeline, sampling, sources
from pmsn_jax.data.interface import DataSource
from pmsn_jax.evals import suite
from pmsn_jax.preemption import Preempted, PreemptionWatch


def load_pretraining_data(config):
  """-> (the train split, rows of it used for pretraining)."""
  d = config.data
  train = sources.load_source(d.source, d.train_split, data_dir=d.data_dir or None)
  if train.channels is not None and train.channels != d.channels:  # None: decoded to fit
    raise ValueError(f"config.data.channels={d.channels} but {d.source} has "
                     f"{train.channels} channels; set --config.data.channels="
                     f"{train.channels} (and data.mean/std to match).")
  rows = np.arange(len(train))
  if d.imbalance_ratio == 1 and not d.max_per_class:
    return train, rows
  if not train.random_access:
    raise ValueError(f"data.imbalance_ratio and data.max_per_class need every label up front, "
                     f"which a streamed {d.source} split does not give: use inat_json: or "
                     f"folder: sources (or set data.imbalance_ratio=1, data.max_per_class=0)")
  available = train.class_counts()
  if d.imbalance_ratio == 1:  # a cap: e.g. a balanced subsample when every class reaches it
    counts = np.minimum(available, d.max_per_class)
  else:
    counts = sampling.counts_in_class_order(
        sampling.long_tail_counts(d.max_per_class, train.num_classes, d.imbalance_ratio,
                                  d.imbalance_profile), d.class_order)
  short = [c for c, n in enumerate(counts) if n > available[c]]
  if short:
    raise ValueError(f"data.max_per_class={d.max_per_class} with data.imbalance_ratio="
                     f"{d.imbalance_ratio} asks class {short[0]} for {counts[short[0]]} "
                     f"images, it has {available[short[0]]}: lower data.max_per_class (or "
                     f"set data.imbalance_ratio=1 to cap each class at data.max_per_class)")
  return train, sampling.subsample_to_counts(train.labels, counts, d.subsample_seed)


def eval_splits(config, train, pretrain_rows) -> suite.EvalSplits:
  """The evaluation's splits as sources: the train split (already loaded for pretraining) and
  the test split's list of files and labels (TFDS: its metadata). No image is read; a wrong
  test split fails here, before training, not after it."""
  d = config.data
  test = sources.load_source(d.source, d.test_split, data_dir=d.data_dir or None)
  # A streamed TFDS split pretrains on all its rows, whose number its metadata may not know.
  rows = np.asarray(pretrain_rows) if train.random_access else None
  return suite.EvalSplits(train, test, rows, train.num_classes)


def pretraining_class_counts(data: DataSource, rows) -> np.ndarray:
  """Images per class among the pretraining rows (a streamed split: one pass over its
  labels, all of which pretraining uses)."""
  if not data.random_access:
    return data.class_counts()
  return np.bincount(data.labels[rows], minlength=data.num_classes)


def say(message: str) -> None:
  """Progress messages for the user, from process 0 only (absl INFO is left to libraries)."""
  if jax.process_index() == 0:
    print(message, flush=True)


# Keys whose change makes a checkpoint unusable or silently changes what a resumed run means.
SHAPE_KEYS = ("model", "data.image_size", "data.channels", "data.focal_size", "data.num_focal")


def check_workdir(config, workdir, *, allow_config_change: bool = False) -> None:
  """Creates `workdir` (a local directory or a URL, paths.py) and refuses one whose checkpoints
  came from a config differing in SHAPE_KEYS (unless allowed). Writes nothing else:
  save_config does, once the run is sure to start."""
  probe = paths.path(workdir) / f".write_test.{jax.process_index()}"
  try:
    paths.ensure_dir(workdir)
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    if not paths.is_url(workdir):
      raise ValueError(f"--workdir={workdir} is not writable ({e.strerror}); pick a directory "
                       f"you can write to") from None
    _not_writable_url(workdir, e)
  except Exception as e:  # noqa: BLE001  object stores raise their own errors (auth, no bucket)
    if not paths.is_url(workdir):
      raise
    _not_writable_url(workdir, e)
  changed = changed_shape_keys(config, workdir)
  if changed and not allow_config_change:
    raise ValueError(f"{workdir} holds checkpoints of a config that differs in {changed}; "
                     f"use a fresh --workdir, or pass --allow_config_change to resume anyway")


def _not_writable_url(workdir, e: Exception):
  detail = (str(e).strip().splitlines() or [""])[0][:200]
  raise ValueError(f"--workdir={workdir} is not writable ({type(e).__name__}: {detail}); check "
                   f"the bucket name and this machine's credentials, or pick another --workdir"
                   ) from None


def changed_shape_keys(config, workdir) -> list[str]:
  """SHAPE_KEYS that differ from the config.json beside the workdir's checkpoints."""
  path = paths.path(workdir) / "config.json"
  if not (path.exists() and checkpoint_steps(workdir)):
    return []
  saved = json.loads(path.read_text())
  current = json.loads(config.to_json_best_effort())
  return validation.changed_keys(saved, current, SHAPE_KEYS)


def checkpoint_steps(workdir) -> list[int]:
  """The committed steps of WORKDIR/checkpoints, as Orbax lists them (an unfinished save, a
  temporary directory locally or a step without its commit marker on GCS, is not one)."""
  return sorted(ocp.utils.checkpoint_steps(paths.path(workdir) / "checkpoints"))


def save_config(config, workdir) -> None:
  """Writes config.json; a previous one with other shapes is kept as config.before_step_N."""
  if jax.process_index() != 0:
    return
  path = paths.path(workdir) / "config.json"
  if changed_shape_keys(config, workdir):
    paths.replace(path, paths.path(workdir) / f"config.before_step_"
                                               f"{checkpoint_steps(workdir)[-1]}.json")
  paths.write_text(path, config.to_json_best_effort(indent=2, sort_keys=True))


@contextlib.contextmanager
def persistent_compilation_cache(config, workdir):
  """JAX's persistent compilation cache in config.compilation_cache_dir (default
  WORKDIR/compilation_cache, "none": off) for the run; yields the directory (or None).

  A restarted or resumed run (a preempted pod slice, the next part of a sweep) then loads its
  executables instead of compiling them again: minutes for big models on TPU. JAX writes the
  cache from process 0 only, through etils.epath, so a gs:// directory works. Entered before
  the first compile; the previous setting comes back on exit (runs made in one process, as
  tests do, each use their own directory).
  """
  directory = compilation_cache_dir(config.compilation_cache_dir, workdir)
  previous = jax.config.jax_compilation_cache_dir
  _use_compilation_cache(directory)
  try:
    yield directory
  finally:
    _use_compilation_cache(previous)


def _use_compilation_cache(directory: str | None) -> None:
  if directory != jax.config.jax_compilation_cache_dir:
    jax_compilation_cache.reset_cache()  # JAX opens its cache once: point it anew
    jax.config.update("jax_compilation_cache_dir", directory)


def compilation_cache_dir(setting: str, workdir) -> str | None:
  """config.compilation_cache_dir -> the cache directory (absolute, or a URL), or None."""
  if setting.lower() == "none":
    return None
  return os.fspath(paths.resolve(setting or paths.path(workdir) / "compilation_cache"))


def train_and_evaluate(config, workdir: str, *, allow_config_change: bool = False) -> dict:
  """Trains, exports and evaluates in `workdir`, a local directory or a URL (paths.py)."""
  validation.validate(config)
  check_workdir(config, workdir, allow_config_change=allow_config_change)
  with persistent_compilation_cache(config, workdir):
    return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config, workdir: str) -> dict:
  # ----------------------------------------------------------------------- mesh
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(config.batch_size, mesh)
  say(f"mesh {dict(mesh.shape)} over {jax.process_count()} process(es), "
      f"{jax.device_count()} {jax.default_backend()} device(s)")

  # ----------------------------------------------------------------------- data
  train_split, pretrain_rows = load_pretraining_data(config)
  pretrain = (train_split.subset(pretrain_rows) if train_split.random_access
              else train_split)
  say(f"pretraining data ({config.data.source}): {train_split.describe(pretrain_rows)}")
  eval_data = eval_splits(config, train_split, pretrain_rows) if config.eval.enabled else None
  if eval_data is not None:
    suite.check(eval_data, config, mesh)  # fail now, not after training (e.g. low-shot k)

  # ------------------------------------- model, optimizer and shardings (program.py)
  prog = program.build(config, mesh)
  say(run_log.parameter_summary(prog.abstract_state.params))

  # ---------------------------------------------------------- init or restore
  ckpt = checkpoint.Checkpointer(paths.path(workdir) / "checkpoints",
                                 keep=config.keep_checkpoints)
  latest = ckpt.latest_step()
  if latest is None:
    state = prog.init_state()
    if config.init_from:  # MSN weights or an export (warm_start.py)
      from pmsn_jax import warm_start  # noqa: PLC0415  torch is imported only for a .pth.tar
      state = warm_start.warm_start(state, config, report=say)
  else:
    say(f"resuming from {workdir}/checkpoints/{latest}")
    state = ckpt.restore(latest, prog.abstract_state)
  start_step = int(jax.device_get(state.step))

  # ------------------------------ the prior: fixed, or fitted from data (prior_fit.py)
  # It enters the step as batch["prior"], an input, so a fitted prior never recompiles it.
  priors = prior_fit.PriorTracker(
      config, start_step=start_step, saved=prior_fit.load(workdir),
      class_counts=lambda: pretraining_class_counts(train_split, pretrain_rows))
  replicated = sharding.replicated(mesh)
  prior = sharding.from_host(priors.prior, replicated)
  if priors.fit is not None:
    say(priors.fit.describe(config.model.num_prototypes))
  elif priors.pending:
    say(f"prior fit: uniform prior for the first {priors.warmup_steps} steps, then a power law "
        f"fitted to the model's cluster sizes")

  # ------------------------------------------------ the step, compiled once, up front
  compile_start = time.perf_counter()
  train_step = prog.lower_train_step().compile()
  say(run_log.compiled_summary(train_step)
      + f"; compiled in {time.perf_counter() - compile_start:.1f} s")

  # ---------------------------------------------------------------------- loop
  save_config(config, workdir)  # every check has passed: the run is starting
  host_batches = pipeline.train_batches(
      pretrain, config.data, global_batch_size=config.batch_size, seed=config.seed,
      start_step=start_step, process_index=jax.process_index(),
      process_count=jax.process_count(), batch_class_skew=config.data.batch_class_skew)
  # The next two global batches go to the devices while a step runs (data/feeding.py).
  batches = feeding.DevicePrefetch(
      host_batches, lambda b: sharding.to_global({k: b[k] for k in step.BATCH_KEYS}, mesh),
      extras=lambda b: {"skipped": int(b["skipped"].sum())})
  input_meter = feeding.InputWaitMeter(config.batch_size // jax.process_count())
  gather = multihost_utils.process_allgather if jax.process_count() > 1 else None
  input_bound_warned = False
  writer = metrics.MetricWriter(workdir)
  prototypes_file = (paths.AppendFile(paths.path(workdir) / diagnostics.PROTOTYPES_FILE)
                     if jax.process_index() == 0 else None)
  progress = metrics.Progress(start_step, config.total_steps, config.batch_size)
  skipped_images = 0  # unreadable images replaced by the pipeline (this process, this run)
  preemption = PreemptionWatch(ckpt.manager)
  if priors.fit is not None:  # the fit made before training (or before a resume)
    writer.write(start_step, priors.fit.scalars())
    if jax.process_index() == 0:
      prior_fit.save(workdir, priors.fit)
  vectors_every = config.diagnostics.prototypes_every_steps or config.log_every_steps
  profiler = run_log.StepProfiler(workdir, first=start_step + 2, steps=config.profile_steps)

  try:
    for current in range(start_step + 1, config.total_steps + 1):
      profiler.before(current)
      batch, extras = input_meter.wait_for_input(lambda: next(batches))
      skipped_images += extras["skipped"]
      batch["prior"] = prior  # already on the devices: no transfer
      state, step_metrics, step_aux = train_step(state, batch)
      input_meter.step_dispatched(step_metrics["loss"])
      profiler.after(current, step_metrics["loss"])

      log = run_log.due(current, config.log_every_steps, config.total_steps)
      stop = preemption.requested(current)
      save = stop or run_log.due(current, config.checkpoint_every_steps, config.total_steps)
      if log or save:
        # The only host syncs of the loop: metrics are fetched at log and save steps, and a
        # non-finite state is never saved over the last good checkpoint.
        scalars = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        bad = [k for k, v in scalars.items() if not math.isfinite(v)]
        if bad:
          raise FloatingPointError(
              f"non-finite {bad} at step {current}; the last good checkpoint is "
              f"{ckpt.latest_step()} (not overwritten). Lower optim.lr or check the data.")
      if log:
        first_interval = progress.last_step == start_step
        scalars.update(progress.update(current), skipped_images=skipped_images)
        scalars.update(feeding.per_host(input_meter.interval(), gather))
        if scalars["input_wait_pct"] > run_log.INPUT_BOUND_PCT and not (
            first_interval or input_bound_warned):  # the first interval warms tf.data up
          input_bound_warned = True
          say(run_log.input_bound_warning(scalars))
        # Prototype usage vs the prior: scalars to the writer, vectors to a JSONL file.
        proto_scalars, proto_record = diagnostics.summarize(
            current, jax.device_get(step_aux), priors.prior)
        scalars.update(proto_scalars)
        if run_log.due(current, vectors_every, config.total_steps) and prototypes_file is not None:
          prototypes_file.write(json.dumps(proto_record) + "\n")
        writer.write(current, scalars)
        say(metrics.format_line(current, config.total_steps, scalars))
      if priors.observe(current, step_aux):  # prior = "fit", "clusters": warm-up ends
        prior = sharding.from_host(priors.prior, replicated)
        if jax.process_index() == 0:
          prior_fit.save(workdir, priors.fit)  # before any checkpoint that needs it to resume
        writer.write(current, priors.fit.scalars())
        say(priors.fit.describe(config.model.num_prototypes))
      if save:
        # Rows up to this checkpoint reach a URL workdir now (paths.AppendFile): after a crash
        # the resumed run logs the later ones again.
        writer.flush()
        if prototypes_file is not None:
          prototypes_file.flush()
        ckpt.save(current, state)
      if stop:
        ckpt.close()  # waits for the save to commit
        writer.close()  # the process may exit without teardown (preemption.exit_preempted)
        if prototypes_file is not None:
          prototypes_file.close()
        raise Preempted(current)

      # The final evaluation, after the export, is the full suite; these are k-NN only.
      if (config.eval.enabled and current < config.total_steps
          and run_log.due(current, config.eval_every_steps)):
        encode = program.target_encoder(prog.graphdef, state, config.eval.features)
        result = suite.evaluate(encode, None, eval_data, config, mesh, linear_probe=False)
        writer.write(current, suite.scalars(result))
  finally:
    profiler.close()
    batches.close()
    input_meter.close()
    ckpt.close()  # never leave with an async save in flight
    preemption.close()
    writer.flush()  # on a URL workdir, rows since the last sync (e.g. before a NaN stop)
    if prototypes_file is not None:
      prototypes_file.close()

  # -------------------------------------------------------------------- export
  # The EMA target encoder, with its head and the prototypes: what `convert to-timm` hands to
  # PyTorch and what --config.init_from=WORKDIR/export starts a new run from.
  encode = program.target_encoder(prog.graphdef, state, config.eval.features)
  head = {"params": state.target.to_pure_dict()["target"]["head"],
          "batch_stats": state.batch_stats.to_pure_dict()["target"]["head"],
          "prototypes": state.params.to_pure_dict()["prototypes"]["vectors"]}
  checkpoint.export_encoder(paths.path(workdir) / "export", encode.args[0], prog.vit_cfg,
                            config.data.mean, config.data.std, head=head)

  # ---------------------------------------------------------------- evaluation
  result = {}
  if config.eval.enabled:
    # The reference encoder is this run's own initialisation (same config, same seed).
    initial_state = prog.init_state()
    result = suite.evaluate(
        encode, program.target_encoder(prog.graphdef, initial_state, config.eval.features),
        eval_data, config, mesh)
    result["step"] = config.total_steps
    writer.write(config.total_steps, suite.scalars(result))
    if jax.process_index() == 0:
      paths.write_text(paths.path(workdir) / "eval.json", json.dumps(result, indent=2))
    say(suite.format_table(result))
  writer.close()
  say(f"peak resident memory of this process: {run_log.peak_rss_mib():.0f} MiB")
  return result
