"""MSN multi-crop views on the host: decode, crop, resize and flip, as uint8, with stateless,
per-example seeded randomness.

The photometric half of a view (colour jitter, grayscale, blur, normalisation) runs on the
accelerator inside the jitted step (pmsn_jax/photometric.py): the host ships each view as
uint8, 4x fewer bytes than float32, with its row of photometric random numbers.

Why stateless: the training pipeline makes every batch a pure function of (seed, step) so that
a resumed run replays exactly the data of an uninterrupted one. Each example therefore carries
one seed tensor [2]; every random number below derives from it and from nothing else (no
tf.random global state, no op seeds), so the same (image, seed) gives bit-identical views in any
batch, on any host, after any restart.

Per image (MSN's multi-crop recipe): a target and an anchor crop of side
`image_size` with scale `target_scale`, plus `num_focal` focal crops of side `focal_size` with
scale `focal_scale`, each flipped horizontally with probability 1/2. Patch masking of the
anchor happens in the model, not here.

Randomness: stateless_split turns an example's seed into one seed per view group (target +
anchor, focal); each group draws one uniform matrix [views, _K] whose columns are the ops'
random numbers (_COL below), so every op of every view has its own stream. The photometric
columns travel with the views as "photometric" [N, 2 + num_focal, len(view_format.COLUMNS)].

Speed: only those draws run per example (tf.map_fn); the crops of all views of all images of a
batch are one crop_and_resize. No op mixes rows and none rounds differently with the batch size
(see _exp_per_example), so a view is bit-identical whatever batch, or process slice of a
batch, it is computed in.
"""
from __future__ import annotations

import math

import tensorflow as tf

from pmsn_jax.data import view_format

DEFAULTS = view_format.VIEW_DEFAULTS
REQUIRED = ("image_size", "focal_size", "num_focal", "mean", "std")

_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_ATTEMPTS = 10  # RandomResizedCrop tries before falling back to a centre crop, as torchvision.
# Column layout of the per-view uniform matrix: the geometry's, then the photometric ones
# (view_format.COLUMNS, shipped to the device as they are).
_COL = dict(area=0, log_ratio=_ATTEMPTS, crop_y=2 * _ATTEMPTS, crop_x=2 * _ATTEMPTS + 1,
            flip=2 * _ATTEMPTS + 2)
_PHOTOMETRIC = slice(_COL["flip"] + 1, _COL["flip"] + 1 + len(view_format.COLUMNS))
_K = _PHOTOMETRIC.stop


def field(cfg, name):
  """cfg.name, DEFAULTS[name] when absent or None; a clear error for required fields."""
  value = getattr(cfg, name, None)
  if value is not None:
    return value
  if name in DEFAULTS:
    return DEFAULTS[name]
  raise ValueError(f"data config needs field {name!r} (required: {', '.join(REQUIRED)})")


def make_views(image, seed, cfg) -> dict[str, tf.Tensor]:
  """uint8 [H,W,C] + seed [2] -> uint8 views target/anchor [S,S,C], focal [F,s,s,C], and
  their photometric random numbers [2+F, len(view_format.COLUMNS)] (pmsn_jax/photometric.py)."""
  views = make_views_batch(image[None], tf.reshape(seed, [1, 2]), cfg)
  return {k: v[0] for k, v in views.items()}


def make_views_batch(images, seeds, cfg) -> dict[str, tf.Tensor]:
  """Batched make_views: uint8 [N,H,W,C] (same H,W), seeds [N,2] -> [N,...] per view.

  Row i depends only on (images[i], seeds[i]), never on the batch it sits in.
  """
  images = tf.convert_to_tensor(images)
  seeds = tf.cast(seeds, tf.int64)  # An int32 seed would give a different stream.
  if images.dtype != tf.uint8 or images.shape.rank != 4 or images.shape[-1] is None:
    raise ValueError(f"images must be uint8 [N,H,W,C] with a known C, got {images.dtype} "
                     f"{images.shape}")
  num_focal = int(field(cfg, "num_focal"))
  focal_size = int(field(cfg, "focal_size"))

  u_pair, u_focal = tf.map_fn(lambda seed: _draw(seed, num_focal), seeds, fn_output_signature=(
      tf.TensorSpec([2, _K]), tf.TensorSpec([num_focal, _K])))
  height, width = tf.shape(images)[1], tf.shape(images)[2]
  groups = _view_groups(u_pair, u_focal, cfg)
  views = []
  for u, ratio, side, scale in groups:
    windows = _crop_windows(u, ratio, height, width, scale)
    boxes = _boxes_in(windows, (0, 0), (height, width), height, width, side)
    views.append(_crop_group(images, boxes, u, side, cfg))
  return _views_dict(views, u_pair, u_focal, focal_size, images.shape[-1])


