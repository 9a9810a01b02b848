"""The photometric ops as the host ran them in TensorFlow before they moved into the step
(pmsn_jax/photometric.py): the independent reference of tests/test_photometric.py.

Kept as it was (tf.image.rgb_to_hsv / hsv_to_rgb for the hue, a tap loop for the blur), fed
the same per-view random numbers.
"""
from __future__ import annotations

import tensorflow as tf

from pmsn_jax.data import view_format

_GRAY = (0.299, 0.587, 0.114)


def views(x, u, cfg) -> tf.Tensor:
  """float32 views [M,H,W,C] in [0, 1] + random numbers [M,P] -> normalised views."""
  x = tf.convert_to_tensor(x, tf.float32)
  u = tf.convert_to_tensor(u, tf.float32)
  def get(name):
    value = getattr(cfg, name, None)
    return view_format.PHOTOMETRIC_DEFAULTS[name] if value is None else value

  x = _color_jitter(x, u, get("color_jitter_prob"), get("color_jitter_strength"))
  if x.shape[-1] == 3:
    x = tf.where(_coin(u, "gray", get("grayscale_prob")), tf.tile(_luma(x), [1, 1, 1, 3]), x)
  blur_prob = get("blur_prob")
  if blur_prob > 0:
    radius = view_format.blur_radius(x.shape[1])
    lo, hi = get("blur_sigma")
    sigma = lo + (hi - lo) * _col(u, "sigma")[:, None]
    taps = tf.range(-radius, radius + 1, dtype=tf.float32)
    kernel = tf.exp(-tf.square(taps) / (2.0 * tf.square(sigma)))
    kernel /= tf.reduce_sum(kernel, axis=1, keepdims=True)
    padded = tf.pad(x, [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="SYMMETRIC")
    blurred = _blur_pass(_blur_pass(padded, kernel, 1, radius), kernel, 2, radius)
    x = tf.where(_coin(u, "blur", blur_prob), blurred, x)
  return (x - tf.constant(cfg.mean, tf.float32)) / tf.constant(cfg.std, tf.float32)


def _col(u, name):
  return u[:, view_format.COLUMNS.index(name)]


def _coin(u, name, prob):
  return tf.reshape(_col(u, name) < prob, [-1, 1, 1, 1])


def _luma(x):
  if x.shape[-1] == 1:
    return x
  return tf.reduce_sum(x * tf.constant(_GRAY, x.dtype), axis=-1, keepdims=True)


def _factor(u, name, spread):
  lo = max(0.0, 1.0 - spread)
  return tf.reshape(lo + (1.0 + spread - lo) * _col(u, name), [-1, 1, 1, 1])


def _color_jitter(x, u, prob, strength):
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


def _blur_pass(y, kernel, axis, radius):
  size = y.shape[axis] - 2 * radius
  out = 0.0
  for j in range(2 * radius + 1):
    window = y[:, j:j + size] if axis == 1 else y[:, :, j:j + size]
    out += tf.reshape(kernel[:, j], [-1, 1, 1, 1]) * window
  return out
