"""The train step and the evaluation forward as jitted programs over a mesh.

One builder for everything that compiles them: train.py runs what it builds on the devices it
has, evaluate.py restores into its shardings, and aot.py compiles the same programs for a TPU
topology this machine does not have. The model is traced under the mesh (`jax.set_mesh`'s
abstract twin), so the activation constraints of `sharding.constrain_batch` apply.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from pmsn_jax import checkpoint, photometric, sharding, step
from pmsn_jax.models import vit


@dataclasses.dataclass(frozen=True)
class Program:
  """A config's model, optimizer and shardings on a mesh; nothing allocated."""
  config: object
  mesh: Mesh
  vit_cfg: vit.ViTConfig
  graphdef: nnx.GraphDef
  tx: object
  schedules: object
  create_state: Callable[[], step.TrainState]
  abstract_state: step.TrainState      # ShapeDtypeStructs carrying the state shardings

  @property
  def state_shardings(self) -> step.TrainState:
    return jax.tree.map(lambda x: x.sharding, self.abstract_state)

  @property
  def replicated(self) -> NamedSharding:
    return sharding.replicated(self.mesh)

  @property
  def batch_sharding(self) -> NamedSharding:
    return sharding.batch_sharding(self.mesh)

  def init_state(self) -> step.TrainState:
    """A fresh train state, born sharded."""
    return jax.jit(self.create_state, out_shardings=self.state_shardings)()

  def lower_train_step(self) -> jax.stages.Lowered:
    """The train step, lowered for the abstract state and batch (`.compile()` it). The state
    argument is donated; outputs are (state, metrics, aux), metrics and aux replicated."""
    inputs = step.abstract_batch(self.config, self.batch_sharding, self.replicated)
    train_step = jax.jit(
        step.make_train_step(self.graphdef, self.tx, self.schedules, self.config),
        in_shardings=(self.state_shardings, {k: v.sharding for k, v in inputs.items()}),
        out_shardings=(self.state_shardings, self.replicated, self.replicated),
        donate_argnums=0)
    with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):
      return train_step.lower(self.abstract_state, inputs)

  def lower_device_views(self) -> jax.stages.Lowered:
    """The train step's first part alone: the photometric ops that turn the batch's uint8
    views into normalised float32 ones (photometric.batch_views), for its share of the step."""
    inputs = step.abstract_batch(self.config, self.batch_sharding)
    inputs = {k: inputs[k] for k in ("target", "anchor", "focal", "photometric")}
    views = jax.jit(lambda batch: photometric.batch_views(batch, self.config.data),
                    out_shardings=self.batch_sharding)
    with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):
      return views.lower(inputs)

  def lower_eval_forward(self) -> jax.stages.Lowered:
    """The target encoder on one evaluation batch (config.eval.batch_size centre crops,
    batch-sharded), with the encoder parameters sharded as in the train state."""
    encode = target_encoder(self.graphdef, self.abstract_state, self.config.eval.features)
    d = self.config.data
    images = jax.ShapeDtypeStruct(
        (self.config.eval.batch_size, d.image_size, d.image_size, d.channels), np.float32,
        sharding=self.batch_sharding)
    with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):
      return encode.func.lower(*encode.args, images)


def build(config, mesh: Mesh, platform: str | None = None) -> Program:
  """The program of `config` on `mesh`, for `platform` (default: where JAX runs; aot.py says
  "tpu", which also picks the TPU's choices such as scanned blocks and bfloat16)."""
  vit_cfg = vit.vit_config_from(config, platform)
  graphdef, tx, schedules, create_state = step.build(config, vit_cfg)
  abstract_state = jax.eval_shape(create_state)
  shardings = sharding.state_shardings(abstract_state, mesh, config.partition_rules,
                                       config.fsdp_min_size)
  return Program(config, mesh, vit_cfg, graphdef, tx, schedules, create_state,
                 checkpoint.abstract_with_shardings(abstract_state, shardings))


def target_encoder(graphdef, state: step.TrainState, features: str = "cls"):
  """images -> features (vit.FEATURE_READOUTS) of the EMA target encoder in `state`.

  A partial over a jitted function: the encoder parameters (`.args[0]`) are an argument, not
  constants baked into the compiled program. `state` may be abstract (ShapeDtypeStructs).
  """
  model = nnx.merge(graphdef, state.params, state.target, state.batch_stats)
  encoder_graph, encoder_state = nnx.split(model.target.encoder)
  encode = jax.jit(
      lambda params, images: nnx.merge(encoder_graph, params)(images, features=features))
  return functools.partial(encode, encoder_state)
