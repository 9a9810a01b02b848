"""PMSN ViT-L/16 on iNaturalist 2018: the ViT-S/16 recipe (pmsn_vits16_inat18.py) at ViT-L.

Train state (params + AdamW moments + EMA, benchmarks/sharding_memory.py): 4735 MiB unsharded,
595 MiB per device with fsdp=8. Default mesh: FSDP over 8 devices (an 8-GPU node, or two v4/v5e
hosts' chips), which a v5e's 16 GiB of HBM needs; data parallel across groups.
Run (a pod; see launch/README.md):
  python -m pmsn_jax.main --config=configs/pmsn_vitl16_inat18.py --workdir=gs://BUCKET/pmsn_l16
The arg `msn` gives the MSN baseline of the same recipe:
  python -m pmsn_jax.main --config=configs/pmsn_vitl16_inat18.py:msn --workdir=gs://BUCKET/msn_l16
"""

from configs import pmsn_vits16_inat18  # configs are run from the repository root


def get_config(arg=None):
  return pmsn_vits16_inat18.inat18_config(
      "L/16", arg, name="pmsn_vitl16_inat18", mesh=(("data", -1), ("fsdp", 8), ("tensor", 1)))
