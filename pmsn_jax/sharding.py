"""Device mesh from config, array shardings, and host-local batch -> global array.

The foundation shards the batch over the "data" axis and replicates parameters; the mesh
already has every axis the config names so FSDP/tensor rules can slot in without touching the
train loop.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(mesh_config, devices=None) -> Mesh:
  """(("data", -1), ("fsdp", 1)) -> Mesh; one -1 takes the devices left over."""
  devices = jax.devices() if devices is None else devices
  names = tuple(str(name) for name, _ in mesh_config)
  sizes = [int(size) for _, size in mesh_config]
  if not names or names[0] != DATA_AXIS:
    raise ValueError(f"config.mesh={tuple(mesh_config)} must start with the {DATA_AXIS!r} axis, "
                     "e.g. (('data', -1),).")
  if len(set(names)) != len(names):
    raise ValueError(f"config.mesh={tuple(mesh_config)} repeats an axis name.")
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh={tuple(mesh_config)}: sizes must be positive, with at most "
                     "one -1.")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"config.mesh={tuple(mesh_config)} cannot fill {len(devices)} devices "
                       f"(not divisible by {known}).")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"config.mesh={tuple(mesh_config)} has {math.prod(sizes)} devices but "
                     f"{len(devices)} are present; use -1 for one axis to fill it.")
  return Mesh(np.asarray(devices).reshape(sizes), names)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the data axis, the rest replicated."""
  return NamedSharding(mesh, P(DATA_AXIS))


def state_shardings(abstract_state, mesh: Mesh):
  """Per-leaf shardings of the train state. Parameters are replicated for now."""
  return jax.tree.map(lambda _: replicated(mesh), abstract_state)


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
  data = mesh.shape[DATA_AXIS]
  if global_batch % data or global_batch % jax.process_count():
    raise ValueError(f"batch_size={global_batch} must be divisible by the data axis ({data}) and "
                     f"the process count ({jax.process_count()}); pick a multiple of "
                     f"{math.lcm(data, jax.process_count())}.")


def to_global(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's slice of the batch into one global, batch-sharded array."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
