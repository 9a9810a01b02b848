"""Feeding the devices: the next global batches are transferred while the current step runs,
and each host measures how long the devices sat idle waiting for its input.

Why a thread: the host half of a batch (tf.data's decode and crop, then the transfer of the
uint8 views) is work the train loop would otherwise do between two steps, with the devices
idle. DevicePrefetch keeps `depth` global batches already on the devices, in order.

Why the wait is measured against the step's completion: JAX dispatches asynchronously, so the
loop blocking in next() does not mean the devices are idle (they may still run the previous
step), and timing next() alone would call a run input-bound whenever the loop runs ahead.
InputWaitMeter records when each step finished (a watcher thread blocks on one small output
per step) and counts only the part of a wait that came after the previous step was done:
the time the devices had nothing to do for want of this host's batch.
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np

_POLL_S = 0.1  # How often a blocked producer looks whether it was closed.


class DevicePrefetch:
  """Iterator of (device batch, host extras) from `host_batches`, `depth` batches ahead.

  `to_device(host_batch)` makes the device batch (e.g. sharding.to_global of the step's keys);
  `extras(host_batch)` picks what the loop needs on the host (skipped-image counts). The
  producer thread's errors are raised by the next() that would have returned its batch.
  """

  def __init__(self, host_batches: Iterator[dict], to_device: Callable[[dict], dict],
               extras: Callable[[dict], dict] = lambda batch: {}, depth: int = 2):
    if depth < 1:
      raise ValueError(f"prefetch depth must be >= 1, got {depth}")
    self._queue: queue.Queue = queue.Queue(maxsize=depth)
    self._closed = threading.Event()
    self._thread = threading.Thread(
        target=self._produce, args=(host_batches, to_device, extras), daemon=True,
        name="device-prefetch")
    self._thread.start()

  def _produce(self, host_batches, to_device, extras) -> None:
    try:
      for host_batch in host_batches:
        item = (to_device(host_batch), extras(host_batch))
        if not self._put(item):
          return
      self._put(StopIteration())
    except BaseException as e:  # noqa: BLE001  re-raised in the consumer's thread
      self._put(e)

  def _put(self, item) -> bool:
    while not self._closed.is_set():
      try:
        self._queue.put(item, timeout=_POLL_S)
        return True
      except queue.Full:
        continue
    return False

  def __iter__(self):
    return self

  def __next__(self):
    if self._closed.is_set():
      raise StopIteration
    item = self._queue.get()
    if isinstance(item, BaseException):
      self.close()
      raise item
    return item

  def close(self) -> None:
    """Stops the producer (it may be mid-batch: that batch is dropped). Idempotent."""
    self._closed.set()
    while True:  # unblock a producer waiting on a full queue
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    self._thread.join(timeout=10 * _POLL_S)


class InputWaitMeter:
  """Per-host input wait between log steps.

  For each step: wait_for_input() around the call that takes the next batch, then
  step_dispatched(marker) with a small output of the step (its loss). interval() then gives,
  since the previous interval: the devices' idle time waiting for this host's input, per step
  (ms) and as a share of the wall time, and the images this host delivered per second.
  The first step of a run is left out (its wait is the pipeline's start-up).
  """

  def __init__(self, images_per_step: int):
    self.images_per_step = images_per_step
    self._done: queue.Queue = queue.Queue()
    self._watched: queue.Queue = queue.Queue()
    self._thread = threading.Thread(target=self._watch, daemon=True, name="step-watcher")
    self._thread.start()
    self._previous_done: float | None = None
    self._pending: list[tuple[float, float]] = []  # (wait start, wait end) per step
    self._idle = 0.0
    self._steps = 0
    self._interval_start = time.perf_counter()

  def _watch(self) -> None:
    while True:
      marker = self._watched.get()
      if marker is None:
        return
      marker.block_until_ready()
      self._done.put(time.perf_counter())

  def wait_for_input(self, take: Callable):
    """Returns take() (the next batch), timing the wait."""
    start = time.perf_counter()
    item = take()
    self._pending.append((start, time.perf_counter()))
    return item

  def step_dispatched(self, marker) -> None:
    self._watched.put(marker)

  def _settle(self, block: bool) -> None:
    """Matches each finished step with the wait before the step after it."""
    while self._pending:
      try:
        done = self._done.get(block=block and len(self._pending) > 1)
      except queue.Empty:
        return
      start, end = self._pending.pop(0)
      if self._previous_done is not None:  # not the run's first step
        self._idle += max(0.0, end - max(start, self._previous_done))
        self._steps += 1
      self._previous_done = done

  def interval(self) -> dict[str, float]:
    """input_wait_ms (per step), input_wait_pct (of the wall time) and host_img_per_s since
    the last call. Call it after a sync (a fetched metric): the steps dispatched so far have
    finished, so only the current one can still be pending."""
    self._settle(block=True)
    now = time.perf_counter()
    elapsed = max(now - self._interval_start, 1e-9)
    steps = max(self._steps, 1)
    out = {"input_wait_ms": 1e3 * self._idle / steps,
           "input_wait_pct": 100.0 * self._idle / elapsed,
           "host_img_per_s": self._steps * self.images_per_step / elapsed}
    self._idle, self._steps, self._interval_start = 0.0, 0, now
    return out

  def close(self) -> None:
    self._watched.put(None)
    self._thread.join(timeout=10)


def per_host(values: dict[str, float], gather: Callable[[np.ndarray], np.ndarray] | None
             ) -> dict:
  """This host's input figures and every host's (`gather`: an all-gather over processes, or
  None for one process) -> the scalars to log: the worst host's wait and img/s, which host
  that is, and each host's figures as lists (metrics.jsonl keeps them; TensorBoard the
  scalars)."""
  keys = sorted(values)
  mine = np.asarray([values[k] for k in keys], np.float64)
  rows = mine[None] if gather is None else np.asarray(gather(mine)).reshape(-1, len(keys))
  wait = rows[:, keys.index("input_wait_pct")]
  worst = int(np.argmax(wait))
  out = {k: float(rows[worst, i]) for i, k in enumerate(keys)}
  out["input_slowest_host"] = worst
  if len(rows) > 1:
    out.update({f"{k}_by_host": [float(x) for x in rows[:, i]] for i, k in enumerate(keys)})
  return out
