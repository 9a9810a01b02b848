"""PMSN ViT-B/16 on iNaturalist 2018: the ViT-S/16 recipe (pmsn_vits16_inat18.py) at ViT-B.

Default mesh: FSDP over groups of 4 devices (a v4/v5e host's chips, or half an 8-GPU node),
data parallel across groups; blocks rematerialised in the backward pass. Compiled for a v5e-16
(python -m pmsn_jax.aot --config=configs/pmsn_vitb16_inat18.py --topology=v5e:4x4;
docs/tpu.md): without remat the step needs 26.24 GiB per chip, more than a v5e's 16.
Run (a pod; see launch/README.md):
  python -m pmsn_jax.main --config=configs/pmsn_vitb16_inat18.py --workdir=gs://BUCKET/pmsn_b16
The arg `msn` gives the MSN baseline of the same recipe:
  python -m pmsn_jax.main --config=configs/pmsn_vitb16_inat18.py:msn --workdir=gs://BUCKET/msn_b16
"""

from configs import pmsn_vits16_inat18  # configs are run from the repository root


def get_config(arg=None):
  config = pmsn_vits16_inat18.inat18_config(
      "B/16", arg, name="pmsn_vitb16_inat18", mesh=(("data", -1), ("fsdp", 4), ("tensor", 1)))
  config.model.remat = True
  return config
