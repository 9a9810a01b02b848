"""DeiT-style Vision Transformer in Flax NNX, as MSN uses it.

Two things set it apart from a plain ViT:
  * patch drop: the masked anchor view keeps a random subset of its patch tokens per sample
    (no mask token; the CLS token is always kept), which is what makes MSN "masked";
  * resolution-agnostic position embeddings: the table is stored for the base grid and
    bicubically resized inside the step for the smaller focal crops (a [14 x 14] -> [6 x 6]
    interpolation of a parameter: well under a millisecond forward and backward on CPU).

The transformer blocks are stacked (one parameter tree with a leading depth axis, which is
what the sharding rules and checkpoints see) and applied with `nnx.scan`, fully unrolled except
on TPU (`vit_config_from`): unrolled, XLA drops the scan's stacked residual buffers and their
per-iteration slicing, which measured faster on CPU and GPU (docs/performance.md); rolled,
compile time stays flat in depth.

Several views of different resolutions can go through one call (`encode_groups`): each
example's tokens of all its crops are concatenated along the token axis, so every per-token
layer (LayerNorm, qkv, proj, MLP) runs once on one [B, tokens, width] array and only attention
runs per crop. Fewer, larger matmuls are faster (docs/performance.md), the result equals
separate calls up to float rounding, and the batch axis stays the leading one throughout: under
data parallelism or FSDP (sharding.py) no activation crosses devices (the stream is pinned to
the batch sharding with `sharding.constrain_batch`). With the CLS readout (what training and the
default evaluation read) the last block runs apart from the scan, for the CLS rows only: the
other tokens' outputs of that block are never read, and skipping them saves 8% of the Ti/16
step's FLOPs.

Mixed precision: with `dtype="bfloat16"` parameters stay float32 and every matmul (patch
embedding, qkv, attention, proj, MLP) runs in bfloat16, while the residual stream, LayerNorm
statistics and the final representation stay float32.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pmsn_jax import sharding

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


def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU, as x/2 (1 + erf(x/sqrt(2))): PyTorch's formula. jax.nn.gelu's exact
  form uses erfc, whose XLA:CPU lowering evaluates two approximations and selects: this one
  ran 2x faster forward and 1.4x backward on the Ti/16 MLP activations (docs/performance.md).
  The two differ by < 1e-6 absolute (cancellation in 1 + erf for x < -3, where GELU ~ 0)."""
  return 0.5 * x * (1.0 + jax.lax.erf(x * 0.7071067811865476))


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
  dtype: str = "float32"  # compute dtype of the matmuls: float32 | bfloat16
  # Recompute each block's activations in the backward pass instead of storing them.
  remat: bool = False

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


COMPUTE_DTYPES = ("float32", "bfloat16")
# What a frozen encoder hands the evaluators (config.eval.features): the CLS token (MSN's
# protocol, and what training's loss sees), the mean of the patch tokens, or both
# concatenated (DINO's linear-eval readout for small ViTs). All after the final LayerNorm.
FEATURE_READOUTS = ("cls", "avgpool", "cls_avgpool")


def vit_config_from(config, platform: str | None = None) -> ViTConfig:
  """Builds a ViTConfig from an experiment config (model, data sizes, compute dtype) for the
  platform the step will run on ("cpu", "gpu", "tpu"; default: JAX's default backend, but an
  ahead-of-time compile for a TPU topology passes "tpu").

  Explicit model.width/depth/num_heads override the variant's size.
  """
  model_cfg, image_size = config.model, config.data.image_size
  platform = platform or jax.default_backend()
  size, patch = parse_variant(model_cfg.variant)
  size = {k: (model_cfg.get(k) or v) for k, v in size.items()}
  dtype = config.compute_dtype
  if dtype == "auto":  # bfloat16 on accelerators; AVX2 CPUs gain nothing from it
    dtype = "float32" if platform == "cpu" else "bfloat16"
  if dtype not in COMPUTE_DTYPES:
    raise ValueError(f"compute_dtype={dtype!r} is not one of {('auto',) + COMPUTE_DTYPES}.")
  if image_size % patch:
    raise ValueError(f"data.image_size={image_size} is not a multiple of the patch size {patch}.")
  if size["width"] % size["num_heads"]:
    raise ValueError(f"model width {size['width']} is not divisible by num_heads "
                     f"{size['num_heads']}.")
  # The unrolled block loop is faster where measured (docs/performance.md): ViT-B/16 on an
  # H200 1.35x, Ti/16 on the 2-core CPU ~1.2x, S/16 ~1.1x, for 30-60% longer compiles. On TPU
  # the scan keeps compile time flat in depth for the large models pods train.
  unroll = 1 if platform == "tpu" else size["depth"]
  return ViTConfig(**size, patch_size=patch, image_size=image_size,
                   channels=config.data.channels, scan_unroll=unroll, dtype=dtype,
                   remat=bool(model_cfg.remat))


