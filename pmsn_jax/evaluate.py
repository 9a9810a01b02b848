"""Evaluates an exported encoder:
  python -m pmsn_jax.evaluate --export=DIR --config=configs/<file>.py[:arg]
                              [--config.<key>=<value> ...] [--out=FILE.json] [--random_init]

The suite is the one training runs at its end (evals/suite.py: k-NN, linear probe, low-shot,
per-class / balanced / shot-group accuracies; docs/evaluation.md). The config names the data
and the protocol (config.data, config.eval, config.mesh); the model comes from the export alone
(DIR/model_config.json), so an export can be re-scored with another protocol or cap.

The result JSON goes to --out, by default DIR/eval.json: beside the encoder it measures, so
two exports never overwrite each other's results, and training's WORKDIR/eval.json is left as
training wrote it. The table is printed as at the end of training.

Like main.py, whose --config flag, multi-process flags and flag parser this module reuses, a
user mistake ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
from absl import app, flags, logging
from flax import nnx

from pmsn_jax import main as cli  # --config, multi-process flags, parse_flags, USER_ERROR_EXIT
from pmsn_jax import sharding
from pmsn_jax.models import vit

_EXPORT = flags.DEFINE_string("export", None, "Encoder export directory (training writes "
                              "WORKDIR/export).")
_OUT = flags.DEFINE_string("out", None, "Where to write the result JSON; default "
                           "<export>/eval.json.")
_RANDOM_INIT = flags.DEFINE_bool(
    "random_init", False, "Also report the k-NN of a randomly initialised encoder of the "
    "export's architecture (seed config.seed): the reference training reports beside its own.")
flags.mark_flags_as_required(["export"])
for _name in ("config", "coordinator_address", "num_processes", "process_id"):
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
  with open(os.path.join(export_dir, "model_config.json")) as f:
    vit_cfg = vit.ViTConfig(**json.load(f)["vit"])
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
  from pmsn_jax import train  # Imports TensorFlow (the data pipeline): only now it is needed.
  from pmsn_jax.evals import suite
  train_split, pretrain_rows = train.load_pretraining_data(config)
  data = train.load_eval_data(config, train_split, pretrain_rows)
  train.say(f"evaluating {export_dir} on {len(data.train_labels)} train / "
            f"{len(data.test_labels)} test images of {config.data.source}")
  reference = (random_encoder(vit_cfg, config.seed, mesh, config.eval.features)
               if random_init else None)
  result = suite.evaluate(pixel_encoder(encode, config.data, mesh), reference, data, config,
                          mesh)
  result["export"] = export_dir
  return result


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from pmsn_jax import distributed

  fv = flags.FLAGS
  export_dir = os.path.abspath(_EXPORT.value)
  out = os.path.abspath(_OUT.value or os.path.join(export_dir, "eval.json"))
  try:
    distributed.initialize(fv.coordinator_address, fv.num_processes, fv.process_id)
    result = evaluate_export(fv.config, export_dir, random_init=_RANDOM_INIT.value)
  except (ValueError, FileNotFoundError) as e:
    logging.debug("user error", exc_info=True)
    _user_error(str(e))
  from pmsn_jax import train  # loaded by evaluate_export by now
  from pmsn_jax.evals import suite
  train.say(suite.format_table(result))
  if jax.process_index() == 0:
    try:
      os.makedirs(os.path.dirname(out), exist_ok=True)
      with open(out, "w") as f:
        json.dump(result, f, indent=2)
    except OSError as e:
      _user_error(f"cannot write --out={out} ({e.strerror}); pass a writable --out")
  train.say(f"wrote {out}")


def _user_error(message: str):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(cli.USER_ERROR_EXIT)


def run():
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
  run()
