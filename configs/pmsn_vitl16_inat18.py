"""PMSN ViT-L/16 on iNaturalist 2018: the ViT-S/16 recipe (pmsn_vits16_inat18.py) at ViT-L.

Default mesh: FSDP over 8 devices (an 8-GPU node, or two v4/v5e hosts' chips), data parallel
across groups; blocks rematerialised in the backward pass. Compiled for a v4-32 (python -m
pmsn_jax.aot --config=configs/pmsn_vitl16_inat18.py --topology=v4:2x2x4; docs/tpu.md): 9.21 GiB
per chip of 32 with remat, 70.89 GiB without (it would not fit).
Run (a pod; see launch/README.md):
  python -m pmsn_jax.main --config=configs/pmsn_vitl16_inat18.py --workdir=gs://BUCKET/pmsn_l16
The arg `msn` gives the MSN baseline of the same recipe:
  python -m pmsn_jax.main --config=configs/pmsn_vitl16_inat18.py:msn --workdir=gs://BUCKET/msn_l16
"""

from configs import pmsn_vits16_inat18  # configs are run from the repository root


def get_config(arg=None):
  config = pmsn_vits16_inat18.inat18_config(
      "L/16", arg, name="pmsn_vitl16_inat18", mesh=(("data", -1), ("fsdp", 8), ("tensor", 1)))
  config.model.remat = True
  return config
