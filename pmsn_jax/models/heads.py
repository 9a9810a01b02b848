"""MSN's projection head and the learnable prototypes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pmsn_jax.models.vit import gelu


class ProjectionHead(nnx.Module):
  """Linear-BN-GELU-Linear-BN-GELU-Linear, as in official MSN.

  BatchNorm always normalises with the statistics of the batch it is given (the target encoder
  too), and each resolution group (224 anchor, 96 focal, target) is a separate call, so each
  gets its own statistics. Running averages are kept by nnx.BatchNorm but never used: only the
  encoder's CLS features are evaluated and exported.
  """

  def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, *, dtype=jnp.float32,
               rngs: nnx.Rngs):
    # Matmuls in `dtype`; BatchNorm (float32 parameters) normalises and returns float32.
    self.fc1 = nnx.Linear(in_dim, hidden_dim, dtype=dtype, rngs=rngs)
    self.bn1 = nnx.BatchNorm(hidden_dim, use_running_average=False, rngs=rngs)
    self.fc2 = nnx.Linear(hidden_dim, hidden_dim, dtype=dtype, rngs=rngs)
    self.bn2 = nnx.BatchNorm(hidden_dim, use_running_average=False, rngs=rngs)
    self.fc3 = nnx.Linear(hidden_dim, out_dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = gelu(self.bn1(self.fc1(x)))
    x = gelu(self.bn2(self.fc2(x)))
    return self.fc3(x)


class Prototypes(nnx.Module):
  """K learnable prototype vectors [K, d], init U(-1/sqrt(d), 1/sqrt(d)) as in MSN.

  Not weight-decayed and not part of the EMA target (the optimizer mask and the EMA both key on
  this module's name).
  """

  def __init__(self, num_prototypes: int, dim: int, *, rngs: nnx.Rngs):
    bound = 1.0 / jnp.sqrt(dim)
    self.vectors = nnx.Param(
        jax.random.uniform(rngs.params(), (num_prototypes, dim), minval=-bound, maxval=bound))

  def __call__(self) -> jax.Array:
    return self.vectors[...]
