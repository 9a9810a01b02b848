"""pmsn_jax: PMSN / MSN self-supervised pretraining of Vision Transformers in JAX + Flax NNX."""

from pmsn_jax import host_setup

__version__ = "0.1.0"

# Before JAX opens its CPU backend (pmsn_jax/host_setup.py; a user's own value is kept).
host_setup.use_eigen_dots()


def load_encoder(path: str, features: str = "cls"):
  """Loads an exported target encoder; see pmsn_jax.checkpoint.load_encoder."""
  from pmsn_jax.checkpoint import load_encoder as _load  # keep `import pmsn_jax` light
  return _load(path, features)
