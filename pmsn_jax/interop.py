"""PyTorch interop: the official MSN checkpoints in, timm VisionTransformer weights out.

facebookresearch/msn saves its runs with torch.save (src/msn_train.py, save_checkpoint) as a
dict with "encoder" and "target_encoder" (state dicts of its DeiT VisionTransformer, src/deit.py,
whose `fc` is the projection head; DistributedDataParallel prefixes every key with "module."),
"prototypes" ([K, d], a plain tensor), "opt" (AdamW's state dict), "epoch" and a few scalars.
Its ViT is timm's of 2021 and keeps timm's parameter names (cls_token, pos_embed,
patch_embed.proj, blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm), which
timm's VisionTransformer still uses: one mapping reads MSN's encoders and writes timm's. Both
have what pmsn_jax's ViT has: a qkv bias, LayerNorm eps 1e-6, exact GELU, one learned position
per patch of the base grid plus one for CLS, the CLS token read after the final LayerNorm. The
head is fc1-bn1-gelu1-fc2-bn2-gelu2-fc3 (init_model with use_bn: true, as in every released
config), models.heads.ProjectionHead.

Every difference of layout is a transpose or a reshape, so conversion is exact:
  Linear weight [out, in]                        -> kernel [in, out]
  qkv weight [3 * D, D], rows (q|k|v, head, dim) -> kernel [D, 3, heads, head_dim]
  patch embedding Conv2d weight [D, C, p, p]     -> kernel [p, p, C, D]
  LayerNorm / BatchNorm weight                   -> scale
  BatchNorm running_mean / running_var           -> BatchStat mean / var
  blocks.N.*                                     -> blocks.*, stacked on a leading depth axis
No tensor holds the number of attention heads: the official widths imply it (DeiT's sizes,
vit.VIT_SIZES); for any other width it comes from a config or --num_heads.

Checkpoints are read with torch.load(weights_only=True): tensors and plain containers, never
arbitrary unpickling. torch is imported there and nowhere else, and safetensors only where the
timm file is written: `import pmsn_jax` and training never need either (the `interop` extra
installs them).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import pickle
import re

import jax
import numpy as np

from pmsn_jax import checkpoint, paths
from pmsn_jax.models import vit

ENCODERS = ("target_encoder", "encoder")  # the state dicts of an MSN checkpoint, by name
INSTALL_HINT = "pip install 'pmsn_jax[interop]' (torch, timm, safetensors)"
# What MSN's evaluations normalise with (logistic_eval.py, linear_eval.py): ImageNet's.
MSN_MEAN, MSN_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Heads of the official widths (DeiT's Ti/S/B/L/H, MSN's deit_tiny ... deit_huge).
OFFICIAL_HEADS = {s["width"]: s["num_heads"] for name, s in vit.VIT_SIZES.items() if name != "mu"}
# timm's registered ViTs whose architecture, at 224 px with 3 channels and MLP ratio 4, is
# pmsn_jax's: (width, depth, heads, patch) -> name (tests/test_convert.py checks each in timm).
TIMM_NAMES = {(192, 12, 3, 16): "vit_tiny_patch16_224", (384, 12, 6, 16): "vit_small_patch16_224",
              (384, 12, 6, 8): "vit_small_patch8_224", (768, 12, 12, 16): "vit_base_patch16_224",
              (768, 12, 12, 8): "vit_base_patch8_224", (1024, 24, 16, 16): "vit_large_patch16_224",
              (1280, 32, 16, 14): "vit_huge_patch14_224"}
TIMM_FORMAT = "pmsn_jax.timm.v1"
# (timm / MSN name within a block, pmsn_jax name, kind)
_BLOCK_LAYERS = (("norm1", "norm1", "norm"), ("attn.qkv", "qkv", "qkv"),
                 ("attn.proj", "proj", "linear"), ("norm2", "norm2", "norm"),
                 ("mlp.fc1", "fc1", "linear"), ("mlp.fc2", "fc2", "linear"))
_HEAD_LINEAR, _HEAD_NORMS = ("fc1", "fc2", "fc3"), ("bn1", "bn2")


@dataclasses.dataclass
class Backbone:
  """One encoder of a checkpoint and its projection head, in pmsn_jax's layout (float32 NumPy
  pure dicts, as `nnx.State.to_pure_dict` gives them)."""
  vit: vit.ViTConfig
  encoder: dict
  head: dict | None = None         # ProjectionHead parameters
  head_stats: dict | None = None   # its BatchNorm running mean / var


@dataclasses.dataclass
class MSNCheckpoint:
  path: str
  backbones: dict           # "target_encoder" / "encoder" -> Backbone, those the file holds
  prototypes: np.ndarray | None
  epoch: int | None
  notes: list               # what could not be converted, and why (no head, no prototypes)


# ------------------------------------------------------------------------------ reading

def torch_load(path):
  """torch.load(weights_only=True) of a local file or URL, its failures as one-line errors."""
  try:
    import torch  # the optional dependency: only here
  except ImportError:
    raise ValueError(f"reading the PyTorch checkpoint {path} needs torch: {INSTALL_HINT}"
                     ) from None
  source = os.fspath(path)
  file = paths.path(source)
  if not file.exists():
    raise FileNotFoundError(f"{source} not found: pass the .pth.tar file MSN's training saved")
  if file.is_dir():
    raise ValueError(f"{source} is a directory, not a PyTorch checkpoint: pass the .pth.tar "
                     f"file MSN's training saved")
  # torch.load wants a local file or a seekable stream; a URL is read whole.
  source_file = io.BytesIO(file.read_bytes()) if paths.is_url(source) else source
  try:
    return torch.load(source_file, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    called = re.search(r"GLOBAL ([\w.]+)", str(e))
    if called:
      raise ValueError(
          f"{source} holds code in its pickle (it would call {called[1]}): refusing to unpickle "
          f"it (checkpoints are read with torch.load(weights_only=True): tensors and plain "
          f"containers only); re-save its state dicts with torch.save from a trusted session"
      ) from None
    raise ValueError(f"{source} is not a PyTorch checkpoint ({_weights_only_detail(e)}); pass "
                     f"the .pth.tar file MSN's training saved") from None
  except (RuntimeError, EOFError, KeyError, ValueError, OSError) as e:
    detail = (str(e).strip().splitlines() or [""])[0][:120]
    raise ValueError(f"{source} is not a PyTorch checkpoint (torch.load: {type(e).__name__} "
                     f"{detail}); pass the .pth.tar file MSN's training saved") from None


def _weights_only_detail(e: Exception) -> str:
  """The reason inside torch's long weights_only message (its line after the boilerplate)."""
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  useful = [line for line in lines if not line.startswith(("Weights only load failed",
                                                           "Please file an issue",
                                                           "Check the documentation"))]
  return (useful[0] if useful else lines[0] if lines else type(e).__name__)[:120]


