"""Metric sinks (JSONL + TensorBoard) and the progress line. Process 0 writes; others no-op."""

from __future__ import annotations

import json
import math
import os
import time

import jax
from absl import logging

from pmsn_jax import paths


class MetricWriter:
  """Appends {"step": s, **scalars} to workdir/metrics.jsonl and TensorBoard event files.

  `workdir` may be a URL (paths.py): metrics.jsonl goes through etils.epath, TensorBoard
  through tf.io.gfile, which writes gs:// natively. Where tf.io.gfile cannot reach the workdir
  (tensorboard_unreachable), TensorBoard is skipped with one warning; metrics.jsonl holds
  every scalar anyway.
  """

  def __init__(self, workdir):
    self.active = jax.process_index() == 0
    if not self.active:
      return
    import tensorflow as tf  # TensorFlow is already a dependency (tf.data); no clu needed.
    self._tf = tf
    self._jsonl = paths.AppendFile(paths.path(workdir) / "metrics.jsonl")
    tb_dir = os.path.join(os.fspath(workdir), "tensorboard")
    why_not = tensorboard_unreachable(tb_dir, os.environ, tf.io.gfile.get_registered_schemes())
    if why_not:
      logging.warning("TensorBoard off: %s; the same scalars are in metrics.jsonl", why_not)
    self._tb = None if why_not else tf.summary.create_file_writer(tb_dir)

  def write(self, step: int, scalars: dict[str, float | list[float]]) -> None:
    """Scalars go to both sinks; lists (a figure per host) to metrics.jsonl only."""
    if not self.active:
      return
    lists = {k: [float(x) for x in v] for k, v in scalars.items() if isinstance(v, list)}
    scalars = {k: float(v) for k, v in scalars.items() if k not in lists}
    self._jsonl.write(json.dumps({"step": int(step), **scalars, **lists}) + "\n")
    if self._tb is not None:
      with self._tb.as_default():
        for name, value in scalars.items():
          self._tf.summary.scalar(name, value, step=int(step))
      self._tb.flush()

  def flush(self) -> None:
    """Makes every row written so far visible (on a URL, metrics.jsonl is synced lazily)."""
    if self.active:
      self._jsonl.flush()

  def close(self) -> None:
    """Safe to call more than once."""
    if self.active:
      self._jsonl.close()
      if self._tb is not None:
        self._tb.close()
        self._tb = None


def tensorboard_unreachable(directory: str, environ, gfile_schemes) -> str | None:
  """Why tf.summary cannot write to `directory`, or None if it can.

  TensorBoard event files go through tf.io.gfile, not etils.epath: a URL scheme it has no
  filesystem for would fail at the first write, and gs:// pointed at an emulator
  (STORAGE_EMULATOR_HOST, honoured by gcsfs and tensorstore) would make TF write to the real
  Cloud Storage instead, since TF's GCS filesystem has no endpoint setting.
  """
  if not paths.is_url(directory):
    return None
  scheme = directory.split("://", 1)[0]
  if scheme not in gfile_schemes:
    known = sorted(filter(None, gfile_schemes))
    return f"tf.io.gfile has no {scheme}:// filesystem (it has {known})"
  if scheme == "gs" and environ.get("STORAGE_EMULATOR_HOST"):
    return (f"STORAGE_EMULATOR_HOST={environ['STORAGE_EMULATOR_HOST']} points gs:// at an "
            f"emulator that tf.io.gfile cannot reach")
  return None


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
          + (f"  input wait {scalars['input_wait_pct']:.1f}%"
             if "input_wait_pct" in scalars else "")
          + (f"  skipped {scalars['skipped_images']:.0f} unreadable images"
             if scalars.get("skipped_images") else ""))
