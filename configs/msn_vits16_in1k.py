"""MSN ViT-S/16 on ImageNet-1k: the official recipe (uniform prior, uniform Sinkhorn).

800 epochs at global batch 1024, lr 2e-4 -> 1e-3 over 15 epochs then cosine, wd 0.04 -> 0.4.
The step has the shapes of pmsn_vits16_inat18.py's (only the prior differs): it fits a v4-32,
v5e-16 or v5p-32 slice with data parallelism (docs/tpu.md).
Run (a pod; see launch/README.md):
  python -m pmsn_jax.main --config=configs/msn_vits16_in1k.py --workdir=gs://BUCKET/msn_s16_in1k
"""

from configs import common  # configs are run from the repository root

IN1K_TRAIN = 1_281_167


def get_config(arg=None):
  del arg
  c = common.msn(common.get_base_config())
  c.data.source = "tfds:imagenet2012"
  c.total_steps = common.epochs_to_steps(800, IN1K_TRAIN, c.batch_size)
  c.optim.warmup_steps = common.epochs_to_steps(15, IN1K_TRAIN, c.batch_size)
  c.checkpoint_every_steps = 2000
  return c
