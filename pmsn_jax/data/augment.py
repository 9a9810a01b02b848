"""MSN multi-crop views as TensorFlow ops with stateless, per-example seeded randomness.

Why stateless: the training pipeline makes every batch a pure function of (seed, step) so that
a resumed run replays exactly the data of an uninterrupted one. Each example therefore carries
one seed tensor [2]; every random number below derives from it and from nothing else (no
tf.random global state, no op seeds), so the same (image, seed) gives bit-identical views in any
batch, on any host, after any restart.

Per image (METHOD.md, "Views and augmentations"): a target and an anchor crop of side
`image_size` with scale `target_scale`, plus `num_focal` focal crops of side `focal_size` with
scale `focal_scale`; every view then gets a horizontal flip, colour jitter, grayscale, Gaussian
blur and mean/std normalisation. Patch masking of the anchor happens in the model, not here.

Randomness: stateless_split turns an example's seed into one seed per view group (target +
anchor, focal); each group draws one uniform matrix [views, _K] whose columns are the ops'
random numbers (_COL below), so every op of every view has its own stream.

Speed: only those draws run per example (tf.map_fn); the ops then work on all views of all
images of a batch at once (one crop_and_resize, one set of elementwise colour ops...). No op mixes
rows and none rounds differently with the batch size (see _exp_per_example), so a view is
bit-identical whatever batch, or process slice of a batch, it is computed in.
"""
from __future__ import annotations

import functools
import math
import types

import tensorflow as tf

DEFAULTS = dict(
    target_scale=(0.3, 1.0), focal_scale=(0.05, 0.3), flip=True, color_jitter_prob=0.8,
    color_jitter_strength=0.5, grayscale_prob=0.2, blur_prob=0.5, blur_sigma=(0.1, 2.0),
    eval_crop_fraction=1.0,
)
REQUIRED = ("image_size", "focal_size", "num_focal", "mean", "std")

_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_ATTEMPTS = 10  # RandomResizedCrop tries before falling back to a centre crop, as torchvision.
_GRAY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as tf.image.rgb_to_grayscale.
# Column layout of the per-view uniform matrix.
_COL = dict(area=0, log_ratio=_ATTEMPTS, crop_y=2 * _ATTEMPTS, crop_x=2 * _ATTEMPTS + 1)
_COL.update({name: 2 * _ATTEMPTS + 2 + i for i, name in enumerate(
    ["flip", "jitter", "brightness", "contrast", "saturation", "hue", "gray", "blur", "sigma"])})
_K = max(_COL.values()) + 1


def field(cfg, name):
  """cfg.name, DEFAULTS[name] when absent or None; a clear error for required fields."""
  value = getattr(cfg, name, None)
  if value is not None:
    return value
  if name in DEFAULTS:
    return DEFAULTS[name]
  raise ValueError(f"data config needs field {name!r} (required: {', '.join(REQUIRED)})")


def make_views(image, seed, cfg) -> dict[str, tf.Tensor]:
  """uint8 [H,W,C] + seed [2] -> target/anchor [S,S,C], focal [F,s,s,C], float32, normalised."""
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
  for u, ratio, kernel, side, scale in groups:
    windows = _crop_windows(u, ratio, height, width, scale)
    boxes = _boxes_in(windows, (0, 0), (height, width), height, width, side)
    views.append(_augment_group(images, boxes, u, kernel, side, cfg))
  return _views_dict(views, tf.shape(images)[0], focal_size, images.shape[-1])


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
    return [_crop_windows(u, ratio, height, width, scale) for u, ratio, _, _, scale in groups]

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
  for (u, _, kernel, side, _), windows in zip(groups, windows_for(height, width)):
    boxes = _boxes_in(windows, (origin[0], origin[1]), (region_hw[0], region_hw[1]), height,
                      width, side)
    views.append(_augment_group(region[None], boxes, u, kernel, side, cfg, compiled=True))
  views = _views_dict(views, 1, int(field(cfg, "focal_size")), channels)
  return {k: v[0] for k, v in views.items()}


def _draw(seed, num_focal: int):
  """An example's uniforms: [2,_K] for target + anchor, [num_focal,_K] for the focal views."""
  group_seeds = tf.random.experimental.stateless_split(seed, 2)
  return (tf.random.stateless_uniform([2, _K], group_seeds[0]),
          tf.random.stateless_uniform([num_focal, _K], group_seeds[1]))


def _view_groups(u_pair, u_focal, cfg):
  """[(u, crop aspect ratios, blur kernel, side, scale)] for target+anchor and focal views."""
  groups = [(u_pair, int(field(cfg, "image_size")), field(cfg, "target_scale"))]
  if u_focal.shape[1]:
    groups.append((u_focal, int(field(cfg, "focal_size")), field(cfg, "focal_scale")))
  exp_args = [_exp_args(u, side, cfg) for u, side, _ in groups]
  exps = _exp_per_example([t for pair in exp_args for t in pair])
  return [(_flat(u), _flat(exps[2 * i]), _flat(exps[2 * i + 1]), side, scale)
          for i, (u, side, scale) in enumerate(groups)]


