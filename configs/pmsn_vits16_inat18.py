"""PMSN ViT-S/16 on iNaturalist 2018: the official MSN ViT-S/16 recipe with a power-law prior.

800 epochs of the 437,513 long-tailed train images at global batch 1024 (64 x 16 devices).
Run (a pod; see launch/README.md):
  python -m pmsn_jax.main --config=configs/pmsn_vits16_inat18.py --workdir=gs://BUCKET/pmsn_s16
Pure data parallelism. Compiled for a v4-32, v5e-16 and v5p-32 (python -m pmsn_jax.aot
--config=configs/pmsn_vits16_inat18.py --topology=v4:2x2x4 | v5e:4x4 | v5p:2x2x4; docs/tpu.md):
14.24, 14.06 and 14.55 GiB per chip; on 4 chips (v4-8) the 256 images per chip need
--config.model.remat=True or FSDP.
The arg `msn` gives the MSN baseline of the same recipe:
  python -m pmsn_jax.main --config=configs/pmsn_vits16_inat18.py:msn --workdir=gs://BUCKET/msn_s16
"""

from configs import common  # configs are run from the repository root

INAT18_TRAIN = 437_513


def get_config(arg=None):
  return inat18_config("S/16", arg, name="pmsn_vits16_inat18")


def inat18_config(variant: str, arg, *, name: str, mesh=(("data", -1), ("fsdp", 1),
                                                      ("tensor", 1))):
  """The recipe for any ViT size; `mesh` is the size's default layout (sharding.py)."""
  c = common.get_base_config()
  c.model.variant = variant
  c.mesh = mesh
  c.data.source = "tfds:i_naturalist2018"
  c.data.test_split = "validation"
  c.total_steps = common.epochs_to_steps(800, INAT18_TRAIN, c.batch_size)
  c.optim.warmup_steps = common.epochs_to_steps(15, INAT18_TRAIN, c.batch_size)
  c.checkpoint_every_steps = 2000
  c.loss.prior = "power_law"
  c.loss.prior_exponent = 0.25
  # iNat18's rarest train classes have 2 images (imbalance 500 = 1000 / 2): a 5-image set of
  # every class does not exist.
  c.eval.lowshot_shots = (1, 2)
  if arg == "msn":
    common.msn(c)
  elif arg:
    raise ValueError(f"{name}: unknown arg {arg!r}; use nothing or 'msn'.")
  return c
