"""DeiT-style Vision Transformer in Flax NNX, as MSN uses it.

Two things set it apart from a plain ViT:
  * patch drop: the masked anchor view keeps a random subset of its patch tokens per sample
    (no mask token; the CLS token is always kept), which is what makes MSN "masked";
  * resolution-agnostic position embeddings: the table is stored for the base grid and
    bicubically resized at trace time for the smaller focal crops (shapes are static, so this
    costs nothing per step).

The transformer blocks are stacked and applied with `nnx.scan`: on XLA:CPU an unrolled loop
made backward fusion grow with depth^2 (~1.5x slower, 2-3x longer compiles; ENVIRONMENT.md),
and on accelerators a scan keeps compile time flat in depth.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
from flax import nnx

# Official widths/depths/heads (MSN, DeiT). "mu" is a CPU-sized model for demos and tests.
VIT_SIZES = {
    "mu": dict(width=128, depth=4, num_heads=4),
    "Ti": dict(width=192, depth=12, num_heads=3),
    "S": dict(width=384, depth=12, num_heads=6),
    "B": dict(width=768, depth=12, num_heads=12),
    "L": dict(width=1024, depth=24, num_heads=16),
    "H": dict(width=1280, depth=32, num_heads=16),
}
PATCH_SIZES = (4, 7, 8, 14, 16)
_VARIANT = re.compile(r"^(?P<size>[A-Za-z]+)/(?P<patch>\d+)$")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Everything needed to rebuild the encoder (also saved beside exports)."""
  width: int
  depth: int
  num_heads: int
  patch_size: int
  image_size: int
  channels: int = 3
  mlp_ratio: float = 4.0
  # How many blocks one scan iteration runs. 1 keeps compile time flat in depth; benchmarks
  # unroll fully to get true FLOP counts (XLA's cost analysis counts a scan body once).
  scan_unroll: int = 1

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size


def parse_variant(variant: str) -> tuple[dict, int]:
  """'S/16' -> (size dict, 16). Raises ValueError naming the valid choices."""
  match = _VARIANT.match(variant or "")
  if not match or match["size"] not in VIT_SIZES or int(match["patch"]) not in PATCH_SIZES:
    raise ValueError(
        f"model.variant={variant!r} is not <size>/<patch> with size in {sorted(VIT_SIZES)} and "
        f"patch in {PATCH_SIZES}, e.g. 'S/16'.")
  return VIT_SIZES[match["size"]], int(match["patch"])


def vit_config_from(model_cfg, image_size: int, channels: int) -> ViTConfig:
  """Builds a ViTConfig from `config.model`; explicit width/depth/num_heads override the size."""
  size, patch = parse_variant(model_cfg.variant)
  size = {k: (model_cfg.get(k) or v) for k, v in size.items()}
  if image_size % patch:
    raise ValueError(f"data.image_size={image_size} is not a multiple of the patch size {patch}.")
  if size["width"] % size["num_heads"]:
    raise ValueError(f"model width {size['width']} is not divisible by num_heads "
                     f"{size['num_heads']}.")
  return ViTConfig(**size, patch_size=patch, image_size=image_size, channels=channels)


class Block(nnx.Module):
  """Pre-norm transformer block: x + MHSA(LN(x)); x + MLP(LN(x))."""

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
    dim, hidden = cfg.width, int(cfg.width * cfg.mlp_ratio)
    self.num_heads = cfg.num_heads
    self.norm1 = nnx.LayerNorm(dim, epsilon=1e-6, rngs=rngs)
    self.qkv = nnx.Linear(dim, 3 * dim, use_bias=True, rngs=rngs)  # qkv_bias as in DeiT/MSN
    self.proj = nnx.Linear(dim, dim, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, epsilon=1e-6, rngs=rngs)
    self.fc1 = nnx.Linear(dim, hidden, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, dim, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    batch, tokens, dim = x.shape
    qkv = self.qkv(self.norm1(x)).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    attn = jax.nn.dot_product_attention(q, k, v).reshape(batch, tokens, dim)
    x = x + self.proj(attn)
    return x + self.fc2(jax.nn.gelu(self.fc1(self.norm2(x)), approximate=False))


def keep_random_patches(tokens: jax.Array, keep: int, rng: jax.Array) -> jax.Array:
  """Keeps `keep` of the N patch tokens, an independent random subset per sample."""
  batch, num = tokens.shape[:2]
  order = jnp.argsort(jax.random.uniform(rng, (batch, num)), axis=1)[:, :keep]
  return jnp.take_along_axis(tokens, order[:, :, None], axis=1)


class ViT(nnx.Module):
  """Images [B, H, W, C] -> CLS representation [B, width] (after the final LayerNorm)."""

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    p, dim = cfg.patch_size, cfg.width
    self.patch_embed = nnx.Conv(cfg.channels, dim, kernel_size=(p, p), strides=(p, p),
                                padding="VALID", rngs=rngs)
    init = nnx.initializers.truncated_normal(stddev=0.02)
    self.cls_token = nnx.Param(init(rngs.params(), (1, 1, dim)))
    # One position for CLS + one per patch of the base grid (DeiT/MSN layout).
    self.pos_embed = nnx.Param(init(rngs.params(), (1, 1 + cfg.grid * cfg.grid, dim)))

    @nnx.split_rngs(splits=cfg.depth)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(rngs):
      return Block(cfg, rngs=rngs)

    self.blocks = make_blocks(rngs)
    self.norm = nnx.LayerNorm(dim, epsilon=1e-6, rngs=rngs)

  def position_embedding(self, grid: int) -> tuple[jax.Array, jax.Array]:
    """-> (CLS position [1,1,D], patch positions [1, grid*grid, D]) for a grid x grid input."""
    table = self.pos_embed[...]
    cls_pos, patch_pos = table[:, :1], table[:, 1:]
    if grid != self.cfg.grid:
      dim = table.shape[-1]
      square = patch_pos.reshape(1, self.cfg.grid, self.cfg.grid, dim)
      patch_pos = jax.image.resize(square, (1, grid, grid, dim), "bicubic")
      patch_pos = patch_pos.reshape(1, grid * grid, dim)
    return cls_pos, patch_pos

  def __call__(self, images: jax.Array, *, mask_ratio: float = 0.0,
               rng: jax.Array | None = None) -> jax.Array:
    if images.shape[1] != images.shape[2] or images.shape[1] % self.cfg.patch_size:
      raise ValueError(f"images must be square with a side divisible by the patch size "
                       f"{self.cfg.patch_size}; got shape {images.shape}.")
    x = self.patch_embed(images)
    batch, grid = x.shape[0], x.shape[1]
    cls_pos, patch_pos = self.position_embedding(grid)
    x = x.reshape(batch, grid * grid, -1) + patch_pos
    if mask_ratio > 0.0:
      if rng is None:
        raise ValueError("patch drop (mask_ratio > 0) needs an rng.")
      keep = max(1, int(grid * grid * (1.0 - mask_ratio)))
      x = keep_random_patches(x, keep, rng)
    cls = jnp.broadcast_to(self.cls_token[...] + cls_pos, (batch, 1, x.shape[-1])).astype(x.dtype)
    x = jnp.concatenate([cls, x], axis=1)

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, unroll=self.cfg.scan_unroll)
    def run_blocks(x, block):
      return block(x)

    x = run_blocks(x, self.blocks)
    return self.norm(x[:, 0])
