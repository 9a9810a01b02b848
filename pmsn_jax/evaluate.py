"""Evaluates an exported encoder, or the target encoder of a training checkpoint:
  python -m pmsn_jax.evaluate --export=DIR --config=configs/<file>.py[:arg]
                              [--config.<key>=<value> ...] [--out=FILE.json] [--random_init]
  python -m pmsn_jax.evaluate --checkpoint=WORKDIR[/checkpoints/STEP] --config=... [...]

The suite is the one training runs at its end (evals/suite.py: k-NN, linear probe, low-shot,
per-class / balanced / shot-group accuracies; docs/evaluation.md). The config names the data
and the protocol (config.data, config.eval, config.mesh); the model comes from the export alone
(DIR/model_config.json), so an export can be re-scored with another protocol or cap.

A checkpoint is read with the config it was trained with (its model keys are checked against
WORKDIR/config.json); WORKDIR alone means its newest step. Nothing in WORKDIR is changed but
the result file, so a run that is still training can be scored.

The result JSON goes to --out, by default DIR/eval.json for an export and
WORKDIR/eval_step_<STEP>_<readout>.json for a checkpoint: beside the encoder it measures, so two
encoders (or readouts of one checkpoint) never overwrite each other's results, and training's
WORKDIR/eval.json is left as training wrote it. The table is printed as at the end of training.
Every path may be a URL (--checkpoint=gs://bucket/run): it is read and written through the
path API training uses (paths.py).

Like main.py, whose --config flag, multi-process flags and flag parser this module reuses, a
user mistake ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import functools
import json
import os
import posixpath
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx
from jax.experimental import multihost_utils

from pmsn_jax import main as cli  # --config, multi-process flags, parse_flags, USER_ERROR_EXIT
from pmsn_jax import host_setup, paths, sharding
from pmsn_jax.models import vit

_EXPORT = flags.DEFINE_string("export", None, "Encoder export directory (training writes "
                              "WORKDIR/export).")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "A training checkpoint, WORKDIR/checkpoints/STEP, or a WORKDIR (its "
    "newest step): scores its EMA target encoder without exporting it.")
_OUT = flags.DEFINE_string("out", None, "Where to write the result JSON; default "
                           "<export>/eval.json or WORKDIR/eval_step_<STEP>_<readout>.json.")
_RANDOM_INIT = flags.DEFINE_bool(
    "random_init", False, "Also report the k-NN of a randomly initialised encoder of the "
    "same architecture (seed config.seed): the reference training reports beside its own.")
flags.mark_flags_as_mutual_exclusive(["export", "checkpoint"], required=True)
for _name in ("config", "coordinator_address", "num_processes", "process_id", "cpu_tuning"):
  flags.declare_key_flag(_name)  # listed by --help of this module, not only --helpfull
# main.py marks --workdir required for training; evaluation writes only --out, so it is
# optional (and unused) here.
flags.FLAGS.set_default("workdir", "")


def pixel_encoder(encode, data_cfg, mesh):
  """Adapts `load_encoder`'s encode to the encoders `suite.evaluate` takes.

  suite.evaluate feeds its encoders eval_preprocess'ed images: centre-cropped, resized to
  data.image_size and already normalised with config.data.mean/std (features.py). The exported
  encode instead takes raw pixels in [0, 255] and normalises them with the mean/std saved at
  export. Undoing the config's normalisation gives back the cropped, resized pixels (as floats;
  encode accepts those), and encode applies the export's own statistics, so the features are
  right even if the config's mean/std differ from the training ones.

  load_encoder returns encode as a partial over host (NumPy) parameters, which a plain call
  would copy to the devices with every batch. Here they are put on the devices once,
  replicated over the mesh so each device encodes its rows of the batch-sharded input, and
  stay an argument of the jitted function, not constants compiled into it.
  """
  model, (params,) = encode.func, encode.args
  params = jax.device_put(params, sharding.replicated(mesh))
  scale = 255.0 * jnp.asarray(data_cfg.std, jnp.float32)
  offset = 255.0 * jnp.asarray(data_cfg.mean, jnp.float32)
  run = jax.jit(lambda params, images: model(params, images * scale + offset))
  return functools.partial(run, params)


def random_encoder(vit_cfg, seed: int, mesh, features: str = "cls"):
  """A freshly initialised encoder of the export's architecture, taking normalised images."""
  graphdef, state = nnx.split(vit.ViT(vit_cfg, rngs=nnx.Rngs(seed)))
  run = jax.jit(lambda state, images: nnx.merge(graphdef, state)(images, features=features))
  return functools.partial(run, jax.device_put(state, sharding.replicated(mesh)))


