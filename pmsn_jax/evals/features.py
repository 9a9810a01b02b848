"""Batched, mesh-sharded feature extraction with a frozen encoder."""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from pmsn_jax import sharding
from pmsn_jax.data import pipeline


def extract_features(encode: Callable, images: np.ndarray, data_cfg, *, batch_size: int,
                     mesh: Mesh) -> np.ndarray:
  """encode: jitted [b,S,S,C] -> [b,D]; images: uint8 [N,H,W,C] -> float32 [N, D].

  Every batch is padded to `batch_size` so `encode` compiles once, and is laid out over the
  mesh's data axis (each process holds the same images; devices take their rows).
  """
  batch_sharding = sharding.batch_sharding(mesh)
  outputs = []
  for batch in pipeline.eval_batches(images, data_cfg, batch_size):
    n = batch.shape[0]
    if n < batch_size:
      batch = np.concatenate([batch, np.zeros((batch_size - n, *batch.shape[1:]), batch.dtype)])
    global_batch = jax.make_array_from_callback(batch.shape, batch_sharding,
                                                lambda idx, b=batch: b[idx])
    # Rows live on every process's devices: gather them all (a no-op copy on one host).
    outputs.append(multihost_utils.process_allgather(encode(global_batch), tiled=True)[:n])
  return np.concatenate(outputs).astype(np.float32)
