"""Official MSN checkpoints in: reads a facebookresearch/msn .pth.tar safely, checks its sizes
against a config, and converts one of its encoders into a pmsn_jax export.

facebookresearch/msn saves its runs with torch.save (src/msn_train.py, save_checkpoint) as a
dict with "encoder" and "target_encoder" (state dicts of its DeiT VisionTransformer, src/deit.py,
whose `fc` is the projection head; DistributedDataParallel prefixes every key with "module."),
"prototypes" ([K, d], a plain tensor), "opt" (AdamW's state dict), "epoch" and a few scalars.
The encoders and the head map exactly onto pmsn_jax's (state_dicts.py). No tensor holds the
number of attention heads: the official widths imply it (DeiT's sizes, vit.VIT_SIZES); for any
other width it comes from a config or --num_heads.

Checkpoints are read with torch.load(weights_only=True): tensors and plain containers, never
arbitrary unpickling. torch is imported there and nowhere else: `import pmsn_jax` and training
never need it (the `interop` extra installs it).
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import pickle
import re

import numpy as np

from pmsn_jax import checkpoint, paths, state_dicts
from pmsn_jax.models import vit

ENCODERS = ("target_encoder", "encoder")  # the state dicts of an MSN checkpoint, by name
# What MSN's evaluations normalise with (logistic_eval.py, linear_eval.py): ImageNet's.
MSN_MEAN, MSN_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Heads of the official widths (DeiT's Ti/S/B/L/H, MSN's deit_tiny ... deit_huge).
OFFICIAL_HEADS = {s["width"]: s["num_heads"] for name, s in vit.VIT_SIZES.items() if name != "mu"}


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
    raise ValueError(f"reading the PyTorch checkpoint {path} needs torch: "
                     f"{state_dicts.INSTALL_HINT}") from None
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
    head, stats, note = state_dicts.msn_head_to_params(head_state, cfg.width)
    if note and not notes:
      notes.append(f"{name}: {note}")
    params = state_dicts.timm_to_params(encoder_state, cfg, where)
    backbones[name] = Backbone(cfg, params, head, stats)
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


# --------------------------------------------------------------------------- the config

def check_against_config(cfg: vit.ViTConfig, config, *, head: dict | None = None,
                         prototypes=None, what: str = "the checkpoint") -> None:
  """Raises a one-line ValueError naming the first size in which `cfg` (and the head, the
  prototypes) differ from what `config` builds, and the override that fixes it."""
  want = vit.vit_config_from(config, "cpu")
  name = state_dicts.variant_of(cfg)
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


# -------------------------------------------------------------------------- the command

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
           + f", a {state_dicts.describe(backbone.vit)}"
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
