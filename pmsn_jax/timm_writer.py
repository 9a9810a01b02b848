"""pmsn_jax exports out to timm: the encoder as a state dict that timm's VisionTransformer loads
with strict=True, the projection head (MSN's `fc` layout) and prototypes beside it (safetensors).

safetensors is imported only where a file is written: `import pmsn_jax` and training never need
it (the `interop` extra installs it). The layouts map in state_dicts.py.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from pmsn_jax import checkpoint, paths, state_dicts
from pmsn_jax.models import vit

# timm's registered ViTs whose architecture, at 224 px with 3 channels and MLP ratio 4, is
# pmsn_jax's: (width, depth, heads, patch) -> name (tests/test_convert.py checks each in timm).
TIMM_NAMES = {(192, 12, 3, 16): "vit_tiny_patch16_224", (384, 12, 6, 16): "vit_small_patch16_224",
              (384, 12, 6, 8): "vit_small_patch8_224", (768, 12, 12, 16): "vit_base_patch16_224",
              (768, 12, 12, 8): "vit_base_patch8_224", (1024, 24, 16, 16): "vit_large_patch16_224",
              (1280, 32, 16, 14): "vit_huge_patch14_224"}
TIMM_FORMAT = "pmsn_jax.timm.v1"


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
    raise ValueError(f"writing safetensors needs the safetensors package: "
                     f"{state_dicts.INSTALL_HINT}") from None
  out = os.fspath(out)
  meta, cfg, params = checkpoint.read_export(export)
  code = timm_model_code(cfg)
  info = {"format": TIMM_FORMAT, "timm_model": code, "vit": json.dumps(dataclasses.asdict(cfg)),
          "mean": json.dumps(list(meta["mean"])), "std": json.dumps(list(meta["std"]))}
  state = state_dicts.params_to_timm(params, cfg)
  paths.path(out).write_bytes(save_safetensors(state, metadata=info))
  lines = [f"wrote {out}: a {state_dicts.describe(cfg)} for timm; load it with",
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
  tensors = state_dicts.params_to_msn_head(head["params"], head["batch_stats"])
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