def _describe(obj) -> str:
  if isinstance(obj, dict):
    keys = sorted(map(str, obj))
    return f"a dict with keys {keys[:8]}" + (" ..." if len(keys) > 8 else "")
  return f"a {type(obj).__name__}"


def _numpy(tensor, where: str, key: str) -> np.ndarray:
  if not hasattr(tensor, "detach"):
    raise ValueError(f"{where}: {key} is a {type(tensor).__name__}, not a tensor")
  tensor = tensor.detach().cpu()
  return (tensor.float() if tensor.is_floating_point() else tensor).numpy()


def read_msn_checkpoint(path, *, num_heads: int | None = None, config=None) -> MSNCheckpoint:
  """Reads an official MSN checkpoint into pmsn_jax's layout.

  `num_heads`: the encoders' attention heads (no tensor holds it); by default the official
  number for the width, else `config`'s for its width. Raises
  ValueError (one line) for a file that is not an MSN checkpoint or whose encoders are not ViTs
  pmsn_jax can hold (or not the size of `config`'s, if given; see check_against_config).
  """
  source = os.fspath(path)
  obj = torch_load(source)
  found = [k for k in ENCODERS if isinstance(obj, dict) and isinstance(obj.get(k), dict)]
  if not found:
    raise ValueError(f"{source} is not an MSN checkpoint: it holds {_describe(obj)}, where "
                     f"facebookresearch/msn saves a dict with 'encoder' and 'target_encoder' "
                     f"state dicts")
  notes, backbones = [], {}
  for name in found:
    where = f"{source}[{name!r}]"
    state = {_strip_module(k): _numpy(v, where, k) for k, v in obj[name].items()}
    head_state = {k[len("fc."):]: v for k, v in state.items() if k.startswith("fc.")}
    encoder_state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    cfg = infer_vit(encoder_state, where, num_heads=num_heads, config=config)
    head, stats, note = msn_head_to_params(head_state, cfg.width)
    if note and not notes:
      notes.append(f"{name}: {note}")
    backbones[name] = Backbone(cfg, timm_to_params(encoder_state, cfg, where), head, stats)
  prototypes = obj.get("prototypes")
  if prototypes is not None:
    prototypes = _numpy(prototypes, source, "prototypes")
    head = next(iter(backbones.values())).head
    if prototypes.ndim != 2 or (head is not None
                                and prototypes.shape[1] != head["fc3"]["kernel"].shape[1]):
      raise ValueError(f"{source}: prototypes of shape {prototypes.shape} do not fit the "
                       f"projection head's output; not an MSN checkpoint")
  else:
    notes.append("no prototypes in the checkpoint")
  epoch = obj.get("epoch")
  return MSNCheckpoint(source, backbones, prototypes,
                       int(epoch) if isinstance(epoch, (int, float)) else None, notes)


