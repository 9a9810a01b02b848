"""Frozen features of an evaluation split, computed on the mesh and left there.

Each process streams its own block of the split (eval_stream.eval_batches: decode, crop, resize,
normalise; nothing cached), the global batch is encoded on the mesh, and every device keeps
the feature rows it computed. The result is a row-sharded global array: at iNaturalist 2018
scale (437,513 x 384 float32, 0.67 GB) each of N devices holds 1/N of it, and no host ever
holds all of it. k-NN, the linear probe and low-shot read it where it lies (knn.py, linear.py,
lowshot.py).

Layout. Device d's rows are its rows of batch 0, then of batch 1, ...: the per-batch shards are
concatenated on the device they are on, so building the array moves nothing between devices.
The row order is therefore a layout, not the split's order; each row carries its `key`, the
row of the split it is (-1 for padding and for images that could not be decoded). Along each
device's rows the real keys increase (a process streams its block in order), which the sharded
k-NN's tie rule relies on.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from pmsn_jax import sharding
from pmsn_jax.data import eval_stream


@dataclasses.dataclass(frozen=True)
class SplitFeatures:
  """One encoder's features of one split; see the module docstring for the layout."""
  values: jax.Array        # [R, D] float32, rows over the mesh's batch axes
  labels: jax.Array        # [R] int32, same layout (0 on padding rows)
  keys: jax.Array          # [R] int32: row of the split, -1 = not a real row
  host_labels: np.ndarray  # labels and keys again, on every process (4 bytes a row each)
  host_keys: np.ndarray
  mesh: Mesh

  @classmethod
  def from_host(cls, values: np.ndarray, labels: np.ndarray, mesh: Mesh) -> "SplitFeatures":
    """Features computed elsewhere ([N, D] and [N], the same on every process), laid out as
    extract() lays them out; row i's key is i."""
    keys = sharding.rows_from_host(np.arange(len(labels), dtype=np.int32), mesh, fill=-1)
    labels = sharding.rows_from_host(np.asarray(labels, np.int32), mesh)
    return cls(sharding.rows_from_host(np.asarray(values, np.float32), mesh), labels, keys,
               np.asarray(jax.device_get(labels)), np.asarray(jax.device_get(keys)), mesh)

  @functools.cached_property
  def order(self) -> np.ndarray:
    """Positions of the real rows, in the split's row order."""
    real = np.flatnonzero(self.host_keys >= 0)
    return real[np.argsort(self.host_keys[real], kind="stable")]

  def take(self, positions) -> np.ndarray:
    """values[positions] as a NumPy array on every process, [n, D] float32. Each device
    contributes the requested rows it holds (an all-reduce of n x D), so only those rows
    move, never the whole array."""
    positions = sharding.from_host(np.asarray(positions, np.int32),
                                   sharding.replicated(self.mesh))
    return np.asarray(_take_fn(self.mesh)(self.values, positions).addressable_data(0))

  def to_host(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values [n, D], labels [n], keys [n]) of the real rows in row order, on every process:
    for the test split, whose features every device uses whole."""
    values = multihost_utils.process_allgather(self.values, tiled=True)
    return (np.asarray(values[self.order], np.float32), self.host_labels[self.order],
            self.host_keys[self.order])

  def keys_where(self, keep: np.ndarray) -> jax.Array:
    """`keys` with -1 where `keep` ([R] bool, layout order) is false: a sub-bank for the k-NN
    (e.g. the long-tailed pretraining rows) without copying any feature."""
    return sharding.rows_from_host(np.where(keep, self.host_keys, -1).astype(np.int32),
                                   self.mesh)


def extract(encoders: dict[str, Callable], data, config, mesh: Mesh, *,
            max_examples: int = 0) -> dict[str, SplitFeatures]:
  """Features of the first `max_examples` rows (0 = all) of `data` for each encoder, from one
  pass over the images.

  encoders: name -> jitted fn, eval_preprocess'ed images [b,S,S,C] -> [b,D].
  config: its data (view settings) and eval.batch_size, the global batch, a multiple of the
  processes and of the mesh's batch shards (each process streams batch_size / processes rows).
  """
  batch_size, processes = int(config.eval.batch_size), jax.process_count()
  sharding.check_batch_size(batch_size, mesh, key="eval.batch_size")
  rows_sharding = sharding.batch_sharding(mesh)
  outputs = collections.defaultdict(list)
  for batch in eval_stream.eval_batches(data, config.data, local_batch=batch_size // processes,
                                     max_examples=max_examples,
                                     process_index=jax.process_index(),
                                     process_count=processes):
    batch = sharding.to_global(batch, mesh)
    for name, encode in encoders.items():
      # device_put: a no-op unless the encoder laid its output out otherwise.
      outputs[name].append(jax.device_put(encode(batch["image"]), rows_sharding))
    outputs["label"].append(batch["label"])
    outputs["key"].append(batch["row"])
  labels, keys = (_stack(outputs.pop(k), rows_sharding) for k in ("label", "key"))
  host_labels, host_keys = (np.asarray(multihost_utils.process_allgather(x, tiled=True))
                            for x in (labels, keys))
  return {name: SplitFeatures(_stack(batches, rows_sharding).astype(jnp.float32), labels, keys,
                              host_labels, host_keys, mesh)
          for name, batches in outputs.items()}


def linear_eval_epoch(encode: Callable, data, config, mesh: Mesh, *, epoch: int,
                      max_examples: int = 0):
  """One epoch of MSN's linear evaluation (eval_stream.linear_eval_batches): per global batch of
  config.eval.linear_batch_size fresh random crops, (features [G, D], labels [G], weights [G])
  on the mesh, batch-sharded; weight 0 marks padding. Each process streams its own block."""
  batch_size, processes = int(config.eval.linear_batch_size), jax.process_count()
  sharding.check_batch_size(batch_size, mesh, key="eval.linear_batch_size")
  normalise = _normaliser(tuple(config.data.mean), tuple(config.data.std))
  for batch in eval_stream.linear_eval_batches(
      data, config.data, local_batch=batch_size // processes, seed=config.seed, epoch=epoch,
      max_examples=max_examples, process_index=jax.process_index(), process_count=processes):
    batch = sharding.to_global(batch, mesh)
    yield (encode(normalise(batch["image"])), batch["label"],
           jnp.where(batch["row"] >= 0, 1.0, 0.0))


@functools.lru_cache(maxsize=4)
def _normaliser(mean, std):
  """uint8 images -> the normalised floats encoders take (augment._normalise, on device)."""
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
  return jax.jit(lambda x: (x.astype(jnp.float32) / 255.0 - mean) / std)


def _stack(batches: list[jax.Array], rows_sharding) -> jax.Array:
  """[T*G, ...] global array whose rows on each device are that device's rows of batch 0,
  1, ..., T-1: concatenated where they lie, nothing crosses devices."""
  per_device = collections.defaultdict(list)
  for batch in batches:
    for shard in batch.addressable_shards:
      per_device[shard.device].append(shard.data)
  shape = (len(batches) * batches[0].shape[0], *batches[0].shape[1:])
  arrays = [jnp.concatenate(parts) for parts in per_device.values()]
  del batches[:]  # The per-batch arrays go as soon as their rows are concatenated.
  return jax.make_array_from_single_device_arrays(shape, rows_sharding, arrays)


@functools.lru_cache(maxsize=8)
def _take_fn(mesh: Mesh):
  axes = sharding.batch_axes(mesh)

  def local(values, positions):
    rows = values.shape[0]
    local_positions = positions - (jax.lax.axis_index(axes) * rows if axes else 0)
    mine = (local_positions >= 0) & (local_positions < rows)
    picked = values[jnp.clip(local_positions, 0, rows - 1)]
    # Exactly one device holds each row; the others add zeros, so the sum is the row itself.
    picked = jnp.where(mine[:, None], picked, 0)
    return jax.lax.psum(picked, axes) if axes else picked

  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(axes or None), P()), out_specs=P(),
                               check_vma=False))
