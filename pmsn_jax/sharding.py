"""Device mesh from config, partition rules for the train state, host batch -> global array.

Mesh axes (config.mesh, e.g. (("data", -1), ("fsdp", 1), ("tensor", 1))):
  * data: pure data parallelism; the batch is split, parameters are replicated;
  * fsdp: the batch is split too, and large parameters (with their Adam moments and EMA twins)
    are sharded along one dimension (ZeRO-3 / FSDP): XLA all-gathers them where used;
  * tensor: Megatron-style tensor parallelism of the ViT blocks: attention split by heads (qkv's
    heads axis, proj's input rows), the MLP by hidden units (fc1 columns, fc2 rows); the batch
    is replicated over it.
An axis of size 1, or one the mesh lacks, is simply ignored by every rule, so one rule set
serves all three layouts.

Partition rules (config.partition_rules): (regex, spec) pairs, first match wins, searched in
the leaf's path ("params/online/encoder/blocks/qkv/kernel/value"; optimizer moments and the EMA
target carry the same suffix, so they follow their parameter). A spec is a tuple with one entry
per dimension (a mesh axis name, a tuple of names, or None), or the string "fsdp": shard the
largest dimension divisible by the fsdp axis size, if the leaf has at least
`fsdp_min_size` elements (never dim 0 of stacked blocks: that is the scan axis), else replicate.
"""

from __future__ import annotations

import math
import re

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
TENSOR_AXIS = "tensor"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # the batch is split over both; replicated over tensor

# Megatron-style ViT blocks + FSDP for everything else big. Stacked block kernels are
# [layers, in, out] (qkv: [layers, in, 3, heads, head_dim]): column-parallel layers split their
# output (qkv: its heads) over tensor, row-parallel ones their input (proj's input rows are
# (head, channel) in order, so a split of them is a split by heads too).
DEFAULT_RULES = (
    (r"blocks/qkv/kernel", (None, FSDP_AXIS, None, TENSOR_AXIS)),
    (r"blocks/qkv/bias", (None, None, TENSOR_AXIS)),
    (r"blocks/fc1/kernel", (None, FSDP_AXIS, TENSOR_AXIS)),
    (r"blocks/(proj|fc2)/kernel", (None, TENSOR_AXIS, FSDP_AXIS)),
    (r"blocks/fc1/bias", (None, TENSOR_AXIS)),
    (r".*", "fsdp"),
)


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
  return Mesh(device_grid(sizes, devices), names)


