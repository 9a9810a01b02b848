"""Benchmark: the ViT-B/16 PMSN train step in bfloat16 on one accelerator (official views).

1 target 224 + 1 anchor 224 masked at 0.15 + 10 focal 96 per image (configs/common.py), heads
and prototypes of the official recipe, batch 128 on one GPU/TPU chip:
  python benchmarks/train_step.py --config=benchmarks/configs/vit_b16_bf16.py \\
      --peak_gflops=989400   # H100/H200 SXM dense bf16 datasheet peak
Args: "remat" turns per-block remat on; "f32" computes in float32 instead.
"""

from configs import common  # run from the repository root


def get_config(arg=None):
  args = set(filter(None, (arg or "").split(",")))
  if args - {"remat", "f32"}:
    raise ValueError(f"vit_b16_bf16: unknown args {sorted(args - {'remat', 'f32'})}.")
  c = common.get_base_config()
  c.model.variant = "B/16"
  c.batch_size = 128
  c.compute_dtype = "float32" if "f32" in args else "bfloat16"
  c.model.remat = "remat" in args
  c.eval.enabled = False
  return c
