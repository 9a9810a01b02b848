"""The exact mapping between PyTorch ViT / projection-head state dicts and pmsn_jax's params.

MSN's ViT (facebookresearch/msn, src/deit.py) is timm's of 2021 and keeps timm's parameter names
(cls_token, pos_embed, patch_embed.proj, blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1,
mlp.fc2}, norm), which timm's VisionTransformer still uses: one mapping reads MSN's encoders and
writes timm's. Both have what pmsn_jax's ViT has: a qkv bias, LayerNorm eps 1e-6, exact GELU, one
learned position per patch of the base grid plus one for CLS, the CLS token read after the final
LayerNorm. MSN's head (its ViT's `fc`) is fc1-bn1-gelu1-fc2-bn2-gelu2-fc3 (init_model with
use_bn: true, as in every released config), models.heads.ProjectionHead.

Every difference of layout is a transpose or a reshape, so conversion is exact:
  Linear weight [out, in]                        -> kernel [in, out]
  qkv weight [3 * D, D], rows (q|k|v, head, dim) -> kernel [D, 3, heads, head_dim]
  patch embedding Conv2d weight [D, C, p, p]     -> kernel [p, p, C, D]
  LayerNorm / BatchNorm weight                   -> scale
  BatchNorm running_mean / running_var           -> BatchStat mean / var
  blocks.N.*                                     -> blocks.*, stacked on a leading depth axis

NumPy and JAX only: msn_reader.py reads the checkpoints (torch), timm_writer.py writes timm's
files (safetensors).
"""

from __future__ import annotations

import jax
import numpy as np

from pmsn_jax.models import vit

# What msn_reader and timm_writer say when their optional dependencies are missing.
INSTALL_HINT = "pip install 'pmsn_jax[interop]' (torch, timm, safetensors)"
# (timm / MSN name within a block, pmsn_jax name, kind)
_BLOCK_LAYERS = (("norm1", "norm1", "norm"), ("attn.qkv", "qkv", "qkv"),
                 ("attn.proj", "proj", "linear"), ("norm2", "norm2", "norm"),
                 ("mlp.fc1", "fc1", "linear"), ("mlp.fc2", "fc2", "linear"))
_HEAD_LINEAR, _HEAD_NORMS = ("fc1", "fc2", "fc3"), ("bn1", "bn2")


def timm_keys(cfg: vit.ViTConfig) -> list[str]:
  """The state-dict keys of timm's VisionTransformer (num_classes=0) and of MSN's encoders."""
  keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
  for i in range(cfg.depth):
    keys += [f"blocks.{i}.{name}.{p}" for name, _, _ in _BLOCK_LAYERS for p in ("weight", "bias")]
  return keys + ["norm.weight", "norm.bias"]


def abstract_params(cfg: vit.ViTConfig) -> dict:
  """The encoder's pure dict of ShapeDtypeStructs (nothing allocated)."""
  from flax import nnx
  model = nnx.eval_shape(lambda: vit.ViT(cfg, rngs=nnx.Rngs(0)))
  return nnx.state(model).to_pure_dict()


# ------------------------------------------------------------------------- the mappings

def timm_to_params(state: dict, cfg: vit.ViTConfig, where: str = "the state dict") -> dict:
  """A timm/MSN encoder state dict (NumPy) -> pmsn_jax's ViT parameters (pure dict)."""
  expected = timm_keys(cfg)
  missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
  if missing or unexpected:
    raise ValueError(f"{where} is not the state dict of a {describe(cfg)}: "
                     + ", ".join(f"{label} {keys[:4]}" for label, keys in
                                 (("missing", missing), ("unexpected", unexpected)) if keys))
  d, h = cfg.width, cfg.num_heads
  f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731

  def layer(prefix, kind):
    w, b = f32(state[f"{prefix}.weight"]), f32(state[f"{prefix}.bias"])
    if kind == "norm":
      return {"scale": w, "bias": b}
    if kind == "qkv":
      return {"kernel": w.T.reshape(d, 3, h, d // h), "bias": b.reshape(3, h, d // h)}
    return {"kernel": w.T, "bias": b}

  blocks = [{ours: layer(f"blocks.{i}.{theirs}", kind) for theirs, ours, kind in _BLOCK_LAYERS}
            for i in range(cfg.depth)]
  params = {
      "cls_token": f32(state["cls_token"]), "pos_embed": f32(state["pos_embed"]),
      "patch_embed": {"kernel": f32(state["patch_embed.proj.weight"]).transpose(2, 3, 1, 0),
                      "bias": f32(state["patch_embed.proj.bias"])},
      "blocks": jax.tree.map(lambda *xs: np.stack(xs), *blocks),
      "norm": layer("norm", "norm")}
  _check_shapes(params, abstract_params(cfg), where, cfg)
  return jax.tree.map(np.ascontiguousarray, params)


def params_to_timm(params: dict, cfg: vit.ViTConfig) -> dict[str, np.ndarray]:
  """pmsn_jax's ViT parameters -> the state dict of timm's VisionTransformer (NumPy).

  `params["blocks"]` may be stacked (leading depth axis, as pmsn_jax stores them) or one
  sub-dict per block (keys 0, 1, ...), as an unscanned module list would give."""
  d = cfg.width
  blocks = params["blocks"]
  per_block = all(str(k).isdigit() for k in blocks)
  block = lambda i: (blocks.get(i, blocks.get(str(i))) if per_block  # noqa: E731
                     else jax.tree.map(lambda x: np.asarray(x)[i], blocks))
  f32 = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))  # noqa: E731

  def layer(tree, kind):
    if kind == "norm":
      return f32(tree["scale"]), f32(tree["bias"])
    if kind == "qkv":
      return f32(np.asarray(tree["kernel"]).reshape(d, 3 * d).T), f32(
          np.asarray(tree["bias"]).reshape(3 * d))
    return f32(np.asarray(tree["kernel"]).T), f32(tree["bias"])

  state = {"cls_token": f32(params["cls_token"]), "pos_embed": f32(params["pos_embed"]),
           "patch_embed.proj.weight": f32(np.asarray(params["patch_embed"]["kernel"])
                                          .transpose(3, 2, 0, 1)),
           "patch_embed.proj.bias": f32(params["patch_embed"]["bias"])}
  for i in range(cfg.depth):
    tree = block(i)
    for theirs, ours, kind in _BLOCK_LAYERS:
      state[f"blocks.{i}.{theirs}.weight"], state[f"blocks.{i}.{theirs}.bias"] = layer(
          tree[ours], kind)
  state["norm.weight"], state["norm.bias"] = layer(params["norm"], "norm")
  return state


