"""Benchmark: one PMSN train step of ViT-Ti/16 with MSN's official views, batch 8.

1 target 224 + 1 anchor 224 masked at 0.15 + 10 focal 96 per image (configs/common.py), the
step the performance issue compares with a PyTorch reference on the same machine:
  python benchmarks/train_step.py --config=benchmarks/configs/vit_ti16_official.py
"""

from configs import common  # run from the repository root


def get_config(arg=None):
  del arg
  c = common.get_base_config()
  c.model.variant = "Ti/16"
  c.batch_size = 8
  c.eval.enabled = False
  return c
