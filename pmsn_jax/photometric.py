"""The per-pixel half of MSN's views, in JAX, inside the jitted train step.

The host (data/augment.py) decodes, crops, resizes and flips, and ships each view as uint8 with its
row of photometric random numbers; this module turns them into the float32 views the model
sees: colour jitter, grayscale, Gaussian blur and mean/std normalisation.

Why on the accelerator: these ops were most of the host's work per image (the 23-tap blur at
224 alone is ~140 passes over a view), a TPU host must feed 4-8 chips, and float32 views are 4x
the bytes of uint8 ones on the way to the device. Here they are a few fused elementwise loops
over data already in HBM, a small share of a ViT step (docs/data.md gives it per model).

Why the random numbers come from the host: they are columns of the same per-view uniform
matrix that draws the crop (augment._draw, seeded by (seed, position)), so a view's crop and
its colour come from one stream, a resumed run replays them exactly, and the decisions are
those of the host implementation this module replaced (tests/photometric_reference_tf.py
holds it, the reference of tests/test_photometric.py).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from pmsn_jax.data.view_format import COLUMNS, PHOTOMETRIC_DEFAULTS, blur_radius

_COL = {name: i for i, name in enumerate(COLUMNS)}
_GRAY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as tf.image.rgb_to_grayscale.


def _field(cfg, name):
  value = getattr(cfg, name, None)
  return PHOTOMETRIC_DEFAULTS[name] if value is None else value


def batch_views(batch: dict, cfg) -> dict:
  """The step's float32 views from the pipeline's uint8 ones.

  batch: "target", "anchor" uint8 [B,S,S,C], "focal" uint8 [B,F,s,s,C] and "photometric"
  float32 [B,2+F,len(COLUMNS)] (rows: target, anchor, then the focal views). Returns the
  batch with the three views float32 and normalised, and without "photometric".
  """
  u = batch["photometric"]
  out = {k: v for k, v in batch.items() if k != "photometric"}
  out["target"] = apply(batch["target"], u[:, 0], cfg)
  out["anchor"] = apply(batch["anchor"], u[:, 1], cfg)
  # [B,F,...] as it is: folding F into the batch would make XLA copy between layouts.
  out["focal"] = apply(batch["focal"], u[:, 2:], cfg)
  return out


def apply(views, u, cfg):
  """uint8 views [...,H,W,C] + their random numbers [...,len(COLUMNS)] -> float32 views
  [...,H,W,C]: colour jitter, grayscale and blur, each with its probability, then
  (x - mean) / std. The leading dims "..." are any batch shape."""
  x = views.astype(jnp.float32) / 255.0
  x = _color_jitter(x, u, float(_field(cfg, "color_jitter_prob")),
                    float(_field(cfg, "color_jitter_strength")))
  if x.shape[-1] == 3:
    x = jnp.where(_coin(u, "gray", float(_field(cfg, "grayscale_prob"))),
                  jnp.broadcast_to(_luma(x), x.shape), x)
  blur_prob = float(_field(cfg, "blur_prob"))
  if blur_prob > 0:
    x = _blur(x, u, blur_prob, _field(cfg, "blur_sigma"))
  mean = np.asarray(cfg.mean, np.float32)
  std = np.asarray(cfg.std, np.float32)
  for name, value in (("mean", mean), ("std", std)):
    if value.ndim != 1 or value.shape[0] not in (1, x.shape[-1]):
      raise ValueError(f"data.{name} needs 1 or {x.shape[-1]} values, got {value.tolist()}")
  return (x - mean) / std


def _col(u, name):
  """Per-view random number [...]."""
  return u[..., _COL[name]]


def _per_pixel(t):
  """[...] -> [...,1,1,1], to broadcast a per-view value over its pixels."""
  return t[..., None, None, None]


def _coin(u, name, prob):
  """Per-view boolean [...,1,1,1], True with probability `prob`."""
  return _per_pixel(_col(u, name) < prob)


def _factor(u, name, spread):
  """Per-view factor ~ U(max(0, 1 - spread), 1 + spread), shape [...,1,1,1]."""
  lo = max(0.0, 1.0 - spread)
  return _per_pixel(lo + (1.0 + spread - lo) * _col(u, name))


def _luma(x):
  """[...,H,W,C] -> [...,H,W,1] grayscale (identity for C == 1)."""
  if x.shape[-1] == 1:
    return x
  return jnp.sum(x * jnp.asarray(_GRAY, x.dtype), axis=-1, keepdims=True)


def _color_jitter(x, u, prob: float, strength: float):
  """SimCLR/MSN colour jitter (brightness, contrast, saturation 0.8s, hue 0.2s) in fixed order,
  applied to each view with probability `prob`. Saturation and hue need RGB."""
  if prob <= 0 or strength <= 0:
    return x
  y = jnp.clip(x * _factor(u, "brightness", 0.8 * strength), 0.0, 1.0)
  mean = jnp.mean(_luma(y), axis=(-3, -2, -1), keepdims=True)
  y = jnp.clip((y - mean) * _factor(u, "contrast", 0.8 * strength) + mean, 0.0, 1.0)
  if x.shape[-1] == 3:
    gray = _luma(y)
    y = jnp.clip((y - gray) * _factor(u, "saturation", 0.8 * strength) + gray, 0.0, 1.0)
    y = _shift_hue(y, 0.2 * strength * (2.0 * _col(u, "hue") - 1.0))
  return jnp.where(_coin(u, "jitter", prob), y, x)


def _shift_hue(rgb, delta):
  """Rotates the hue of RGB views [...,H,W,3] in [0,1] by `delta` [...] turns.

  tf.image.rgb_to_hsv's hue (from the dominant channel), shifted, then back to RGB with the
  closed form of hsv_to_rgb, channel c = V - V S clip(min(k, 4 - k), 0, 1) with k = (n_c +
  6 H) mod 6, n = (5, 3, 1): one expression broadcast over the channels instead of three
  stacked ones, which XLA fuses into one loop.
  """
  value = jnp.max(rgb, axis=-1, keepdims=True)
  chroma = value - jnp.min(rgb, axis=-1, keepdims=True)
  r, g, b = rgb[..., 0:1], rgb[..., 1:2], rgb[..., 2:3]
  norm = 1.0 / (6.0 * jnp.where(chroma > 0, chroma, 1.0))
  hue = jnp.where(r == value, norm * (g - b),
                  jnp.where(g == value, norm * (b - r) + 2.0 / 6.0, norm * (r - g) + 4.0 / 6.0))
  hue = jnp.where(chroma > 0, hue, 0.0) + _per_pixel(delta)
  k = jnp.mod(jnp.asarray([5.0, 3.0, 1.0]) + 6.0 * (hue - jnp.floor(hue)), 6.0)
  return value - chroma * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)


def _blur(x, u, prob: float, sigma_range):
  """Separable Gaussian blur, with probability `prob`, of square views [...,S,S,C]: sigma ~
  U(sigma_range) per view, 2r+1 taps, mirrored edges (as torchvision's GaussianBlur).

  Each pass is a matmul with the view's [S,S] blur matrix (taps and mirroring folded in; the
  identity for a view the coin spares), not a sum of 2r+1 shifted slices: on a TPU the
  matmuls run on the MXU and read each view once, where the slices cost 2r+1 passes over HBM
  per pass. HIGHEST precision keeps float32 accuracy (TPU's default rounds to bfloat16).
  """
  size = x.shape[-2]
  radius = blur_radius(size)
  lo, hi = sigma_range
  sigma = lo + (hi - lo) * _col(u, "sigma")
  taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  kernel = jnp.exp(-jnp.square(taps) / (2.0 * jnp.square(sigma)[..., None]))
  kernel = kernel / jnp.sum(kernel, axis=-1, keepdims=True)
  matrix = jnp.einsum("...t,tij->...ij", kernel, _tap_positions(size, radius),
                      precision="highest")
  matrix = jnp.where((_col(u, "blur") < prob)[..., None, None], matrix, jnp.eye(size))
  rows = jnp.einsum("...ih,...hwc->...iwc", matrix, x, precision="highest")
  return jnp.einsum("...jw,...iwc->...ijc", matrix, rows, precision="highest")


def _tap_positions(size: int, radius: int) -> np.ndarray:
  """[2r+1, size, size] one-hots: tap t of output pixel i reads input pixel reflect(i + t - r),
  mirrored at the edges as numpy's "symmetric" padding (edge pixel repeated)."""
  positions = np.arange(size)[None, :] + np.arange(-radius, radius + 1)[:, None]
  positions = np.where(positions < 0, -positions - 1, positions)
  positions = np.where(positions >= size, 2 * size - positions - 1, positions)
  return (positions[..., None] == np.arange(size)).astype(np.float32)
