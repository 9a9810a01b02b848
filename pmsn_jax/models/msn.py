"""The MSN/PMSN network: online encoder + head, EMA target encoder + head, prototypes.

The target `Backbone` is a structural twin of the online one; the train step keeps its
parameters out of the optimizer and moves them by EMA. Keeping both in one module means one
graphdef, one checkpoint tree and one sharding rule set.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pmsn_jax.models import heads
from pmsn_jax.models import vit

# nnx filters that split the model state into what the optimizer sees, what the EMA moves,
# and the BatchNorm statistics.
TARGET = nnx.PathContains("target")
TRAINABLE = nnx.All(nnx.Param, nnx.Not(TARGET))
TARGET_PARAMS = nnx.All(nnx.Param, TARGET)


class Backbone(nnx.Module):
  """ViT encoder + projection head. Returns (CLS representation, projection)."""

  def __init__(self, vit_cfg: vit.ViTConfig, hidden_dim: int, out_dim: int, *, rngs: nnx.Rngs):
    self.encoder = vit.ViT(vit_cfg, rngs=rngs)
    self.head = heads.ProjectionHead(vit_cfg.width, hidden_dim, out_dim,
                                     dtype=jnp.dtype(vit_cfg.dtype), rngs=rngs)

  def __call__(self, images, *, mask_ratio=0.0, rng=None):
    rep = self.encoder(images, mask_ratio=mask_ratio, rng=rng)
    return rep, self.head(rep)


class MSN(nnx.Module):
  """Online backbone, target backbone (initialised as an exact copy) and prototypes."""

  def __init__(self, vit_cfg: vit.ViTConfig, *, hidden_dim: int, out_dim: int,
               num_prototypes: int, rngs: nnx.Rngs):
    self.online = Backbone(vit_cfg, hidden_dim, out_dim, rngs=rngs)
    self.target = jax.tree.map(jnp.copy, nnx.clone(self.online))
    self.prototypes = heads.Prototypes(num_prototypes, out_dim, rngs=rngs)

  def anchor_projections(self, anchor, focal, *, mask_ratio: float, rng) -> jax.Array:
    """[B,S,S,C] masked anchor + [B,F,s,s,C] focal crops -> projections [B, 1+F, d].

    Both groups go through the encoder in one call (shared per-token layers); the head runs
    per group so that BatchNorm sees each resolution's own statistics, as MSN's.
    """
    b, f = focal.shape[:2]
    groups = [(anchor, mask_ratio)]
    if f:
      groups.append((focal.reshape(b * f, *focal.shape[2:]), 0.0))
    reps = self.online.encoder.encode_groups(groups, rng=rng)
    views = [self.online.head(reps[0])[:, None]]
    if f:
      views.append(self.online.head(reps[1]).reshape(b, f, -1))
    return jnp.concatenate(views, axis=1)

  def target_projections(self, target) -> jax.Array:
    _, z = self.target(target)
    return jax.lax.stop_gradient(z)


def build_model(model_cfg, vit_cfg: vit.ViTConfig, seed: int) -> MSN:
  return MSN(vit_cfg, hidden_dim=model_cfg.hidden_dim, out_dim=model_cfg.output_dim,
             num_prototypes=model_cfg.num_prototypes, rngs=nnx.Rngs(seed))
