"""pmsn_jax: PMSN / MSN self-supervised pretraining of Vision Transformers in JAX + Flax NNX."""

import os

__version__ = "0.1.0"

# XLA:CPU in the pinned jaxlib hands every matmul to YNNPACK; on the AVX2 CPUs measured here its
# f32 GEMM ran the ViT's [4296, 192] x [192, 768] at 52-69 GFLOP/s per core against Eigen's 71-86
# (PyTorch's 73-80), and the Ti/16 step ran faster with Eigen's dots (docs/performance.md). XLA
# reads the flag once, when JAX opens its CPU backend, so it is appended to XLA_FLAGS at import;
# a value the user set for it is kept. GPU and TPU compilations do not read it.
YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
if YNN_FUSION_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {YNN_FUSION_FLAG}=".strip()


def load_encoder(path: str, features: str = "cls"):
  """Loads an exported target encoder; see pmsn_jax.checkpoint.load_encoder."""
  from pmsn_jax.checkpoint import load_encoder as _load  # keep `import pmsn_jax` light
  return _load(path, features)