class Block(nnx.Module):
  """Pre-norm transformer block: x + MHSA(LN(x)); x + MLP(LN(x)), over groups of tokens.

  The residual stream is [B, sum_i n_i*T_i, D]: for each of the B examples, the tokens of its
  n_i crops of T_i tokens in group i (e.g. 1 masked anchor, 10 focal crops), in group order.
  The per-token layers run once on all of it; attention runs per crop. The batch dimension is
  never merged with another, so a batch-sharded stream stays on its devices.
  """

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
    dim, hidden = cfg.width, int(cfg.width * cfg.mlp_ratio)
    dtype = jnp.dtype(cfg.dtype)
    self.num_heads = cfg.num_heads
    self.norm1 = nnx.LayerNorm(dim, epsilon=1e-6, dtype=dtype, rngs=rngs)
    # [D] -> [3, heads, head_dim] (DeiT's qkv with bias, its output columns kept as the
    # (q|k|v, head, channel) axes they are): tensor parallelism splits the heads axis, so each
    # shard holds whole heads (sharding.DEFAULT_RULES).
    self.qkv = nnx.LinearGeneral(dim, (3, cfg.num_heads, dim // cfg.num_heads), use_bias=True,
                                 dtype=dtype, rngs=rngs)
    self.proj = nnx.Linear(dim, dim, dtype=dtype, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, epsilon=1e-6, dtype=dtype, rngs=rngs)
    self.fc1 = nnx.Linear(dim, hidden, dtype=dtype, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, dim, dtype=dtype, rngs=rngs)

  def attention(self, qkv: jax.Array, crops: int, tokens: int, cls_only: bool) -> jax.Array:
    """[B, crops*tokens, 3, heads, head_dim] -> multi-head self-attention within each crop:
    [B, crops*tokens, D], or with `cls_only` [B, crops, D], the CLS queries alone (all tokens'
    keys and values)."""
    batch, dim = qkv.shape[0], qkv.shape[-2] * qkv.shape[-1]
    qkv = qkv.reshape(batch * crops, tokens, *qkv.shape[2:])
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if not cls_only:
      return jax.nn.dot_product_attention(q, k, v).reshape(batch, crops * tokens, dim)
    # Written out: XLA:CPU fails to compile the bfloat16 gradient of dot_product_attention
    # with a single query ("Dot with multiple contracting dimensions is not implemented").
    logits = jnp.einsum("bnh,bsnh->bns", q[:, 0], k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits / np.sqrt(q.shape[-1]), axis=-1).astype(v.dtype)
    return jnp.einsum("bns,bsnh->bnh", weights, v).reshape(batch, crops, dim)

  def __call__(self, x: jax.Array, shapes: tuple[tuple[int, int], ...], *,
               cls_only: bool = False) -> jax.Array:
    """[B, sum n_i*T_i, D] -> the same, or with `cls_only` [B, sum n_i, D]: the CLS rows.

    `shapes` holds (n_i, T_i) per group. `cls_only` is for the last block when only the CLS
    token is read out: every token still gives keys and values, but attention, proj and the
    MLP run for the CLS rows only (9/12 of the block's per-token matmul FLOPs saved). The CLS
    rows equal those of the full block.
    """
    # The residual stream stays float32 whatever the compute dtype (layers return `dtype`).
    qkv = _split_groups(self.qkv(self.norm1(x)), shapes)
    if cls_only:
      x = cls_rows(x, shapes)
    attn = [self.attention(part, n, t, cls_only) for part, (n, t) in zip(qkv, shapes)]
    x = x + self.proj(jnp.concatenate(attn, axis=1))
    return sharding.constrain_batch(x + self.fc2(gelu(self.fc1(self.norm2(x)))))


def _split_groups(x: jax.Array, shapes) -> list[jax.Array]:
  """[B, sum n_i*T_i, ...] -> one [B, n_i*T_i, ...] block per group."""
  return jnp.split(x, np.cumsum([n * t for n, t in shapes])[:-1], axis=1)


def cls_rows(x: jax.Array, shapes) -> jax.Array:
  """[B, sum n_i*T_i, D] -> [B, sum n_i, D]: the CLS token of every crop, in order."""
  return jnp.concatenate([g.reshape(g.shape[0], n, t, -1)[:, :, 0]
                          for g, (n, t) in zip(_split_groups(x, shapes), shapes)], axis=1)


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
                                padding="VALID", dtype=jnp.dtype(cfg.dtype), rngs=rngs)
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

  def embed_patches(self, images: jax.Array) -> jax.Array:
    """[B, S, S, C] -> [B, S/p, S/p, width]: the patch_embed convolution (stride = kernel = p),
    computed as one matmul of the flattened p x p patches with its kernel. Same result; the
    kernel's gradient ran 1.6-1.7x faster than XLA:CPU's strided convolution
    (docs/performance.md)."""
    conv, p = self.patch_embed, self.cfg.patch_size
    batch, size, _, channels = images.shape
    grid = size // p
    dtype = jnp.dtype(self.cfg.dtype)
    patches = images.reshape(batch, grid, p, grid, p, channels).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(batch, grid, grid, p * p * channels).astype(dtype)
    kernel = conv.kernel[...].reshape(p * p * channels, -1).astype(dtype)  # (kh, kw, c) order
    return patches @ kernel + conv.bias[...].astype(dtype)

  def tokens(self, images: jax.Array, mask_ratio: float, rng: jax.Array | None) -> jax.Array:
    """Images [B,S,S,C] -> float32 tokens [B, 1 + kept patches, D], CLS first."""
    if images.ndim != 4 or images.shape[1] != images.shape[2] \
        or images.shape[1] % self.cfg.patch_size:
      raise ValueError(f"images must be [B, S, S, C] with S divisible by the patch size "
                       f"{self.cfg.patch_size}; got shape {images.shape}.")
    x = self.embed_patches(images).astype(jnp.float32)
    batch, grid = x.shape[0], x.shape[1]
    cls_pos, patch_pos = self.position_embedding(grid)
    x = x.reshape(batch, grid * grid, -1) + patch_pos
    if mask_ratio > 0.0:
      if rng is None:
        raise ValueError("patch drop (mask_ratio > 0) needs an rng.")
      keep = max(1, int(grid * grid * (1.0 - mask_ratio)))
      x = keep_random_patches(x, keep, rng)
    cls = jnp.broadcast_to(self.cls_token[...] + cls_pos, (batch, 1, x.shape[-1]))
    return jnp.concatenate([cls, x], axis=1)

  def encode_groups(self, groups, *, rng: jax.Array | None = None,
                    features: str = "cls") -> list[jax.Array]:
    """[(images, mask_ratio), ...] -> one representation [B_i, D] per group (`readout`).

    Groups may differ in resolution; group i holds n_i crops per example, example-major
    (B_i = n_i * B, where B is the first group's batch), e.g. a masked anchor [B, S, S, C]
    and focal crops [B * F, s, s, C]. See the module docstring.
    """
    check_readout(features)
    tokens = [self.tokens(images, ratio, rng) for images, ratio in groups]
    batch = tokens[0].shape[0]
    if any(t.shape[0] % batch for t in tokens):
      raise ValueError(f"group batch sizes {[t.shape[0] for t in tokens]} must be multiples of "
                       f"the first group's ({batch}): n crops per example, example-major.")
    shapes = tuple((t.shape[0] // batch, t.shape[1]) for t in tokens)
    x = sharding.constrain_batch(
        jnp.concatenate([t.reshape(batch, -1, t.shape[-1]) for t in tokens], axis=1))

    def apply_block(block, x, cls_only=False):
      return block(x, shapes, cls_only=cls_only)
    if self.cfg.remat:
      apply_block = nnx.remat(apply_block, static_argnums=2)

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, unroll=self.cfg.scan_unroll)
    def run_blocks(x, block):
      return apply_block(block, x)

    if features != "cls":
      x = run_blocks(x, self.blocks)
      return [readout(self.norm, g.reshape(batch * n, t, -1), features)
              for g, (n, t) in zip(_split_groups(x, shapes), shapes)]
    # Only the CLS rows leave the last block: it runs apart from the scan, on those rows only.
    graphdef, stacked = nnx.split(self.blocks)
    if self.cfg.depth > 1:
      x = run_blocks(x, nnx.merge(graphdef, jax.tree.map(lambda a: a[:-1], stacked)))
    last = nnx.merge(graphdef, jax.tree.map(lambda a: a[-1], stacked))
    cls = self.norm(apply_block(last, x, True))
    per_crop = [(n, 1) for n, _ in shapes]
    return [g.reshape(batch * n, -1) for g, (n, _) in zip(_split_groups(cls, per_crop), shapes)]

  def __call__(self, images: jax.Array, *, mask_ratio: float = 0.0,
               rng: jax.Array | None = None, features: str = "cls") -> jax.Array:
    """[B,S,S,C] -> [B, width] ("cls", "avgpool") or [B, 2 * width] ("cls_avgpool")."""
    return self.encode_groups([(images, mask_ratio)], rng=rng, features=features)[0]


def check_readout(features: str) -> None:
  if features not in FEATURE_READOUTS:
    raise ValueError(f"features={features!r} is not one of {FEATURE_READOUTS}.")


def readout(norm: nnx.LayerNorm, tokens: jax.Array, features: str) -> jax.Array:
  """The representation of [B, 1 + patches, width] tokens; see FEATURE_READOUTS."""
  if features == "cls":
    return norm(tokens[:, 0])  # LayerNorm is per token: only the CLS row is normalised
  check_readout(features)
  tokens = norm(tokens)
  pooled = jnp.mean(tokens[:, 1:], axis=1)
  return pooled if features == "avgpool" else jnp.concatenate([tokens[:, 0], pooled], axis=-1)
