"""Converts weights between pmsn_jax and PyTorch (msn_reader.py, timm_writer.py; docs/interop.md):

  python -m pmsn_jax.convert from-msn --checkpoint=FILE.pth.tar --out=EXPORT_DIR
      [--which=target_encoder|encoder] [--config=configs/<file>.py[:arg] [--config.<key>=...]]
      [--num_heads=N]
  python -m pmsn_jax.convert to-timm --export=EXPORT_DIR --out=FILE.safetensors

from-msn reads an official MSN checkpoint (facebookresearch/msn; torch.load with
weights_only=True) and writes a pmsn_jax export of one of its encoders (by default the EMA
target encoder, the one MSN evaluates) with its projection head and the prototypes: what
load_encoder, `python -m pmsn_jax.evaluate --export=...`, to-timm and --config.init_from read.
The architecture comes from the tensors; with --config it is checked against the config's.

to-timm writes an export's encoder as the state dict of timm's VisionTransformer, which loads it
with strict=True (the command prints the model to build), and the head and prototypes, where the
export has them, beside it in FILE.head.safetensors.

Both need the optional `interop` extra (torch for from-msn, safetensors for to-timm). A user
mistake ends with one line on stderr and exit status 2, as in pmsn_jax.main.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

USER_ERROR_EXIT = 2
COMMANDS = ("from-msn", "to-timm")


def define_flags() -> None:
  """The CLI's flags, defined when it runs rather than at import: --config is main.py's flag
  too, and one process (the tests) may import both modules."""
  from ml_collections import config_flags
  flags.DEFINE_string("checkpoint", None, "from-msn: the MSN checkpoint (.pth.tar).")
  flags.DEFINE_string("export", None, "to-timm: a pmsn_jax export directory.")
  flags.DEFINE_string("out", None, "from-msn: the export directory to write; to-timm: the "
                      ".safetensors file to write.")
  flags.DEFINE_enum("which", "target_encoder", ["target_encoder", "encoder"],
                    "from-msn: which encoder of the checkpoint to export (MSN evaluates the "
                    "EMA target encoder).")
  flags.DEFINE_integer("num_heads", None, "from-msn: attention heads (no tensor holds the "
                       "number); default: the official number for the width, else --config's.")
  config_flags.DEFINE_config_file("config", None, "from-msn: an experiment config to check the "
                                  "checkpoint's architecture against (optional).",
                                  lock_config=True)


def main(argv):
  fv = flags.FLAGS
  if not fv["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax's INFO chatter; --verbosity=0 brings it back
  try:
    if len(argv) != 2 or argv[1] not in COMMANDS:
      raise ValueError(f"expected one command, {' or '.join(COMMANDS)}; got {argv[1:]} "
                       f"(python -m pmsn_jax.convert --help)")
    from pmsn_jax import msn_reader, timm_writer  # JAX and the model: after flag parsing
    if argv[1] == "from-msn":
      _require(fv, "checkpoint", "the MSN .pth.tar file")
      _require(fv, "out", "the export directory to write")
      lines = msn_reader.from_msn(fv.checkpoint, fv.out, which=fv.which, config=fv.config,
                                  num_heads=fv.num_heads)
    else:
      _require(fv, "export", "the export directory to convert")
      _require(fv, "out", "the .safetensors file to write")
      lines = timm_writer.to_timm(fv.export, fv.out)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(USER_ERROR_EXIT)
  print("\n".join(lines), flush=True)


def _require(fv, name: str, what: str) -> None:
  if not fv[name].value:
    raise ValueError(f"--{name} is required: {what}")


def parse_flags(argv):
  """absl's parser, with a bad flag or config override turned into one line and exit 2."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
    sys.exit(USER_ERROR_EXIT)


def run():
  define_flags()
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
