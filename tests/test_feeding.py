"""data/feeding.py: the device prefetch keeps order and surfaces errors; the input-wait meter
tells an input-bound loop from a compute-bound one."""
import threading
import time

import numpy as np
import pytest

from pmsn_jax.data import feeding


def test_prefetch_keeps_order_and_depth():
  produced = []

  def host_batches():
    for i in range(10):
      produced.append(i)
      yield {"x": np.full(2, i), "skipped": np.zeros(2, np.int32) + (i == 3)}

  prefetch = feeding.DevicePrefetch(host_batches(), lambda b: {"x": b["x"] * 10},
                                    extras=lambda b: {"skipped": int(b["skipped"].sum())})
  time.sleep(0.2)
  assert len(produced) <= 3  # the queue holds 2; the producer blocks putting the third
  got = list(prefetch)
  assert [int(b["x"][0]) for b, _ in got] == [10 * i for i in range(10)]
  assert [e["skipped"] for _, e in got] == [0, 0, 0, 2, 0, 0, 0, 0, 0, 0]
  prefetch.close()


def test_prefetch_raises_the_producers_error_in_the_consumer():
  def host_batches():
    yield {"x": 1}
    raise OSError("disk gone")

  prefetch = feeding.DevicePrefetch(host_batches(), lambda b: b)
  assert next(prefetch)[0] == {"x": 1}
  with pytest.raises(OSError, match="disk gone"):
    next(prefetch)


def test_prefetch_close_stops_a_blocked_producer():
  def forever():
    while True:
      yield {}

  prefetch = feeding.DevicePrefetch(forever(), lambda b: b)
  next(prefetch)
  prefetch.close()
  assert not prefetch._thread.is_alive()  # noqa: SLF001


class Step:
  """A dispatched step that finishes `seconds` after dispatch (as a jax.Array's readiness)."""

  def __init__(self, seconds):
    self.ready = threading.Timer(seconds, lambda: None)
    self.ready.start()

  def block_until_ready(self):
    self.ready.join()


def run_loop(meter, batch_seconds, step_seconds, steps=8):
  """A train loop whose batches arrive every `batch_seconds` and whose steps take
  `step_seconds` on the device, with dispatch as asynchronous as JAX's."""
  prefetch = feeding.DevicePrefetch(iter(range(100)), lambda b: time.sleep(batch_seconds) or b)
  previous = None
  for _ in range(steps):
    meter.wait_for_input(lambda: next(prefetch))
    if previous is not None:  # one step queued behind the running one, as the device's queue
      previous.block_until_ready()
    previous = Step(step_seconds)
    meter.step_dispatched(previous)
  previous.block_until_ready()
  prefetch.close()
  return meter.interval()


def test_meter_tells_input_bound_from_compute_bound():
  # Margins of 10x and more: what is asserted is the classification, not a speed.
  meter = feeding.InputWaitMeter(images_per_step=4)
  input_bound = run_loop(meter, batch_seconds=0.1, step_seconds=0.005)
  assert input_bound["input_wait_pct"] > 50 and input_bound["input_wait_ms"] > 50
  compute_bound = run_loop(meter, batch_seconds=0.005, step_seconds=0.1)
  assert compute_bound["input_wait_pct"] < 5 and compute_bound["input_wait_ms"] < 5
  assert 0 < compute_bound["host_img_per_s"] < 4 / 0.05
  meter.close()


def test_per_host_reports_the_worst_host_and_lists_every_host():
  rows = np.array([[1.0, 2.0, 100.0], [8.0, 9.0, 50.0]])  # host_img_per_s, wait_ms, wait_pct
  values = {"host_img_per_s": 1.0, "input_wait_ms": 2.0, "input_wait_pct": 100.0}
  out = feeding.per_host(values, lambda mine: rows)
  assert out["input_slowest_host"] == 0 and out["input_wait_pct"] == 100.0
  assert out["input_wait_ms_by_host"] == [2.0, 9.0]
  single = feeding.per_host(values, None)
  assert single["input_slowest_host"] == 0 and "input_wait_ms_by_host" not in single


def test_input_bound_warning_names_the_host_the_figures_and_the_levers():
  from pmsn_jax import run_log  # pylint: disable=import-outside-toplevel
  text = run_log.input_bound_warning({"input_wait_pct": 23.4, "input_wait_ms": 41.0,
                                      "input_slowest_host": 3, "host_img_per_s": 912.0})
  assert "input-bound" in text and "23%" in text and "host 3" in text and "912 img/s" in text
  assert "cores" in text and "\n" not in text