def _flat(t):
  """[N,V,k] -> [N*V,k]: one row per view."""
  return tf.reshape(t, [-1, t.shape[-1]])


def _views_dict(views, n, focal_size: int, channels: int) -> dict[str, tf.Tensor]:
  pair = views[0]
  focal = views[1] if len(views) > 1 else tf.zeros([n, 0, focal_size, focal_size, channels])
  return dict(target=pair[:, 0], anchor=pair[:, 1], focal=focal)


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


def _exp_args(u, size: int, cfg):
  """Arguments of the exp()s of a view group u [N,V,_K]: log crop aspect ratios [N,V,_ATTEMPTS]
  and log Gaussian blur weights -t^2 / (2 sigma^2) [N,V,k]."""
  lo, hi = math.log(_RATIO[0]), math.log(_RATIO[1])
  log_ratio = lo + (hi - lo) * u[..., _COL["log_ratio"]:_COL["log_ratio"] + _ATTEMPTS]
  sigma_lo, sigma_hi = field(cfg, "blur_sigma")
  sigma = sigma_lo + (sigma_hi - sigma_lo) * u[..., _COL["sigma"]:_COL["sigma"] + 1]
  radius = _blur_radius(size)
  taps = tf.range(-radius, radius + 1, dtype=tf.float32)
  return log_ratio, -tf.square(taps) / (2.0 * tf.square(sigma))


def _exp_per_example(tensors: list[tf.Tensor]) -> list[tf.Tensor]:
  """exp of each [N,...] tensor, computed one example at a time on a fixed-size vector.

  TF's vectorised exp rounds differently for the elements in a tensor's scalar tail, so a
  batched exp would make a view's crop and blur depend on the size of its batch. Everything
  else in this module is exactly rounded arithmetic (+ - * / sqrt) and needs no such care.
  """
  n = tf.shape(tensors[0])[0]
  flat = tf.map_fn(tf.exp, tf.concat([tf.reshape(t, [n, -1]) for t in tensors], axis=1))
  sizes = [math.prod(t.shape[1:]) for t in tensors]
  return [tf.reshape(part, tf.shape(t)) for part, t in zip(tf.split(flat, sizes, 1), tensors)]


