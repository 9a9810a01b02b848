"""config.init_from: a run that starts from existing weights, e.g. the official MSN weights
continued with PMSN.

init_from names an official MSN checkpoint (.pth.tar, as facebookresearch/msn saves it; read
with torch.load(weights_only=True), msn_reader.py) or a pmsn_jax export directory (a run's
WORKDIR/export, or what `python -m pmsn_jax.convert from-msn` writes). Loaded into a fresh train
state:
  * from a .pth.tar: the online encoder and head from its "encoder", the EMA target encoder and
    head from its "target_encoder" (each from the other where the file lacks one), the heads'
    BatchNorm running statistics, and the prototypes;
  * from an export: its encoder into both the online and the target encoder, and its head,
    statistics and prototypes into both heads (an older export without them leaves the head and
    prototypes freshly initialised).
The optimizer state and the step stay fresh: AdamW's moments and the schedules (learning rate,
weight decay, EMA momentum) start at step 0 of this run, as a fine-tuning run's would; MSN's own
optimizer state belongs to another schedule and parameter grouping.

Only a run that starts without checkpoints is warm-started (train.py); a resumed run restores
its own state. The architecture must be the config's: a mismatch is one line naming the
override that fixes it (msn_reader.check_against_config).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import jax
import numpy as np
from flax import nnx

from pmsn_jax import checkpoint, msn_reader, paths, sharding, state_dicts, step


@dataclasses.dataclass
class Weights:
  """What a warm start loads: the online and target backbones and the prototypes."""
  source: str
  online: msn_reader.Backbone
  target: msn_reader.Backbone
  prototypes: np.ndarray | None

  def describe(self) -> str:
    loaded = ["encoders"] + (["heads"] if self.online.head is not None else []) + (
        ["prototypes"] if self.prototypes is not None else [])
    fresh = [name for name, present in (("heads", self.online.head is not None),
                                        ("prototypes", self.prototypes is not None))
             if not present]
    return (f"warm start from {self.source}: a {state_dicts.describe(self.online.vit)}; loaded "
            f"{', '.join(loaded)}" + (f"; freshly initialised: {', '.join(fresh)}" if fresh
                                      else "") + "; optimizer and schedules start at step 0")


def is_export(path) -> bool:
  return paths.path(os.fspath(path)).is_dir()


def load(config) -> Weights:
  """Reads config.init_from and checks it against the config's model (one-line ValueError)."""
  source = os.fspath(config.init_from)
  if is_export(source):
    _, cfg, params = checkpoint.read_export(source)
    head = checkpoint.read_head(source)
    backbone = msn_reader.Backbone(cfg, params, head and head["params"],
                                   head and head["batch_stats"])
    weights = Weights(source, backbone, backbone, head and head["prototypes"])
  else:
    ckpt = msn_reader.read_msn_checkpoint(source, config=config)
    online = ckpt.backbones.get("encoder", ckpt.backbones.get("target_encoder"))
    target = ckpt.backbones.get("target_encoder", online)
    weights = Weights(source, online, target, ckpt.prototypes)
  for name, backbone in (("online", weights.online), ("target", weights.target)):
    msn_reader.check_against_config(
        backbone.vit, config, head=backbone.head, prototypes=weights.prototypes,
        what=source if weights.online is weights.target else f"{source} ({name} encoder)")
  return weights


def apply(state: step.TrainState, weights: Weights) -> step.TrainState:
  """`state` with the loaded weights in place of the encoders, heads, head statistics and
  prototypes. Pure: a new state; every new leaf keeps the old one's sharding and dtype."""
  def backbone(b: msn_reader.Backbone) -> dict:
    return {"encoder": b.encoder, **({"head": b.head} if b.head is not None else {})}

  params = {"online": backbone(weights.online)}
  if weights.prototypes is not None:
    params["prototypes"] = {"vectors": weights.prototypes}
  stats = {name: {"head": b.head_stats} for name, b in (("online", weights.online),
                                                         ("target", weights.target))
           if b.head_stats is not None}
  return state.replace(params=_replaced(state.params, params),
                       target=_replaced(state.target, {"target": backbone(weights.target)}),
                       batch_stats=_replaced(state.batch_stats, stats))


def warm_start(state: step.TrainState, config,
               report: Callable[[str], None] | None = None) -> step.TrainState:
  """The fresh `state` of a run, warm-started from config.init_from (see the module doc).
  `report` (e.g. train.say) gets one line saying what was loaded."""
  weights = load(config)
  state = apply(state, weights)
  if report is not None:
    report(weights.describe())
  return state


def _replaced(tree: nnx.State, new: dict) -> nnx.State:
  """A copy of `tree` whose leaves under `new`'s keys are `new`'s host arrays, placed with the
  replaced leaf's sharding and cast to its dtype (sharding.from_host: each process places its
  own shards, so this works on every host of a multi-host run)."""
  def merge(old, update, path):
    if not isinstance(update, dict):
      value = np.asarray(update)
      if value.shape != old.shape:  # check_against_config catches sizes before this
        raise ValueError(f"warm start: {path} has shape {value.shape} in config.init_from, "
                         f"{old.shape} in the train state")
      return sharding.from_host(value.astype(old.dtype), old.sharding)
    missing = set(update) - set(old)
    if missing:
      raise ValueError(f"warm start: {path}/{sorted(missing)[0]} is not in the train state")
    return {k: merge(old[k], update[k], f"{path}/{k}") if k in update else old[k] for k in old}

  out = jax.tree.map(lambda x: x, tree)  # a new State over the same arrays
  nnx.replace_by_pure_dict(out, merge(tree.to_pure_dict(), new, ""))
  return out
