"""Orbax checkpoints of the train state, and the self-describing encoder export.

Train checkpoints: `workdir/checkpoints/<step>/`, written asynchronously by a
CheckpointManager that keeps the newest N. Orbax commits a step atomically (a temporary
directory renamed at the end), so a crash mid-save leaves the previous step restorable.

Export: `workdir/export/{params/, model_config.json}`: the EMA target encoder (the model that is
evaluated) plus everything `load_encoder` needs to rebuild and feed it. An export may also hold
`head/`: the projection head (with its BatchNorm statistics) and the prototypes, which encoder
consumers never read but a warm start and the PyTorch conversion do (warm_start.py,
timm_writer.py).

Every directory here may be a URL (gs://bucket/run/checkpoints): Orbax gets it unchanged (local
paths are made absolute), and the JSON beside it goes through the same path API (paths.py).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from pmsn_jax import paths, sharding
from pmsn_jax.models import heads, vit

EXPORT_FORMAT = "pmsn_jax.encoder.v2"
# v1: the same, with flat qkv kernels (flat_qkv); read and upgraded on load.
READABLE_EXPORT_FORMATS = ("pmsn_jax.encoder.v1", EXPORT_FORMAT)


class Checkpointer:
  """Thin wrapper over ocp.CheckpointManager with the policies the train loop needs."""

  def __init__(self, directory, *, keep: int | None = None, read_only: bool = False):
    """`read_only`: for evaluating another run's checkpoints: creates, cleans up and deletes
    nothing there (that run may still be writing them)."""
    self.manager = ocp.CheckpointManager(
        paths.resolve(directory),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=not read_only, read_only=read_only,
            enable_async_checkpointing=not read_only,
            # A save killed midway leaves a temporary directory, never a step directory:
            # it is ignored by latest_step() and deleted here on the next start.
            cleanup_tmp_directories=not read_only))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state) -> None:
    self.manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def restore(self, step: int, abstract_state):
    """Restores onto `abstract_state` (ShapeDtypeStructs carrying the target shardings).
    Checkpoints with flat qkv kernels (written before they had a heads axis) are upgraded."""
    restore = lambda target: self.manager.restore(  # noqa: E731
        step, args=ocp.args.StandardRestore(target))
    try:
      return restore(abstract_state)
    except (ValueError, KeyError) as e:
      flat = flat_qkv(abstract_state)
      if flat is not None:
        try:
          return unflatten_qkv(restore(flat), abstract_state)
        except (ValueError, KeyError):
          pass  # not that either: report the first error
      raise ValueError(
          f"checkpoint {self.manager.directory}/{step} does not match this config's model "
          f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); pass the config it was "
          "written with (to train another model, use a fresh --workdir).") from None

  def close(self) -> None:
    """Blocks until any async save is committed: never exit with a save in flight.
    Safe to call more than once."""
    if self.manager is not None:
      self.manager.wait_until_finished()
      self.manager.close()
      self.manager = None


# Until 2026-12-07 qkv kernels were DeiT's flat [..., width, 3 * width] and their biases
# [..., 3 * width]; now they are [..., width, 3, heads, head_dim] and [..., 3, heads, head_dim]
# (so tensor parallelism can split heads). Same numbers in the same order: a reshape upgrades.
_QKV_LEAF = re.compile(r"qkv/(kernel|bias)")


def flat_qkv(abstract_tree):
  """`abstract_tree` with its qkv leaves in the flat layout (None if it has none)."""
  found = False

  def flat(path, x):
    nonlocal found
    if not _QKV_LEAF.search(sharding.path_string(path)):
      return x
    found = True
    shape = (*x.shape[:-3], math.prod(x.shape[-3:]))
    placed = getattr(x, "sharding", None)
    if placed is not None:  # the same split of the leading dims, the flat one whole
      spec = (*tuple(placed.spec)[:len(shape) - 1], None)
      placed = NamedSharding(placed.mesh, PartitionSpec(*spec))
    return jax.ShapeDtypeStruct(shape, x.dtype, sharding=placed)
  tree = jax.tree_util.tree_map_with_path(flat, abstract_tree)
  return tree if found else None


def unflatten_qkv(tree, abstract_tree):
  """Reshapes the flat qkv leaves of a restored `tree` to `abstract_tree`'s shapes and
  shardings (a jitted reshape: works on arrays that span hosts)."""
  def reshape(x, target):
    if x.shape == target.shape:
      return x
    if isinstance(x, np.ndarray) or getattr(target, "sharding", None) is None:
      return np.asarray(x).reshape(target.shape)
    return jax.jit(lambda a: a.reshape(target.shape), out_shardings=target.sharding)(x)
  return jax.tree.map(reshape, tree, abstract_tree)


def abstract_with_shardings(abstract_tree, shardings):
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_tree, shardings)


# ----------------------------------------------------------------------------- export

HEAD_DIR = "head"  # beside params/: the projection head and prototypes, when exported


def export_encoder(directory, encoder_state: nnx.State, vit_cfg: vit.ViTConfig,
                   mean, std, *, head: dict | None = None, extra: dict | None = None) -> None:
  """Writes the encoder parameters (Orbax) and the config that rebuilds it.

  `head`: optionally {"params", "batch_stats", "prototypes"}: a ProjectionHead's parameters and
  BatchNorm statistics (pure dicts) and the [K, d] prototypes, written to `head/` with their
  sizes in model_config.json (read back by `read_head`). `extra`: more JSON-able keys for
  model_config.json (e.g. where converted weights came from).
  """
  directory = paths.resolve(directory)
  # Whole arrays on every process, whatever their sharding (FSDP shards span hosts).
  gather = lambda tree: jax.tree.map(  # noqa: E731
      lambda x: multihost_utils.process_allgather(x, tiled=True), tree)
  params = gather(encoder_state.to_pure_dict())
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(directory / "params", params, force=True)
    if head is not None:
      head = gather({key: head[key] for key in ("params", "batch_stats", "prototypes")})
      ckpt.save(directory / HEAD_DIR, head, force=True)
  if jax.process_index() == 0:
    meta = {**(extra or {}), "format": EXPORT_FORMAT, "vit": dataclasses.asdict(vit_cfg),
            "mean": list(mean), "std": list(std)}
    if head is not None:
      hidden_dim, output_dim = head["params"]["fc3"]["kernel"].shape
      meta["head"] = {"hidden_dim": int(hidden_dim), "output_dim": int(output_dim),
                      "num_prototypes": int(head["prototypes"].shape[0])}
    paths.write_text(directory / "model_config.json", json.dumps(meta, indent=2))


def read_export(path) -> tuple[dict, vit.ViTConfig, dict]:
  """-> (model_config.json as a dict, the encoder's ViTConfig, its parameters as a pure dict of
  host arrays). For code that needs the weights themselves (warm starts, conversion to PyTorch);
  `load_encoder` builds the encoder from them. `path` may be a URL."""
  path = paths.resolve(path)
  meta_path = path / "model_config.json"
  if not meta_path.exists():
    raise FileNotFoundError(f"{meta_path} not found: pass the export directory written by "
                            "training (WORKDIR/export).")
  meta = json.loads(meta_path.read_text())
  if meta.get("format") not in READABLE_EXPORT_FORMATS:
    raise ValueError(f"{meta_path} has format {meta.get('format')!r}, expected one of "
                     f"{READABLE_EXPORT_FORMATS}.")
  cfg = vit.ViTConfig(**meta["vit"])
  abstract = nnx.eval_shape(lambda: vit.ViT(cfg, rngs=nnx.Rngs(0)))
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                        nnx.state(abstract).to_pure_dict())
  legacy = meta["format"] != EXPORT_FORMAT
  with ocp.StandardCheckpointer() as ckpt:
    try:
      params = ckpt.restore(path / "params", flat_qkv(target) if legacy else target)
      if legacy:
        params = unflatten_qkv(params, target)
    except (ValueError, KeyError) as e:
      raise ValueError(f"{path}/params does not match its model_config.json "
                       f"({str(e).splitlines()[0][:200]}).") from None
  return meta, cfg, params


def read_head(path) -> dict | None:
  """The projection head and prototypes of an export ({"params", "batch_stats", "prototypes"},
  host arrays), or None if it has none (exports written before heads were)."""
  path = paths.resolve(path)
  meta = json.loads((path / "model_config.json").read_text())
  dims = meta.get("head")
  if not dims:
    return None
  width = meta["vit"]["width"]
  head = nnx.eval_shape(lambda: heads.ProjectionHead(
      width, dims["hidden_dim"], dims["output_dim"], rngs=nnx.Rngs(0)))
  _, params, stats = nnx.split(head, nnx.Param, nnx.BatchStat)
  shape = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)  # noqa: E731
  target = {"params": jax.tree.map(shape, params.to_pure_dict()),
            "batch_stats": jax.tree.map(shape, stats.to_pure_dict()),
            "prototypes": jax.ShapeDtypeStruct((dims["num_prototypes"], dims["output_dim"]),
                                               jnp.float32)}
  with ocp.StandardCheckpointer() as ckpt:
    try:
      return ckpt.restore(path / HEAD_DIR, target)
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise ValueError(f"{path}/{HEAD_DIR} does not match its model_config.json "
                       f"({str(e).splitlines()[0][:200]}).") from None


def load_encoder(path, features: str = "cls") -> Callable[[jax.Array], jax.Array]:
  """Rebuilds an exported encoder. Returns encode(images [N,H,W,C]) -> features [N, D].

  `features` picks the readout (vit.FEATURE_READOUTS): the CLS token, the mean patch token, or
  both concatenated (D = 2 * width).

  `images` are raw pixels (uint8, or floats in [0, 255]); they are resized to the trained
  resolution if needed and normalised with the mean/std saved at export, so callers need not
  know how the model was trained. `path` may be a URL (gs://bucket/run/export).
  """
  vit.check_readout(features)  # before loading anything, not at the first call
  meta, cfg, params = read_export(path)
  graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: vit.ViT(cfg, rngs=nnx.Rngs(0))))
  nnx.replace_by_pure_dict(abstract_state, params)
  mean = jnp.asarray(meta["mean"], jnp.float32)
  std = jnp.asarray(meta["std"], jnp.float32)

  @jax.jit
  def encode(state, images):
    if images.ndim != 4 or images.shape[-1] != cfg.channels:
      raise ValueError(f"images must be [N, H, W, {cfg.channels}], got {images.shape}.")
    x = images.astype(jnp.float32) / 255.0
    if x.shape[1:3] != (cfg.image_size, cfg.image_size):
      x = jax.image.resize(x, (x.shape[0], cfg.image_size, cfg.image_size, cfg.channels),
                           "bilinear")
    return nnx.merge(graphdef, state)((x - mean) / std, features=features)

  return functools.partial(encode, abstract_state)
