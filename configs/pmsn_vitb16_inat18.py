"""PMSN ViT-B/16 on iNaturalist 2018: the ViT-S/16 recipe (pmsn_vits16_inat18.py) at ViT-B.

Train state (params + AdamW moments + EMA, benchmarks/sharding_memory.py): 1408 MiB unsharded,
354 MiB per device with fsdp=4. Default mesh: FSDP over groups of 4 devices (a v4/v5e host's
chips, or half an 8-GPU node) leaves HBM for the 12 views' activations; data parallel across
groups.
Run (a pod; see launch/README.md):
  python -m pmsn_jax.main --config=configs/pmsn_vitb16_inat18.py --workdir=gs://BUCKET/pmsn_b16
The arg `msn` gives the MSN baseline of the same recipe:
  python -m pmsn_jax.main --config=configs/pmsn_vitb16_inat18.py:msn --workdir=gs://BUCKET/msn_b16
"""

from configs import pmsn_vits16_inat18  # configs are run from the repository root


def get_config(arg=None):
  return pmsn_vits16_inat18.inat18_config(
      "B/16", arg, name="pmsn_vitb16_inat18", mesh=(("data", -1), ("fsdp", 4), ("tensor", 1)))