def device_grid(sizes: list[int], devices) -> np.ndarray:
  """Devices arranged as the mesh `sizes`, following the physical interconnect.

  On TPU, mesh_utils maps mesh axes onto the torus so that each axis's collectives run over
  neighbouring chips; with several slices (multi-slice, joined by the data-center network)
  the slices split the first (data) axis, so only the data-parallel gradient reduction
  crosses the slower network. Elsewhere the devices are taken in order.
  """
  slices = sorted({getattr(d, "slice_index", 0) for d in devices})
  if len(slices) > 1:
    if sizes[0] % len(slices):
      raise ValueError(f"the {DATA_AXIS!r} axis ({sizes[0]}) must be a multiple of the "
                       f"{len(slices)} slices: each slice takes an equal share of it")
    per_slice = [sizes[0] // len(slices), *sizes[1:]]
    dcn = [len(slices)] + [1] * (len(sizes) - 1)
    return mesh_utils.create_hybrid_device_mesh(per_slice, dcn, devices,
                                                allow_split_physical_axes=True)
  if getattr(devices[0], "platform", "") == "tpu":
    return mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
  return np.asarray(devices).reshape(sizes)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the data and fsdp axes, the rest replicated."""
  return NamedSharding(mesh, P(_present(mesh, BATCH_AXES)))


def constrain_batch(x: jax.Array) -> jax.Array:
  """Pins an activation's leading (batch) dimension to the batch axes of the mesh the step is
  traced under (`jax.set_mesh`), its other dimensions replicated. Without it XLA may pick
  other layouts for the reshapes between token groups and move activations between chips.
  Outside a mesh context (eager calls, single-device evaluation) `x` is returned as it is."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, P(_present(mesh, BATCH_AXES)))


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """The mesh axes batch_sharding splits rows over (those of size > 1), as a tuple: () when
  the rows are replicated. What shard_map code names in axis_index / psum / all_gather."""
  axes = _present(mesh, BATCH_AXES)
  return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def batch_shards(mesh: Mesh) -> int:
  return math.prod(mesh.shape.get(axis, 1) for axis in BATCH_AXES)


def path_string(path) -> str:
  """A pytree key path as "a/b/0/c"."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def spec_for(path: str, shape: tuple[int, ...], mesh: Mesh, rules=DEFAULT_RULES,
             fsdp_min_size: int = 2 ** 14) -> P:
  """The PartitionSpec of one leaf: the first rule whose regex is found in `path`."""
  for pattern, spec in rules:
    if re.search(pattern, path):
      break
  else:
    return P()
  if spec == "fsdp":
    return _auto_fsdp(path, shape, mesh, fsdp_min_size)
  spec = tuple(spec)
  if len(spec) > len(shape):
    raise ValueError(f"partition rule {pattern!r} gives {len(spec)} dims to {path} of shape "
                     f"{shape}; fix config.partition_rules")
  dims = []
  for size, axes in zip(shape, spec + (None,) * (len(shape) - len(spec))):
    axes = _present(mesh, (axes,) if isinstance(axes, str) else axes or ())
    names = (axes,) if isinstance(axes, str) else axes or ()
    shards = math.prod(mesh.shape[a] for a in names)
    if size % shards:
      raise ValueError(f"{path} dim of size {size} cannot be split over {axes} ({shards} "
                       f"devices); change config.mesh or config.partition_rules")
    dims.append(axes)
  return P(*dims)


def _auto_fsdp(path: str, shape, mesh: Mesh, min_size: int) -> P:
  n = mesh.shape.get(FSDP_AXIS, 1)
  if n == 1 or math.prod(shape) < min_size:
    return P()
  first = 1 if "blocks/" in path else 0  # dim 0 of stacked blocks is the scan axis
  candidates = [d for d in range(first, len(shape)) if shape[d] % n == 0]
  if not candidates:
    return P()
  best = max(candidates, key=lambda d: shape[d])
  return P(*[FSDP_AXIS if d == best else None for d in range(len(shape))])


def _present(mesh: Mesh, axes):
  """The axes of `axes` the mesh has with size > 1: None, one name, or a tuple of names."""
  kept = tuple(a for a in axes if a is not None and mesh.shape.get(a, 1) > 1)
  if not kept:
    return None
  return kept[0] if len(kept) == 1 else kept


def state_shardings(abstract_state, mesh: Mesh, rules=DEFAULT_RULES,
                    fsdp_min_size: int = 2 ** 14):
  """Per-leaf NamedShardings of a (train) state pytree, from the partition rules."""
  def leaf(path, x):
    shape = tuple(getattr(x, "shape", ()))
    return NamedSharding(mesh, spec_for(path_string(path), shape, mesh, rules, fsdp_min_size))
  return jax.tree_util.tree_map_with_path(leaf, abstract_state)


def step_input_shardings(batch, mesh: Mesh) -> dict:
  """Shardings of a train-step batch dict: rows split over the batch axes, the [K] cluster
  prior (batch["prior"]) replicated."""
  return {k: replicated(mesh) if k == "prior" else batch_sharding(mesh) for k in batch}


def check_batch_size(global_batch: int, mesh: Mesh, processes: int | None = None, *,
                     key: str = "batch_size") -> None:
  """Fails before compiling if the global batch (config.`key`: the train batch, or an
  evaluation one) cannot be split over the mesh and the hosts (`processes`, default
  jax.process_count())."""
  shards, hosts = batch_shards(mesh), processes or jax.process_count()
  if shards < hosts:
    raise ValueError(f"config.mesh {dict(mesh.shape)} splits the batch {shards} ways, fewer "
                     f"than the {hosts} processes: each process must feed its own slice, so "
                     f"give data x fsdp at least {hosts} devices")
  if global_batch % shards or global_batch % hosts:
    raise ValueError(f"config.{key}={global_batch} must be a multiple of the {hosts} "
                     f"process(es) and of the mesh's {shards} batch shards (data x fsdp); set "
                     f"--config.{key} to a multiple of {math.lcm(shards, hosts)}")


def from_host(x, sharding_: NamedSharding) -> jax.Array:
  """A host array that every process holds whole, as one global array laid out by `sharding_`:
  each process fills only its own devices from its copy, so it works on every host of a
  multi-host run (jax.device_put of a host array does not)."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding_, lambda index: x[index])


def rows_from_host(x, mesh: Mesh, fill=0) -> jax.Array:
  """Host rows [N, ...] (the same on every process) laid out by batch_sharding(mesh), padded
  with `fill` rows to a multiple of the batch shards."""
  x = np.asarray(x)
  pad = -x.shape[0] % batch_shards(mesh)
  x = np.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1), constant_values=fill)
  return from_host(x, batch_sharding(mesh))


def to_global(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's slice of the batch into one global, batch-sharded array."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