def make_views_encoded(encoded, seed, cfg, channels: int) -> dict[str, tf.Tensor]:
  """Encoded image bytes (JPEG, PNG, GIF, BMP) + seed [2] -> make_views' views.

  Fused decode and crop: all views' crop windows are drawn from the image's size first
  (read from the JPEG header without decoding), then only the rectangle covering them is
  decoded (tf.io.decode_and_crop_jpeg skips the rest). The views equal make_views of the fully
  decoded image, up to JPEG decoder rounding at the rectangle's edge. Other formats are decoded
  whole. A corrupt file raises an InvalidArgumentError (the pipeline skips and counts it).
  """
  encoded = tf.convert_to_tensor(encoded, tf.string)
  seed = tf.cast(tf.reshape(seed, [2]), tf.int64)
  num_focal = int(field(cfg, "num_focal"))
  u_pair, u_focal = _draw(seed, num_focal)
  groups = _view_groups(u_pair[None], u_focal[None], cfg)

  def windows_for(height, width):
    return [_crop_windows(u, ratio, height, width, scale) for u, ratio, _, scale in groups]

  def jpeg():
    shape = tf.io.extract_jpeg_shape(encoded)
    height, width = shape[0], shape[1]
    top, left, bottom, right = _covering_rectangle(windows_for(height, width), height, width)
    region = tf.io.decode_and_crop_jpeg(
        encoded, tf.stack([top, left, bottom - top, right - left]), channels=channels)
    return region, tf.stack([top, left]), tf.stack([height, width])

  def other():
    image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
    shape = tf.shape(image)
    return image, tf.zeros([2], tf.int32), shape[:2]

  region, origin, image_hw = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
  region = tf.ensure_shape(region, [None, None, channels])
  height, width = image_hw[0], image_hw[1]
  region_hw = tf.shape(region)[:2]
  views = []
  for (u, _, side, _), windows in zip(groups, windows_for(height, width)):
    boxes = _boxes_in(windows, (origin[0], origin[1]), (region_hw[0], region_hw[1]), height,
                      width, side)
    views.append(_crop_group(region[None], boxes, u, side, cfg))
  views = _views_dict(views, u_pair[None], u_focal[None], int(field(cfg, "focal_size")),
                      channels)
  return {k: v[0] for k, v in views.items()}


def _draw(seed, num_focal: int):
  """An example's uniforms: [2,_K] for target + anchor, [num_focal,_K] for the focal views."""
  group_seeds = tf.random.experimental.stateless_split(seed, 2)
  return (tf.random.stateless_uniform([2, _K], group_seeds[0]),
          tf.random.stateless_uniform([num_focal, _K], group_seeds[1]))


def _view_groups(u_pair, u_focal, cfg):
  """[(u, crop aspect ratios, side, scale)] for the target+anchor and the focal views."""
  groups = [(u_pair, int(field(cfg, "image_size")), field(cfg, "target_scale"))]
  if u_focal.shape[1]:
    groups.append((u_focal, int(field(cfg, "focal_size")), field(cfg, "focal_scale")))
  ratios = _exp_per_example([_log_ratio(u) for u, _, _ in groups])
  return [(_flat(u), _flat(ratio), side, scale)
          for (u, side, scale), ratio in zip(groups, ratios)]


def _flat(t):
  """[N,V,k] -> [N*V,k]: one row per view."""
  return tf.reshape(t, [-1, t.shape[-1]])


def _views_dict(views, u_pair, u_focal, focal_size: int, channels: int):
  """The views of each image [N,...] and their photometric random numbers [N, 2+F, P]."""
  pair = views[0]
  n = tf.shape(pair)[0]
  focal = views[1] if len(views) > 1 else tf.zeros([n, 0, focal_size, focal_size, channels],
                                                   tf.uint8)
  u = tf.concat([u_pair, u_focal], axis=1)[..., _PHOTOMETRIC]
  return dict(target=pair[:, 0], anchor=pair[:, 1], focal=focal, photometric=u)


