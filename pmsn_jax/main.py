"""Entry point: python -m pmsn_jax.main --config=configs/<file>.py[:arg] --workdir=DIR
                                        [--config.<key>=<value> ...]

A user mistake (bad config value, unknown key, missing data, mismatched checkpoint) ends with
one line on stderr naming the fix and exit status 2, not a stack trace.
"""

from __future__ import annotations

import os
import re
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported
# On AVX-512 CPUs TensorFlow turns on its oneDNN ops and says so on stderr through absl's
# pre-init logging, which TF_CPP_MIN_LOG_LEVEL does not silence: two lines before every
# one-line error. TensorFlow only feeds tf.data here (decoding and augmentation, no matmuls),
# so its oneDNN ops buy nothing; set TF_ENABLE_ONEDNN_OPTS=1 to have them anyway.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from pmsn_jax import host_setup  # noqa: E402

USER_ERROR_EXIT = 2

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, export.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for multi-process runs outside "
    "SLURM / TPU slices (which JAX detects by itself).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0-based.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume a workdir whose checkpoints came from a config with "
    "other model/view sizes (refused by default).")
_CPU_TUNING = flags.DEFINE_bool(
    "cpu_tuning", True, "XLA:CPU settings measured faster for this step (matmuls on Eigen, "
    "glibc malloc on huge pages; pmsn_jax/host_setup.py, docs/performance.md); no effect on "
    "GPU/TPU. --nocpu_tuning keeps JAX's and glibc's defaults.")
flags.mark_flags_as_required(["config", "workdir"])


def _load_config_from_argv(argv):
  """Loads --config=<file>[:arg] by hand (used only when flag parsing itself failed)."""
  import importlib.util
  spec = next(a.split("=", 1)[1] for a in argv if a.startswith("--config="))
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_pmsn_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def _unknown_key_hint(argv) -> str | None:
  """Finds --config.<key> overrides that name no key and suggests the closest one."""
  from pmsn_jax import validation
  config = _load_config_from_argv(argv)
  for arg in argv:
    match = re.match(r"--config\.([\w.]+)=", arg)
    if not match:
      continue
    key = match.group(1)
    try:
      validation.lookup(config, key)
    except (KeyError, TypeError, AttributeError):
      guess = validation.closest_key(config, key)
      return f"unknown config key {key!r}" + (f"; did you mean {guess!r}?" if guess else ".")
  return None


def main(argv):
  del argv
  if _CPU_TUNING.value:
    host_setup.tune_cpu()  # before JAX opens its backend; may re-execute this command
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax/TF INFO chatter; --verbosity=0 brings it back
  from pmsn_jax import distributed, preemption, train  # heavy imports after flag parsing
  try:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value,
                             allow_config_change=_ALLOW_CONFIG_CHANGE.value)
  except preemption.Preempted as e:
    print(f"stopped: {e}", file=sys.stderr)
    preemption.exit_preempted()
  except (ValueError, FileNotFoundError, FloatingPointError) as e:
    logging.debug("user error", exc_info=True)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(USER_ERROR_EXIT)


def parse_flags(argv):
  """absl's parser, with user mistakes turned into one line and exit status 2."""
  try:
    return flags.FLAGS(argv)
  # config_flags reports a bad override as flags.Error, AttributeError (unknown key) or
  # TypeError/ValueError (a value of the wrong type).
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    hint = None
    try:
      hint = _unknown_key_hint(argv)
    except Exception:  # noqa: BLE001  the config file itself may be what failed
      pass
    print(f"error: {hint or str(e).splitlines()[0]}", file=sys.stderr)
    sys.exit(USER_ERROR_EXIT)


def run():
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
