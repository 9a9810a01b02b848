"""The step's photometric ops (pmsn_jax/photometric.py) against the TensorFlow host
implementation they replaced (tests/photometric_reference_tf.py), and what the move to uint8
views changes."""
import sys

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from configs import common
from pmsn_jax import photometric, step
from pmsn_jax.data import augment, view_format

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import photometric_reference_tf as reference  # noqa: E402

# float32 rounding between two implementations of the same ops, in normalised units; the
# largest seen is 3.5e-6 (the hue round trip), on an Intel Xeon, 2026-12-07.
IMPLEMENTATION_TOLERANCE = 2e-5
# What rounding the crops to uint8 changes, in normalised units: half a grey level (0.0087 after
# dividing by std 0.225), times the jitter's factors (up to 1.4 each for brightness, contrast and
# saturation) and the hue turn's mixing of channels. Seen: max 0.027, mean 0.0028.
QUANTISATION_MAX, QUANTISATION_MEAN = 0.05, 0.004


def view_cfg(channels=3, **overrides):
  cfg = ml_collections.ConfigDict(dict(
      image_size=32, focal_size=16, num_focal=3, channels=channels,
      mean=(0.485, 0.456, 0.406)[:channels], std=(0.229, 0.224, 0.225)[:channels]))
  cfg.update(overrides)
  return cfg


def smooth_images(n, height, width, channels, seed=0):
  """Photo-like uint8 images: upsampled noise, so that blur and hue have edges to act on."""
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, 256, [n, height // 4, width // 4, channels]).astype(np.float32)
  return tf.cast(tf.round(tf.image.resize(coarse, [height, width])), tf.uint8).numpy()


def host_views(images, cfg, seed=0):
  seeds = np.stack([np.full(len(images), seed, np.int64), np.arange(len(images))], 1)
  return {k: v.numpy() for k, v in augment.make_views_batch(images, seeds, cfg).items()}


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("overrides", [{}, dict(color_jitter_prob=1.0, blur_prob=1.0,
                                                grayscale_prob=0.0, color_jitter_strength=1.0)])
def test_device_ops_match_the_tensorflow_host_ops(channels, overrides):
  cfg = view_cfg(channels, **overrides)
  views = host_views(smooth_images(6, 48, 40, channels), cfg)
  out = jax.jit(lambda b: photometric.batch_views(b, cfg))(
      {k: views[k] for k in ("target", "anchor", "focal", "photometric")})
  u = views["photometric"]
  rows = {"target": (views["target"], u[:, 0]), "anchor": (views["anchor"], u[:, 1]),
          "focal": (views["focal"].reshape(-1, 16, 16, channels), u[:, 2:].reshape(18, -1))}
  for key, (x, u_rows) in rows.items():
    expected = reference.views(x.astype(np.float32) / 255.0, u_rows, cfg).numpy()
    got = np.asarray(out[key]).reshape(expected.shape)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=IMPLEMENTATION_TOLERANCE,
                               err_msg=key)
  if overrides:  # every op fired: the views are not the plain normalised crops
    plain = (views["target"] / 255.0 - np.asarray(cfg.mean)) / np.asarray(cfg.std)
    assert np.abs(np.asarray(out["target"]) - plain).max() > 0.1


def test_the_same_seeds_make_the_same_decisions_as_the_float_host_path():
  """Host flip + uint8 + device ops vs the old all-float host path, from one seed: the crops
  and every coin are the same; the pixels differ by the uint8 rounding of the crop (half a grey
  level), amplified at most by the jitter's factors and divided by std."""
  cfg = view_cfg(3)
  images = smooth_images(8, 64, 56, 3, seed=1)
  views = host_views(images, cfg, seed=5)
  u_pair, _ = tf.map_fn(lambda s: augment._draw(s, cfg.num_focal),  # noqa: SLF001
                        tf.constant([[5, i] for i in range(8)], tf.int64),
                        fn_output_signature=(tf.TensorSpec([2, augment._K]),
                                             tf.TensorSpec([3, augment._K])))
  np.testing.assert_array_equal(views["photometric"][:, :2],
                                u_pair.numpy()[..., augment._PHOTOMETRIC])
  groups = augment._view_groups(u_pair, tf.zeros([8, 0, augment._K]), cfg)  # noqa: SLF001
  (u, ratio, side, scale), = groups
  windows = augment._crop_windows(u, ratio, 64, 56, scale)  # noqa: SLF001
  boxes = augment._boxes_in(windows, (0, 0), (64, 56), 64, 56, side)  # noqa: SLF001
  crops = augment._crop_group_float(tf.constant(images), boxes, u, side, cfg).numpy()  # noqa: SLF001
  np.testing.assert_array_equal(np.round(crops[:, 0]).astype(np.uint8), views["target"])
  old = reference.views(crops[:, 0] / 255.0, views["photometric"][:, 0], cfg).numpy()
  new = np.asarray(photometric.apply(views["target"], views["photometric"][:, 0], cfg))
  difference = np.abs(new - old)
  print(f"uint8 rounding: max {difference.max():.4f}, mean {difference.mean():.5f}")
  assert difference.max() <= QUANTISATION_MAX and difference.mean() <= QUANTISATION_MEAN


def test_bytes_per_image_to_the_device_for_the_official_views():
  config = common.get_base_config()
  config.batch_size = 8
  per_image = sum(np.dtype(s.dtype).itemsize * np.prod(s.shape[1:])
                  for k, s in step.abstract_batch(config).items() if k in step.BATCH_KEYS)
  # 2 x 224^2 x 3 + 10 x 96^2 x 3 uint8, 12 x 8 float32 random numbers, one int32 label.
  assert per_image == 2 * 224 * 224 * 3 + 10 * 96 * 96 * 3 + 12 * 8 * 4 + 4 == 577_924
  assert len(view_format.COLUMNS) == 8
