"""pmsn_jax: PMSN / MSN self-supervised pretraining of Vision Transformers in JAX + Flax NNX."""

__version__ = "0.1.0"


def load_encoder(path: str, features: str = "cls"):
  """Loads an exported target encoder; see pmsn_jax.checkpoint.load_encoder."""
  from pmsn_jax.checkpoint import load_encoder as _load  # keep `import pmsn_jax` light
  return _load(path, features)
