"""Metric sinks (JSONL + TensorBoard) and the progress line. Process 0 writes; others no-op."""

from __future__ import annotations

import json
import math
import os
import time

import jax


class MetricWriter:
  """Appends {"step": s, **scalars} to workdir/metrics.jsonl and TensorBoard event files."""

  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    if not self.active:
      return
    import tensorflow as tf  # TensorFlow is already a dependency (tf.data); no clu needed.
    self._tf = tf
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.active:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
    self._jsonl.flush()
    with self._tb.as_default():
      for name, value in scalars.items():
        self._tf.summary.scalar(name, value, step=int(step))
    self._tb.flush()

  def close(self) -> None:
    if self.active:
      self._jsonl.close()
      self._tb.close()


class Progress:
  """Throughput and ETA between log steps (first interval includes compilation)."""

  def __init__(self, start_step: int, total_steps: int, batch_size: int):
    self.total, self.batch = total_steps, batch_size
    self.last_step, self.last_time = start_step, time.perf_counter()

  def update(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    steps, elapsed = step - self.last_step, max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    per_step = elapsed / max(steps, 1)
    return {"img_per_s": steps * self.batch / elapsed,
            "eta_s": per_step * (self.total - step)}


def format_line(step: int, total: int, scalars: dict[str, float]) -> str:
  eta = scalars.get("eta_s", math.nan)
  eta_txt = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?"
  return (f"step {step}/{total}  loss {scalars.get('loss', math.nan):.4f}  "
          f"ce {scalars.get('ce', math.nan):.4f}  reg {scalars.get('reg', math.nan):.4f}  "
          f"protos {scalars.get('prototypes_in_use', math.nan):.0f}  "
          f"{scalars.get('img_per_s', math.nan):.1f} img/s  ETA {eta_txt}"
          + (f"  skipped {scalars['skipped_images']:.0f} unreadable images"
             if scalars.get("skipped_images") else ""))