def eval_preprocess(image, cfg) -> tf.Tensor:
  """uint8 [H,W,C] -> float32 [S,S,C]: centre square crop, resize to image_size, normalise."""
  return eval_preprocess_batch(image[None], cfg)[0]


def eval_preprocess_batch(images, cfg) -> tf.Tensor:
  """Batched eval_preprocess. The centre square has side eval_crop_fraction * min(H, W)
  (MSN's ImageNet eval: 224/256 = 0.875; 1.0 keeps all of a 28x28 image)."""
  images = tf.convert_to_tensor(images)
  if images.dtype != tf.uint8:
    raise ValueError(f"eval_preprocess expects uint8 images, got {images.dtype}")
  size = int(field(cfg, "image_size"))
  shape = tf.shape(images)
  short = tf.cast(tf.minimum(shape[1], shape[2]), tf.float32)
  side = tf.maximum(1, tf.cast(tf.round(short * field(cfg, "eval_crop_fraction")), tf.int32))
  top, left = (shape[1] - side) // 2, (shape[2] - side) // 2
  crop = tf.cast(images[:, top:top + side, left:left + side, :], tf.float32) / 255.0
  x = tf.image.resize(crop, [size, size], antialias=True)
  return _normalise(x, cfg)


def _log_ratio(u):
  """Log crop aspect ratios [N,V,_ATTEMPTS] of a view group u [N,V,_K]."""
  lo, hi = math.log(_RATIO[0]), math.log(_RATIO[1])
  return lo + (hi - lo) * u[..., _COL["log_ratio"]:_COL["log_ratio"] + _ATTEMPTS]


def _exp_per_example(tensors: list[tf.Tensor]) -> list[tf.Tensor]:
  """exp of each [N,...] tensor, computed one example at a time on a fixed-size vector.

  TF's vectorised exp rounds differently for the elements in a tensor's scalar tail, so a
  batched exp would make a view's crop depend on the size of its batch. Everything
  else in this module is exactly rounded arithmetic (+ - * / sqrt) and needs no such care.
  """
  n = tf.shape(tensors[0])[0]
  flat = tf.map_fn(tf.exp, tf.concat([tf.reshape(t, [n, -1]) for t in tensors], axis=1))
  sizes = [math.prod(t.shape[1:]) for t in tensors]
  return [tf.reshape(part, tf.shape(t)) for part, t in zip(tf.split(flat, sizes, 1), tensors)]


def _crop_group(images, boxes, u, size: int, cfg) -> tf.Tensor:
  """Views of side `size`, V per image -> uint8 [N,V,size,size,C]: bilinear crops, flipped.

  images uint8 [N,H,W,C]; per view (rows ordered image-major): boxes [N*V,4] (crop_and_resize
  coordinates), u [N*V,_K] uniforms. Rounded to the nearest integer: the photometric ops then
  see the crop within half a grey level (docs/data.md gives what that changes downstream).
  """
  x = _crop_group_float(images, boxes, u, size, cfg)
  return tf.cast(tf.round(x), tf.uint8)