def msn_head_to_params(state: dict, width: int) -> tuple[dict | None, dict | None, str]:
  """MSN's `fc` head state dict (NumPy, "fc." removed) -> (ProjectionHead parameters, BatchNorm
  statistics, "") or (None, None, why not)."""
  needed = {f"{n}.{p}" for n in _HEAD_LINEAR for p in ("weight", "bias")} | {
      f"{n}.{p}" for n in _HEAD_NORMS for p in ("weight", "bias", "running_mean", "running_var")}
  if not state:
    return None, None, "no projection head (fc.*)"
  present = set(state) - {f"{n}.num_batches_tracked" for n in _HEAD_NORMS}
  if present != needed:
    return None, None, (f"its projection head is not MSN's fc1-bn1-fc2-bn2-fc3 with BatchNorm "
                        f"(keys {sorted(present)[:6]}), so it was left out")
  f32 = lambda key: np.ascontiguousarray(np.asarray(state[key], np.float32))  # noqa: E731
  params = {n: {"kernel": np.ascontiguousarray(f32(f"{n}.weight").T), "bias": f32(f"{n}.bias")}
            for n in _HEAD_LINEAR}
  params.update({n: {"scale": f32(f"{n}.weight"), "bias": f32(f"{n}.bias")} for n in _HEAD_NORMS})
  stats = {n: {"mean": f32(f"{n}.running_mean"), "var": f32(f"{n}.running_var")}
           for n in _HEAD_NORMS}
  if params["fc1"]["kernel"].shape[0] != width:
    return None, None, (f"its projection head takes {params['fc1']['kernel'].shape[0]} "
                        f"features, the encoder gives {width}")
  return params, stats, ""


def params_to_msn_head(params: dict, stats: dict) -> dict[str, np.ndarray]:
  """ProjectionHead parameters and statistics -> the state dict of MSN's `fc` head
  (torch.nn.Sequential of fc1, bn1, gelu1, fc2, bn2, gelu2, fc3)."""
  f32 = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))  # noqa: E731
  state = {}
  for n in _HEAD_LINEAR:
    state[f"{n}.weight"], state[f"{n}.bias"] = f32(np.asarray(params[n]["kernel"]).T), f32(
        params[n]["bias"])
  for n in _HEAD_NORMS:
    state.update({f"{n}.weight": f32(params[n]["scale"]), f"{n}.bias": f32(params[n]["bias"]),
                  f"{n}.running_mean": f32(stats[n]["mean"]),
                  f"{n}.running_var": f32(stats[n]["var"])})
  return state


def _check_shapes(params, abstract, where: str, cfg: vit.ViTConfig) -> None:
  def check(path, got, want):
    if tuple(got.shape) != tuple(want.shape):
      raise ValueError(f"{where}: {jax.tree_util.keystr(path)} has shape {tuple(got.shape)}, "
                       f"a {describe(cfg)} needs {tuple(want.shape)}")
  jax.tree_util.tree_map_with_path(check, params, abstract)


# -------------------------------------------------------------------------------- sizes

def describe(cfg: vit.ViTConfig) -> str:
  """'ViT-S/16 (width 384, depth 12, 6 heads) at 224 px'."""
  name = variant_of(cfg)
  dims = f"width {cfg.width}, depth {cfg.depth}, {cfg.num_heads} heads"
  return (f"ViT-{name} ({dims})" if name else f"ViT ({dims}, patch {cfg.patch_size})") + (
      f" at {cfg.image_size} px")


def variant_of(cfg: vit.ViTConfig) -> str | None:
  """The model.variant of an architecture ('B/16'), if it is one of vit.VIT_SIZES."""
  for name, size in vit.VIT_SIZES.items():
    if (size == dict(width=cfg.width, depth=cfg.depth, num_heads=cfg.num_heads)
        and cfg.patch_size in vit.PATCH_SIZES):
      return f"{name}/{cfg.patch_size}"
  return None
