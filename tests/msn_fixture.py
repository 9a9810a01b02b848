"""Tiny fake official MSN checkpoints, laid out as facebookresearch/msn's training saves them.

src/msn_train.py, save_checkpoint: torch.save of {"encoder", "opt", "prototypes",
"target_encoder", "epoch", "loss", "batch_size", "world_size", "lr", "temperature"}, where
"encoder" and "target_encoder" are state dicts of DistributedDataParallel-wrapped models (every
key prefixed "module."): src/deit.py's VisionTransformer (timm's parameter names: cls_token,
pos_embed, patch_embed.proj, blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2},
norm; qkv_bias=True, LayerNorm eps 1e-6) whose `fc` is init_model's projection head, an
OrderedDict Sequential fc1, bn1, gelu1, fc2, bn2, gelu2, fc3 (use_bn: true); "prototypes" is
`prototypes.data`, [num_proto, output_dim]; "opt" is AdamW's state dict.

The encoder here is timm's VisionTransformer, which has exactly those parameter names (and is
what MSN's deit.py copied); every parameter and BatchNorm statistic is random, so no mapping
error can hide behind a default value (ones, zeros).
"""

from __future__ import annotations

import collections
import dataclasses
import sys

# PyPI's torch (a CUDA build) brings triton, whose bundled LLVM segfaults on import in a process
# that has loaded TensorFlow first, as every test worker has (the data pipeline), and timm's
# import makes torch probe for it. Nothing here compiles GPU kernels: torch is told it is absent.
sys.modules.setdefault("triton", None)

import torch  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402


@dataclasses.dataclass
class Size:
  width: int = 64
  depth: int = 2
  num_heads: int = 4
  patch: int = 16
  image: int = 224
  channels: int = 3
  hidden: int = 48
  output: int = 16
  prototypes: int = 10


def msn_head(width: int, hidden: int, output: int) -> torch.nn.Sequential:
  """src/msn_train.py init_model's `fc` with use_bn=True."""
  return torch.nn.Sequential(collections.OrderedDict([
      ("fc1", torch.nn.Linear(width, hidden)), ("bn1", torch.nn.BatchNorm1d(hidden)),
      ("gelu1", torch.nn.GELU()), ("fc2", torch.nn.Linear(hidden, hidden)),
      ("bn2", torch.nn.BatchNorm1d(hidden)), ("gelu2", torch.nn.GELU()),
      ("fc3", torch.nn.Linear(hidden, output))]))


def vit(size: Size, **kwargs) -> VisionTransformer:
  return VisionTransformer(img_size=size.image, patch_size=size.patch, in_chans=size.channels,
                           embed_dim=size.width, depth=size.depth, num_heads=size.num_heads,
                           num_classes=0, **kwargs)


def randomize(module: torch.nn.Module, generator: torch.Generator) -> None:
  """Random values for every parameter and BatchNorm statistic (norm scales around 1)."""
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=generator)
      is_scale = name.endswith("weight") and p.ndim == 1
      p.copy_(1.0 + 0.2 * noise if is_scale else 0.05 * noise)
    for m in module.modules():
      if isinstance(m, torch.nn.BatchNorm1d):
        m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=generator))
        m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=generator))
        m.num_batches_tracked.fill_(1000)


def backbone(size: Size, seed: int):
  """(encoder ViT, head), random, in eval mode."""
  generator = torch.Generator().manual_seed(seed)
  encoder, head = vit(size), msn_head(size.width, size.hidden, size.output)
  randomize(encoder, generator)
  randomize(head, generator)
  return encoder.eval(), head.eval()


def state_dict(encoder, head) -> dict:
  """The DDP-wrapped MSN encoder's state dict: the head under `fc.`, all under `module.`."""
  state = {**encoder.state_dict(), **{f"fc.{k}": v for k, v in head.state_dict().items()}}
  return collections.OrderedDict((f"module.{k}", v) for k, v in state.items())


def write_checkpoint(path, size: Size = Size(), *, seed: int = 0, target: bool = True):
  """Writes a fake MSN checkpoint; -> {"encoder": (vit, head), "target_encoder": (vit, head),
  "prototypes": tensor}, the modules it holds (the target different from the online one)."""
  online = backbone(size, seed)
  modules = {"encoder": online}
  generator = torch.Generator().manual_seed(seed + 1)
  prototypes = (torch.rand((size.prototypes, size.output), generator=generator) - 0.5) * 0.5
  params = [p for m in online for p in m.parameters()]
  optimizer = torch.optim.AdamW([{"params": params}, {"params": [prototypes], "lr": 1e-3,
                                                      "LARS_exclude": True,
                                                      "WD_exclude": True, "weight_decay": 0}])
  for p in params + [prototypes]:
    p.grad = torch.ones_like(p)
  optimizer.step()  # AdamW's state holds tensors, as the real file's does
  save = {"encoder": state_dict(*online), "opt": optimizer.state_dict(),
          "prototypes": prototypes.detach(), "epoch": 600, "loss": 2.25, "batch_size": 64,
          "world_size": 16, "lr": 1e-3, "temperature": 0.1}
  if target:
    modules["target_encoder"] = backbone(size, seed + 2)
    save["target_encoder"] = state_dict(*modules["target_encoder"])
  torch.save(save, path)
  modules["prototypes"] = prototypes.detach()
  return modules
