"""What the host ships with each view for the step's photometric ops: one source of truth for
augment.py (TensorFlow, which draws the numbers) and pmsn_jax/photometric.py (JAX, which uses
them), so neither imports the other's framework."""

# The columns of a view's photometric random numbers, in the order they are shipped.
COLUMNS = ("jitter", "brightness", "contrast", "saturation", "hue", "gray", "blur", "sigma")

# Defaults of the photometric config fields (MSN's, as SimCLR's).
PHOTOMETRIC_DEFAULTS = dict(color_jitter_prob=0.8, color_jitter_strength=0.5,
                            grayscale_prob=0.2, blur_prob=0.5, blur_sigma=(0.1, 2.0))
# Every view default, the one place they are written: configs/common.py copies them into
# config.data, and augment.py / photometric.py fall back to them for fields a config lacks.
VIEW_DEFAULTS = dict(target_scale=(0.3, 1.0), focal_scale=(0.05, 0.3), flip=True,
                     eval_crop_fraction=0.875, **PHOTOMETRIC_DEFAULTS)


def blur_radius(size: int) -> int:
  """Blur kernel 2r+1 with r = max(1, round(5% of the side)): 23 taps at 224, 3 at 28."""
  return max(1, round(0.05 * size))