def read_model_config(export_dir: str, data_cfg):
  """The export's ViTConfig, checked against the config's data (channels, image size)."""
  meta = json.loads(paths.read_text(paths.path(export_dir) / "model_config.json"))
  vit_cfg = vit.ViTConfig(**meta["vit"])
  for key in ("channels", "image_size"):
    if getattr(vit_cfg, key) != data_cfg[key]:
      raise ValueError(f"{export_dir} holds a model trained with {key}={getattr(vit_cfg, key)}"
                       f" but config.data.{key}={data_cfg[key]}; pass the training config or "
                       f"--config.data.{key}={getattr(vit_cfg, key)}")
  return vit_cfg


def evaluate_export(config, export_dir: str, *, random_init: bool = False) -> dict:
  """Loads the export and the config's eval data, runs the suite; returns the result dict."""
  from pmsn_jax import checkpoint, validation

  validation.validate(config)
  # A wrong path fails here, in seconds.
  encode = checkpoint.load_encoder(export_dir, config.eval.features)
  vit_cfg = read_model_config(export_dir, config.data)
  mesh = sharding.make_mesh(config.mesh)
  reference = (random_encoder(vit_cfg, config.seed, mesh, config.eval.features)
               if random_init else None)
  result = run_suite(config, export_dir, pixel_encoder(encode, config.data, mesh), reference,
                     mesh)
  result["export"] = export_dir
  return result


def find_checkpoint(path: str) -> tuple[str, int]:
  """--checkpoint -> (workdir, step): WORKDIR/checkpoints/STEP, or WORKDIR and its newest step.
  `path` may be a URL; the workdir comes back absolute (local) or as a URL."""
  from pmsn_jax import train

  path = os.fspath(paths.resolve(path))
  if (paths.path(path) / "checkpoints").is_dir():
    steps = train.checkpoint_steps(path)
    if not steps:
      raise FileNotFoundError(f"{path}/checkpoints holds no saved step yet; wait for the "
                              "first checkpoint or pass another --checkpoint")
    return path, steps[-1]
  step_name, parent = posixpath.basename(path), posixpath.dirname(path)
  if step_name.isdigit() and posixpath.basename(parent) == "checkpoints":
    workdir = posixpath.dirname(parent)
    saved_steps = train.checkpoint_steps(workdir)
    if int(step_name) not in saved_steps:
      raise FileNotFoundError(f"{parent} has no step {step_name}; its saved steps are "
                              f"{saved_steps}")
    return workdir, int(step_name)
  raise FileNotFoundError(f"--checkpoint={path} is neither a training WORKDIR (with "
                          "checkpoints/) nor one of its steps, WORKDIR/checkpoints/STEP")