def _augment_group(images, boxes, u, kernel, size: int, cfg, compiled=False) -> tf.Tensor:
  """Views of side `size`, V per image -> float32 [N,V,size,size,C].

  images uint8 [N,H,W,C]; per view (rows ordered image-major): boxes [N*V,4] (crop_and_resize
  coordinates), u [N*V,_K] uniforms, kernel [N*V,k] unnormalised blur weights.
  """
  n, channels = tf.shape(images)[0], images.shape[-1]
  kernel /= tf.reduce_sum(kernel, axis=1, keepdims=True)
  owner = tf.repeat(tf.range(n), tf.shape(u)[0] // n)
  x = tf.image.crop_and_resize(images, boxes, owner, [size, size]) / 255.0
  before_blur, after_blur = _photometric(
      compiled, *(_hashable(field(cfg, name)) for name in _PHOTOMETRIC))
  x, rows_blurred = before_blur(x, u, kernel)
  x = after_blur(x, rows_blurred, u, kernel)
  return tf.reshape(x, [n, -1, size, size, channels])


# The config fields of the per-pixel ops after the crop (_photometric bakes them in).
_PHOTOMETRIC = ("flip", "color_jitter_prob", "color_jitter_strength", "grayscale_prob",
                "blur_prob", "mean", "std")


def _hashable(value):
  return tuple(value) if isinstance(value, (list, tuple)) else value


@functools.cache
def _photometric(compiled: bool, *values):
  """The per-pixel ops after the crop (flip, colour jitter, grayscale, blur, normalisation) as
  two functions, XLA-compiled if `compiled`, for the _PHOTOMETRIC config `values`.

  The batched in-memory path (28 px demo images, ~30x faster than the train step already) runs
  them as plain TF ops, whose results the demo's figures were measured with; the per-image
  encoded path (224/96 views of photos) compiles them.

  Why XLA: as TF kernels these are ~50 float32 ops per view group plus ~140 for the blur at 224
  (a slice, a multiply and an add per tap and pass), each a pass over memory; they were ~85% of
  a JPEG's time on CPU. XLA fuses them into a few loops, 4-6x faster. Its + - * / round exactly
  as TF's kernels do and nothing here mixes rows, so a view still does not depend on its batch.
  Why two functions, split between the blur's passes: in one, XLA fuses the vertical pass into
  each tap of the horizontal one and recomputes it per tap (5x the work at 96 px); the function
  boundary makes it materialise the vertical pass once.
  """
  cfg = types.SimpleNamespace(**dict(zip(_PHOTOMETRIC, values)))
  blur_prob = field(cfg, "blur_prob")

  def before_blur(x, u, kernel):
    """-> (views flipped, jittered, grayed; their vertical blur pass, or the views if no blur)."""
    if field(cfg, "flip"):
      x = tf.where(_coin(u, "flip", 0.5), tf.reverse(x, axis=[2]), x)
    x = _color_jitter(x, u, field(cfg, "color_jitter_prob"), field(cfg, "color_jitter_strength"))
    if x.shape[-1] == 3:
      gray = tf.tile(_luma(x), [1, 1, 1, 3])
      x = tf.where(_coin(u, "gray", field(cfg, "grayscale_prob")), gray, x)
    if blur_prob <= 0:
      return x, x
    radius = _blur_radius(x.shape[1])
    padded = tf.pad(x, [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="SYMMETRIC")
    return x, _blur_pass(padded, kernel, 1, radius)

  def after_blur(x, rows_blurred, u, kernel):
    if blur_prob > 0:
      blurred = _blur_pass(rows_blurred, kernel, 2, _blur_radius(x.shape[1]))
      x = tf.where(_coin(u, "blur", blur_prob), blurred, x)
    return _normalise(x, cfg)

  if not compiled:
    return before_blur, after_blur
  return (tf.function(before_blur, jit_compile=True),
          tf.function(after_blur, jit_compile=True))


def _col(u, name):
  return u[:, _COL[name]]


def _coin(u, name, prob) -> tf.Tensor:
  """Per-view boolean [M,1,1,1], True with probability `prob`."""
  return tf.reshape(_col(u, name) < prob, [-1, 1, 1, 1])


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


def _luma(x) -> tf.Tensor:
  """[M,H,W,C] -> [M,H,W,1] grayscale (identity for C == 1)."""
  if x.shape[-1] == 1:
    return x
  return tf.reduce_sum(x * tf.constant(_GRAY, x.dtype), axis=-1, keepdims=True)


def _factor(u, name, spread) -> tf.Tensor:
  """Per-view factor ~ U(max(0, 1 - spread), 1 + spread), shape [M,1,1,1]."""
  lo = max(0.0, 1.0 - spread)
  return tf.reshape(lo + (1.0 + spread - lo) * _col(u, name), [-1, 1, 1, 1])


def _color_jitter(x, u, prob, strength) -> tf.Tensor:
  """SimCLR/MSN colour jitter (brightness, contrast, saturation 0.8s, hue 0.2s) in fixed order,
  applied to each view with probability `prob`. Saturation and hue need RGB."""
  if prob <= 0 or strength <= 0:
    return x
  y = tf.clip_by_value(x * _factor(u, "brightness", 0.8 * strength), 0.0, 1.0)
  mean = tf.reduce_mean(_luma(y), axis=[1, 2, 3], keepdims=True)
  y = tf.clip_by_value((y - mean) * _factor(u, "contrast", 0.8 * strength) + mean, 0.0, 1.0)
  if x.shape[-1] == 3:
    gray = _luma(y)
    y = tf.clip_by_value((y - gray) * _factor(u, "saturation", 0.8 * strength) + gray, 0, 1)
    hsv = tf.image.rgb_to_hsv(y)
    delta = tf.reshape(0.2 * strength * (2.0 * _col(u, "hue") - 1.0), [-1, 1, 1])
    hue = hsv[..., 0] + delta
    hue = hue - tf.floor(hue)
    y = tf.image.hsv_to_rgb(tf.stack([hue, hsv[..., 1], hsv[..., 2]], axis=-1))
  return tf.where(_coin(u, "jitter", prob), y, x)


def _blur_radius(size: int) -> int:
  """Blur kernel 2r+1 with r = max(1, round(5% of the side)): 23 taps at 224, 3 at 28."""
  return max(1, round(0.05 * size))


def _blur_pass(y, kernel, axis: int, radius: int) -> tf.Tensor:
  """One pass of the separable Gaussian blur along `axis` (1: rows, 2: columns) of views padded
  by `radius` (mirrored edges): a per-view weighted sum of the 2r+1 shifted slices, kernel
  [M,2r+1] normalised per view. Removes the padding along `axis`.

  Not tf.nn.depthwise_conv2d with views folded into channels: its channel vectorisation made a
  view's pixels depend on the batch size.
  """
  size = y.shape[axis] - 2 * radius
  out = 0.0
  for j in range(2 * radius + 1):
    window = y[:, j:j + size] if axis == 1 else y[:, :, j:j + size]
    out += tf.reshape(kernel[:, j], [-1, 1, 1, 1]) * window
  return out


def _normalise(x, cfg) -> tf.Tensor:
  """(x - mean) / std per channel, x in [0, 1]; mean/std of length C or 1."""
  mean = tf.constant(field(cfg, "mean"), tf.float32)
  std = tf.constant(field(cfg, "std"), tf.float32)
  for name, value in (("mean", mean), ("std", std)):
    if value.shape.rank != 1 or value.shape[0] not in (1, x.shape[-1]):
      raise ValueError(f"cfg.{name} needs 1 or {x.shape[-1]} values, got {value.shape}")
  return (x - mean) / std