def _strip_module(key: str) -> str:
  """DistributedDataParallel's "module." prefix off a state-dict key (MSN's evaluation scripts
  do the same with key.replace("module.", ""))."""
  return key[len("module."):] if key.startswith("module.") else key


def infer_vit(state: dict, where: str, *, num_heads: int | None = None,
              config=None) -> vit.ViTConfig:
  """The ViTConfig of a timm/DeiT encoder state dict (NumPy arrays, no "module." prefix).
  Heads: `num_heads`, else the official number for the width (every MSN model has it), else
  `config`'s where its width is the checkpoint's."""
  if any(k.startswith("patch_embed.stem") for k in state):
    raise ValueError(f"{where} is a conv-stem ViT (MSN's vitc_4gf / deit_small_convstem): "
                     f"pmsn_jax's ViT has a linear patch embedding and cannot hold it")
  for key in ("patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight"):
    if key not in state:
      raise ValueError(f"{where} has no {key}: not a DeiT/timm VisionTransformer state dict "
                       f"(its keys begin {sorted(state)[:5]})")
  width, channels, patch, patch_w = state["patch_embed.proj.weight"].shape
  positions = state["pos_embed"].shape[1] - 1
  grid = math.isqrt(positions)
  if patch != patch_w or grid * grid != positions:
    raise ValueError(f"{where}: patches {patch}x{patch_w} and {positions} position embeddings "
                     f"are not a square grid of square patches, as pmsn_jax's ViT needs")
  depth = 1 + max(int(m[1]) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
  hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
  want = vit.vit_config_from(config, "cpu") if config is not None else None
  heads = num_heads or OFFICIAL_HEADS.get(width) or (
      want.num_heads if want is not None and want.width == width else 0)  # 0: unknown
  cfg = vit.ViTConfig(width=width, depth=depth, num_heads=heads, patch_size=patch,
                      image_size=grid * patch, channels=channels, mlp_ratio=hidden / width,
                      scan_unroll=depth)
  if want is not None and want.width != width:  # says more than an unknown number of heads
    check_against_config(cfg, config, what=where)
  if not heads:
    raise ValueError(f"{where}: embed dim {width} is not an official ViT width "
                     f"{sorted(OFFICIAL_HEADS)}, so its number of attention heads is unknown "
                     f"(no tensor holds it): pass --num_heads or a --config of that model")
  if width % heads:
    raise ValueError(f"{where}: embed dim {width} is not divisible by {heads} heads; pass the "
                     f"model's --num_heads")
  if int(cfg.width * cfg.mlp_ratio) != hidden:
    raise ValueError(f"{where}: an MLP of {hidden} units is not int(width * ratio) for width "
                     f"{width}")
  return cfg


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


# --------------------------------------------------------------- sizes and the config

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


def check_against_config(cfg: vit.ViTConfig, config, *, head: dict | None = None,
                         prototypes=None, what: str = "the checkpoint") -> None:
  """Raises a one-line ValueError naming the first size in which `cfg` (and the head, the
  prototypes) differ from what `config` builds, and the override that fixes it."""
  want = vit.vit_config_from(config, "cpu")
  name = variant_of(cfg)
  heads = cfg.num_heads or "<its number of heads>"
  arch = (f": {what} is a ViT-{name}, pass --config.model.variant={name}" if name else
          f": pass --config.model.width={cfg.width} --config.model.depth={cfg.depth} "
          f"--config.model.num_heads={heads}")

  def differ(label, got, expected, fix):
    raise ValueError(f"{label} {got} in {what}, {expected} in the config{fix}")

  if cfg.width != want.width:
    differ("embed dim", cfg.width, want.width, arch)
  if cfg.depth != want.depth:
    differ("depth", cfg.depth, want.depth, arch)
  if cfg.patch_size != want.patch_size:
    differ("patch size", cfg.patch_size, want.patch_size, arch)
  if cfg.num_heads != want.num_heads:
    differ("attention heads", cfg.num_heads, want.num_heads,
           f": pass --config.model.num_heads={cfg.num_heads}")
  if cfg.mlp_ratio != want.mlp_ratio:
    differ("MLP ratio", cfg.mlp_ratio, want.mlp_ratio, ": pmsn_jax's configs build ratio-4 MLPs")
  if cfg.channels != want.channels:
    differ("input channels", cfg.channels, want.channels,
           f": pass --config.data.channels={cfg.channels} (and data.mean/std to match)")
  if cfg.grid != want.grid:
    differ("position table of", f"{cfg.grid}x{cfg.grid} patches ({cfg.image_size} px)",
           f"{want.grid}x{want.grid} ({want.image_size} px)",
           f": pass --config.data.image_size={cfg.image_size}")
  model = config.model
  if head is not None:
    hidden, out = head["fc3"]["kernel"].shape
    if hidden != model.hidden_dim:
      differ("projection head hidden dim", hidden, model.hidden_dim,
             f": pass --config.model.hidden_dim={hidden}")
    if out != model.output_dim:
      differ("projection head output dim", out, model.output_dim,
             f": pass --config.model.output_dim={out}")
  if prototypes is not None:
    if prototypes.shape[0] != model.num_prototypes:
      differ("prototypes", prototypes.shape[0], model.num_prototypes,
             f": pass --config.model.num_prototypes={prototypes.shape[0]}")
    if prototypes.shape[1] != model.output_dim:
      differ("prototype dim", prototypes.shape[1], model.output_dim,
             f": pass --config.model.output_dim={prototypes.shape[1]}")


# ---------------------------------------------------------------------- the commands

def from_msn(checkpoint_path, out, *, which: str = "target_encoder", config=None,
             num_heads: int | None = None) -> list[str]:
  """Converts an official MSN checkpoint into a pmsn_jax export at `out` (what load_encoder,
  evaluate --export, to_timm and config.init_from read). -> lines to print."""
  if which not in ENCODERS:
    raise ValueError(f"--which={which!r} is not one of {ENCODERS}")
  ckpt = read_msn_checkpoint(checkpoint_path, num_heads=num_heads, config=config)
  if which not in ckpt.backbones:
    raise ValueError(f"{ckpt.path} has no {which!r} state dict (it has "
                     f"{sorted(ckpt.backbones)}): pass --which={next(iter(ckpt.backbones))}")
  backbone = ckpt.backbones[which]
  head = None
  if backbone.head is not None and ckpt.prototypes is not None:
    head = {"params": backbone.head, "batch_stats": backbone.head_stats,
            "prototypes": ckpt.prototypes}
  if config is not None:
    check_against_config(backbone.vit, config, head=backbone.head, prototypes=ckpt.prototypes,
                         what=f"{ckpt.path}[{which!r}]")
    mean, std = tuple(config.data.mean), tuple(config.data.std)
  elif backbone.vit.channels == len(MSN_MEAN):
    mean, std = MSN_MEAN, MSN_STD
  else:
    raise ValueError(f"{ckpt.path}: a {backbone.vit.channels}-channel model, not MSN's RGB one: "
                     f"pass the --config it was trained with (its data.mean/std normalise the "
                     f"export's inputs)")
  write_export(out, backbone.vit, backbone.encoder, mean, std, head=head,
               extra={"source": {"msn_checkpoint": ckpt.path, "state_dict": which,
                                 "epoch": ckpt.epoch}})
  lines = [f"wrote {out}: the {which} of {ckpt.path}"
           + (f" (epoch {ckpt.epoch})" if ckpt.epoch is not None else "")
           + f", a {describe(backbone.vit)}"
           + (f", with its projection head and {ckpt.prototypes.shape[0]} prototypes"
              if head is not None else "")]
  lines += [f"note: {note}" for note in ckpt.notes]
  return lines


def write_export(out, cfg: vit.ViTConfig, params: dict, mean, std, *, head=None,
                 extra=None) -> None:
  """checkpoint.export_encoder of converted (NumPy) parameters."""
  from flax import nnx
  _, state = nnx.split(nnx.eval_shape(lambda: vit.ViT(cfg, rngs=nnx.Rngs(0))))
  nnx.replace_by_pure_dict(state, params)
  checkpoint.export_encoder(out, state, cfg, mean, std, head=head, extra=extra)


def timm_model_code(cfg: vit.ViTConfig) -> str:
  """The Python expression that builds timm's VisionTransformer for these weights: its
  registered name where one has this architecture, else the class with its options.
  dynamic_img_size=True resamples the position table for other input sizes (bicubic, as
  pmsn_jax does; docs/interop.md)."""
  name = TIMM_NAMES.get((cfg.width, cfg.depth, cfg.num_heads, cfg.patch_size))
  if name and cfg.image_size == 224 and cfg.channels == 3 and cfg.mlp_ratio == 4.0:
    return (f'timm.create_model("{name}", pretrained=False, num_classes=0, '
            f'dynamic_img_size=True)')
  kwargs = dict(img_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=cfg.channels,
                embed_dim=cfg.width, depth=cfg.depth, num_heads=cfg.num_heads,
                mlp_ratio=cfg.mlp_ratio, num_classes=0, dynamic_img_size=True)
  return ("timm.models.vision_transformer.VisionTransformer("
          + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")")


def head_path(out: str) -> str:
  """Where to_timm writes the head beside `out`: x.safetensors -> x.head.safetensors."""
  stem = out[:-len(".safetensors")] if out.endswith(".safetensors") else out
  return stem + ".head.safetensors"


def to_timm(export, out) -> list[str]:
  """Writes the export's encoder as a timm VisionTransformer state dict (safetensors) at `out`
  and, if the export has them, the projection head and prototypes at head_path(out).
  -> lines to print: how to build and load the model."""
  try:
    from safetensors.numpy import save as save_safetensors
  except ImportError:
    raise ValueError(f"writing safetensors needs the safetensors package: {INSTALL_HINT}"
                     ) from None
  out = os.fspath(out)
  meta, cfg, params = checkpoint.read_export(export)
  code = timm_model_code(cfg)
  info = {"format": TIMM_FORMAT, "timm_model": code, "vit": json.dumps(dataclasses.asdict(cfg)),
          "mean": json.dumps(list(meta["mean"])), "std": json.dumps(list(meta["std"]))}
  paths.path(out).write_bytes(save_safetensors(params_to_timm(params, cfg), metadata=info))
  lines = [f"wrote {out}: a {describe(cfg)} for timm; load it with",
           "  import safetensors.torch, timm",
           f"  model = {code}",
           f'  model.load_state_dict(safetensors.torch.load_file("{out}"), strict=True)',
           f"  # inputs: [N, {cfg.channels}, H, W] float32 in [0, 1] normalised with "
           f"mean={tuple(meta['mean'])}, std={tuple(meta['std'])}; model(x) is the CLS feature"]
  head = checkpoint.read_head(export)
  if head is None:
    lines.append(f"no projection head or prototypes in {export} (an export written before "
                 "exports carried them)")
    return lines
  tensors = params_to_msn_head(head["params"], head["batch_stats"])
  tensors["prototypes"] = np.ascontiguousarray(np.asarray(head["prototypes"], np.float32))
  hidden, output = head["params"]["fc3"]["kernel"].shape
  where = head_path(out)
  paths.path(where).write_bytes(save_safetensors(tensors, metadata={
      "format": TIMM_FORMAT, "layout": "MSN fc head: fc1, bn1, gelu1, fc2, bn2, gelu2, fc3; "
                                       "prototypes [K, d]"}))
  lines += [f"wrote {where}: the projection head (MSN's fc: Linear({cfg.width}, {hidden}), "
            f"BatchNorm1d, GELU, Linear({hidden}, {hidden}), BatchNorm1d, GELU, "
            f"Linear({hidden}, {output})) and prototypes "
            f"{list(np.shape(head['prototypes']))}; docs/interop.md shows how to load them"]
  return lines