def evaluate_checkpoint(config, path: str, *, random_init: bool = False) -> dict:
  """Restores a training checkpoint (read-only), runs the suite on its EMA target encoder."""
  from pmsn_jax import checkpoint, program, train, validation

  validation.validate(config)
  workdir, step_number = find_checkpoint(path)
  if jax.process_count() > 1:  # a run still saving: every process must read the same step
    step_number = int(multihost_utils.broadcast_one_to_all(np.int32(step_number)))
  config_path = paths.path(workdir) / "config.json"
  if not config_path.is_file():
    raise FileNotFoundError(f"{config_path} not found: --checkpoint needs a pmsn_jax.main "
                            "workdir, which saves its config there")
  # Keys newer than the run read as the value it ran with.
  saved = validation.with_added_keys(json.loads(config_path.read_text()))
  current = json.loads(config.to_json_best_effort())
  changed = validation.changed_keys(saved, current, train.SHAPE_KEYS)
  if changed:
    raise ValueError(f"{workdir} was trained with a config that differs in {changed}; pass "
                     "the training config (and its --config.* overrides)")
  data_changes = validation.changed_keys(saved, current, ("data",))
  if data_changes:  # allowed (e.g. another test set), but the shot groups may differ
    train.say(f"note: config.data differs from the training run's in {data_changes}")
  prog = program.build(config, sharding.make_mesh(config.mesh))
  ckpt = checkpoint.Checkpointer(paths.path(workdir) / "checkpoints", read_only=True)
  try:
    state = ckpt.restore(step_number, prog.abstract_state)
  finally:
    ckpt.close()
  features = config.eval.features
  encode = program.target_encoder(prog.graphdef, state, features)
  del state  # keeps only the target encoder: the optimizer state is freed before the suite
  # The reference is the one training reports: this config's own initialisation.
  reference = (program.target_encoder(prog.graphdef, prog.init_state(), features)
               if random_init else None)
  mesh = prog.mesh
  result = run_suite(config, f"{workdir}/checkpoints/{step_number}", encode, reference, mesh)
  result.update(step=step_number, checkpoint=workdir)
  return result


def run_suite(config, what: str, encode, reference, mesh) -> dict:
  """The config's eval data, then suite.evaluate of `encode` (and the reference, if any)."""
  from pmsn_jax import train  # Imports TensorFlow (the data pipeline): only now it is needed.
  from pmsn_jax.evals import suite

  from pmsn_jax.data import eval_stream

  train_split, pretrain_rows = train.load_pretraining_data(config)
  splits = train.eval_splits(config, train_split, pretrain_rows)
  e = config.eval
  num_train = eval_stream.eval_split_size(train_split, e.max_train_examples)
  num_test = eval_stream.eval_split_size(splits.test, e.max_test_examples)
  train.say(f"evaluating {what} on {num_train} train / {num_test} test images of "
            f"{config.data.source}")
  return suite.evaluate(encode, reference, splits, config, mesh)


def default_out(result: dict) -> str:
  if "export" in result:
    return posixpath.join(result["export"], "eval.json")
  return posixpath.join(result["checkpoint"],
                        f"eval_step_{result['step']}_{result['features']}.json")


def main(argv):
  del argv
  if flags.FLAGS.cpu_tuning:
    host_setup.tune_cpu()  # before JAX opens its backend; may re-execute this command
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from pmsn_jax import distributed

  fv = flags.FLAGS
  try:
    distributed.initialize(fv.coordinator_address, fv.num_processes, fv.process_id)
    if _EXPORT.value:
      result = evaluate_export(fv.config, os.fspath(paths.resolve(_EXPORT.value)),
                               random_init=_RANDOM_INIT.value)
    else:
      result = evaluate_checkpoint(fv.config, _CHECKPOINT.value, random_init=_RANDOM_INIT.value)
  except (ValueError, FileNotFoundError) as e:
    logging.debug("user error", exc_info=True)
    _user_error(str(e))
  out = os.fspath(paths.resolve(_OUT.value or default_out(result)))
  from pmsn_jax import train  # loaded by evaluate_export by now
  from pmsn_jax.evals import suite
  train.say(suite.format_table(result))
  if jax.process_index() == 0:
    try:
      paths.ensure_dir(posixpath.dirname(out))
      paths.write_text(out, json.dumps(result, indent=2))
    except OSError as e:
      _user_error(f"cannot write --out={out} ({e.strerror or e}); pass a writable --out")
  train.say(f"wrote {out}")


def _user_error(message: str):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(cli.USER_ERROR_EXIT)


def run():
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
  run()