def _crop_group_float(images, boxes, u, size: int, cfg) -> tf.Tensor:
  """_crop_group before rounding: float32 in [0, 255].

  A flipped view is sampled right to left (crop_and_resize mirrors a box whose x1 > x2), not
  reversed after sampling: the same pixels, without a second pass over every view (a third of
  a JPEG's host time when it was one).
  """
  n, channels = tf.shape(images)[0], images.shape[-1]
  owner = tf.repeat(tf.range(n), tf.shape(u)[0] // n)
  if field(cfg, "flip"):
    y1, x1, y2, x2 = tf.unstack(boxes, axis=1)
    flip = _col(u, "flip") < 0.5
    boxes = tf.stack([y1, tf.where(flip, x2, x1), y2, tf.where(flip, x1, x2)], axis=1)
  x = tf.image.crop_and_resize(images, boxes, owner, [size, size])
  return tf.reshape(x, [n, -1, size, size, channels])


def _col(u, name):
  return u[:, _COL[name]]


def _crop_windows(u, ratio, height, width, scale):
  """RandomResizedCrop windows (top, left, height, width) in pixels, each [M] float32.

  Sampled as torchvision does (area ~ U(scale) * H * W, log aspect ~ U(log 3/4, log 4/3), first
  of _ATTEMPTS that fits, else a centre crop), but real-valued. u [M,_K], ratio [M,_ATTEMPTS].
  """
  h_img, w_img = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  attempts = slice(_COL["area"], _COL["area"] + _ATTEMPTS)
  area = h_img * w_img * (scale[0] + (scale[1] - scale[0]) * u[:, attempts])
  w, h = tf.sqrt(area * ratio), tf.sqrt(area / ratio)
  fits = (w <= w_img) & (h <= h_img)
  first = tf.argmax(tf.cast(fits, tf.int32), axis=1, output_type=tf.int32)
  w, h = tf.gather(w, first, batch_dims=1), tf.gather(h, first, batch_dims=1)
  found = tf.reduce_any(fits, axis=1)
  # Fallback: the largest centred crop whose aspect ratio lies in _RATIO.
  w = tf.where(found, w, tf.minimum(w_img, h_img * _RATIO[1]))
  h = tf.where(found, h, tf.minimum(h_img, w_img / _RATIO[0]))
  y0 = tf.where(found, _col(u, "crop_y"), 0.5) * (h_img - h)
  x0 = tf.where(found, _col(u, "crop_x"), 0.5) * (w_img - w)
  return y0, x0, h, w


def _covering_rectangle(group_windows, height, width):
  """Integer (top, left, bottom, right) of the pixels any window samples, a 1-pixel margin
  included for bilinear interpolation, clipped to the image."""
  y0 = tf.concat([w[0] for w in group_windows], 0)
  x0 = tf.concat([w[1] for w in group_windows], 0)
  y1 = tf.concat([w[0] + w[2] for w in group_windows], 0)
  x1 = tf.concat([w[1] + w[3] for w in group_windows], 0)
  top = tf.maximum(tf.cast(tf.floor(tf.reduce_min(y0)), tf.int32) - 1, 0)
  left = tf.maximum(tf.cast(tf.floor(tf.reduce_min(x0)), tf.int32) - 1, 0)
  bottom = tf.minimum(tf.cast(tf.math.ceil(tf.reduce_max(y1)), tf.int32) + 1, height)
  right = tf.minimum(tf.cast(tf.math.ceil(tf.reduce_max(x1)), tf.int32) + 1, width)
  return top, left, bottom, right


def _boxes_in(windows, origin, region_hw, height, width, size: int) -> tf.Tensor:
  """crop_and_resize boxes [M,4] of pixel `windows` on an image of (height, width) of which
  the region at `origin` with extent `region_hw` is decoded (the whole image: origin 0).

  A crop smaller than `size` is upsampled, so images smaller than the output (a 5x7 input)
  work. Resampling is bilinear without antialiasing (torchvision's PIL path antialiases when
  it downsamples; at MNIST sizes there is nothing to alias).
  """
  y0, x0, h, w = windows

  def span(start, length, extent, offset, region):
    # Output pixel j samples pixel-centre coordinate start + (j + 0.5) * length / size - 0.5
    # (half-pixel centres, as tf.image.resize); clamped so nothing is extrapolated.
    extent, offset, region = (tf.cast(t, tf.float32) for t in (extent, offset, region))
    first_c = start + 0.5 * length / size - 0.5
    last_c = start + (size - 0.5) * length / size - 0.5
    denom = tf.maximum(region - 1.0, 1.0)
    return ((tf.clip_by_value(first_c, 0.0, extent - 1.0) - offset) / denom,
            (tf.clip_by_value(last_c, 0.0, extent - 1.0) - offset) / denom)

  y1, y2 = span(y0, h, height, origin[0], region_hw[0])
  x1, x2 = span(x0, w, width, origin[1], region_hw[1])
  return tf.stack([y1, x1, y2, x2], axis=1)


def _normalise(x, cfg) -> tf.Tensor:
  """(x - mean) / std per channel, x in [0, 1]; mean/std of length C or 1."""
  mean = tf.constant(field(cfg, "mean"), tf.float32)
  std = tf.constant(field(cfg, "std"), tf.float32)
  for name, value in (("mean", mean), ("std", std)):
    if value.shape.rank != 1 or value.shape[0] not in (1, x.shape[-1]):
      raise ValueError(f"cfg.{name} needs 1 or {x.shape[-1]} values, got {value.shape}")
  return (x - mean) / std
