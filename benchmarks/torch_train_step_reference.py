"""Reference throughput: the MSN/PMSN ViT train step in eager PyTorch on the CPU, to set
benchmarks/train_step.py (the jitted JAX step) against on the same machine.

  python3 -m venv $TORCH_VENV && $TORCH_VENV/bin/pip install torch==2.13.0 numpy
  $TORCH_VENV/bin/python benchmarks/torch_train_step_reference.py --model=Ti
  (JAX side: python benchmarks/train_step.py --config=benchmarks/configs/vit_ti16_official.py)

Why a separate script in its own virtualenv: torch is no dependency of pmsn_jax, and must not
become one. This imports only torch, numpy, argparse, time, os and math.

The step is the one pmsn_jax/step.py jits, written as a PyTorch user would: a DeiT-style ViT
(Conv2d patch embed, CLS token, learned position table for the 224 grid, bicubically resized
for the 96 crops, pre-norm blocks with F.scaled_dot_product_attention and exact GELU), patch
drop at 0.15 on the anchor (independent random subset per sample, CLS kept), the projection
head Linear-BN-GELU-Linear-BN-GELU-Linear(2048, 2048, 256) called once per resolution group
(train-mode BatchNorm), K=1024 prototypes, the PMSN loss of pmsn_jax/losses.py (3 log-domain
Sinkhorn iterations towards a power-law prior, cross-entropy, KL(p̄ || prior)), backward,
global-norm clipping at 3.0, AdamW (foreach) and an EMA of the target encoder + head.
Views per image: 224 target + 224 anchor + 10 x 96 focal; inputs are random and made once.

Eager on purpose: torch.compile is not used, since the reference is the official MSN code
path (facebookresearch/msn trains eagerly), i.e. what a PyTorch user runs by default.

Timing: 2 warm-up steps, then --steps per repeat, best of --repeats mean step time. MFU uses
--gflops_per_img (default: the XLA cost-analysis figure benchmarks/train_step.py reports for
the same step) and this process's best f32 torch.mm throughput at n=2048. Last two lines:
  framework=torch <version> threads=<n> model=<Ti|S> batch=<b> step_ms=<ms>
  img_per_s=<x> gflops_per_img=<y> peak_gflops=<z> mfu=<m>
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SIZES = {"Ti": (192, 12, 3), "S": (384, 12, 6)}  # width, depth, heads
# XLA cost analysis of this step with every token through every block (benchmarks/train_step.py
# before the JAX model ran its last block for the CLS rows alone: 20.37 / 76.46 GFLOP there).
GFLOPS_PER_IMG = {"Ti": 22.11, "S": 82.29}


class Block(nn.Module):
  """Pre-norm transformer block: x + MHSA(LN(x)); x + MLP(LN(x))."""

  def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
    super().__init__()
    self.heads = heads
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
    self.fc2 = nn.Linear(int(dim * mlp_ratio), dim)

  def forward(self, x):
    b, n, d = x.shape
    qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
    x = x + self.proj(attn)
    return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
  """Images [B, C, H, W] -> CLS representation [B, width] (after the final LayerNorm)."""

  def __init__(self, width: int, depth: int, heads: int, patch: int = 16, image_size: int = 224):
    super().__init__()
    self.grid = image_size // patch
    self.patch_embed = nn.Conv2d(3, width, kernel_size=patch, stride=patch)
    self.cls_token = nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, 1, width), std=0.02))
    self.pos_embed = nn.Parameter(
        nn.init.trunc_normal_(torch.zeros(1, 1 + self.grid ** 2, width), std=0.02))
    self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
    self.norm = nn.LayerNorm(width, eps=1e-6)

  def position_embedding(self, grid: int):
    cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
    if grid != self.grid:  # Bicubic, antialiased like jax.image.resize's default.
      square = patch_pos.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
      square = F.interpolate(square, size=(grid, grid), mode="bicubic", antialias=True)
      patch_pos = square.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)
    return cls_pos, patch_pos

  def forward(self, images, mask_ratio: float = 0.0):
    x = self.patch_embed(images)
    b, grid = x.shape[0], x.shape[-1]
    cls_pos, patch_pos = self.position_embedding(grid)
    x = x.flatten(2).transpose(1, 2) + patch_pos
    if mask_ratio > 0.0:  # Patch drop: keep a random subset of patches per sample.
      keep = max(1, int(grid * grid * (1.0 - mask_ratio)))
      order = torch.argsort(torch.rand(b, grid * grid), dim=1)[:, :keep]
      x = torch.gather(x, 1, order.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    x = torch.cat([(self.cls_token + cls_pos).expand(b, -1, -1), x], dim=1)
    for block in self.blocks:
      x = block(x)
    return self.norm(x[:, 0])


class Backbone(nn.Module):
  """ViT encoder + MSN projection head (BatchNorm on per-call batch statistics)."""

  def __init__(self, width, depth, heads, hidden: int = 2048, out: int = 256):
    super().__init__()
    self.encoder = ViT(width, depth, heads)
    self.head = nn.Sequential(
        nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.GELU(),
        nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.GELU(), nn.Linear(hidden, out))

  def forward(self, images, mask_ratio: float = 0.0):
    return self.head(self.encoder(images, mask_ratio))


def power_law_prior(k: int, exponent: float) -> torch.Tensor:
  prior = np.arange(1, k + 1, dtype=np.float64) ** -exponent
  return torch.from_numpy(prior / prior.sum()).float()


def pmsn_loss(anchors, targets, prototypes, log_prior, tau=0.1, sharpen=0.25, iters=3):
  """pmsn_loss of losses.py (marginal = prior, KL(p̄ || prior), weight 1); anchors [B, V, d]."""
  anchors, targets, prototypes = (F.normalize(x, dim=-1) for x in (anchors, targets, prototypes))
  log_p_anchor = F.log_softmax(anchors @ prototypes.T / tau, dim=-1)  # [B, V, K]
  with torch.no_grad():  # Sharpened, Sinkhorn-balanced targets, all in the log domain.
    b, log_b = targets.shape[0], math.log(targets.shape[0])
    log_p = F.log_softmax(targets @ prototypes.T / (tau * sharpen), dim=-1)
    log_p = log_p - torch.logsumexp(log_p.flatten(), 0)
    for _ in range(iters):  # Columns to mass prior_k, then rows to 1/B.
      log_p = log_p - torch.logsumexp(log_p, 0, keepdim=True) + log_prior
      log_p = log_p - torch.logsumexp(log_p, 1, keepdim=True) - log_b
    p_target = torch.exp(log_p + log_b)
  ce = -(p_target[:, None] * log_p_anchor).sum(-1).mean()
  rows = anchors.shape[0] * anchors.shape[1]
  log_p_mean = torch.logsumexp(log_p_anchor.flatten(0, 1), 0) - math.log(rows)
  return ce + (log_p_mean.exp() * (log_p_mean - log_prior)).sum()


def matmul_peak_gflops(n: int = 2048, reps: int = 10) -> float:
  """Best f32 torch.mm throughput of this process in GFLOP/s (n x n x n products)."""
  a, b = torch.randn(n, n), torch.randn(n, n)
  torch.mm(a, b)
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    torch.mm(a, b)
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best / 1e9


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", choices=sorted(SIZES), default="Ti")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--num_focal", type=int, default=10)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  parser.add_argument("--gflops_per_img", type=float, default=None,
                      help="model GFLOPs per image (default: JAX's figure for --model)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  gflops_per_img = args.gflops_per_img or GFLOPS_PER_IMG[args.model]
  torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)

  online = Backbone(*SIZES[args.model])
  target = Backbone(*SIZES[args.model]).requires_grad_(False)  # EMA twin: no grad, no opt.
  target.load_state_dict(online.state_dict())  # Starts as an exact copy.
  prototypes = nn.Parameter(torch.empty(1024, 256).uniform_(-1 / 16, 1 / 16))  # U(+-1/sqrt(d))
  log_prior = power_law_prior(1024, 0.25).log()
  # Official MSN groups: no weight decay on biases, norm scales (all 1-D) and prototypes.
  decay = [p for p in online.parameters() if p.ndim > 1]
  no_decay = [p for p in online.parameters() if p.ndim <= 1] + [prototypes]
  trainable = decay + no_decay
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.04},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=1e-3, betas=(0.9, 0.999), foreach=True)
  online_params, target_params = list(online.parameters()), list(target.parameters())

  rng = np.random.default_rng(args.seed)
  view = lambda *s: torch.from_numpy(  # noqa: E731
      rng.standard_normal((args.batch_size, *s), dtype=np.float32))
  anchor_img, target_img = view(3, 224, 224), view(3, 224, 224)
  focal_img = view(args.num_focal, 3, 96, 96).flatten(0, 1)

  def train_step(momentum: float = 0.996) -> float:
    b = args.batch_size
    z_anchor = online(anchor_img, mask_ratio=0.15)[:, None]
    z_focal = online(focal_img).reshape(b, args.num_focal, -1)
    with torch.no_grad():
      z_target = target(target_img)
    loss = pmsn_loss(torch.cat([z_anchor, z_focal], 1), z_target, prototypes, log_prior)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 3.0, foreach=True)
    opt.step()
    with torch.no_grad():  # target <- m * target + (1 - m) * online
      torch._foreach_mul_(target_params, momentum)
      torch._foreach_add_(target_params, online_params, alpha=1.0 - momentum)
    return loss.item()

  for _ in range(2):
    loss = train_step()
  times = []
  for _ in range(args.repeats):
    t = time.perf_counter()
    for _ in range(args.steps):
      loss = train_step()
    times.append((time.perf_counter() - t) / args.steps)
  best = min(times)
  img_per_s = args.batch_size / best
  peak = matmul_peak_gflops()
  mfu = img_per_s * gflops_per_img / peak
  print(f"loss after {2 + args.repeats * args.steps} steps: {loss:.4f}; step_ms per repeat: "
        + " ".join(f"{x * 1e3:.0f}" for x in times)
        + "; load average after: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
  print(f"framework=torch {torch.__version__} threads={torch.get_num_threads()} "
        f"model={args.model} batch={args.batch_size} step_ms={best * 1e3:.1f}")
  print(f"img_per_s={img_per_s:.2f} gflops_per_img={gflops_per_img:.3f} "
        f"peak_gflops={peak:.1f} mfu={mfu:.3f}")


if __name__ == "__main__":
  main()
