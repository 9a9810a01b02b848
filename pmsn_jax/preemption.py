"""Preemption: SIGTERM (a spot VM's notice, `scancel`, `launch/tpu_vm.sh stop`) ends the run
at the next step boundary with a checkpoint of that step, so the same command resumes.

One process: our own SIGTERM handler sets a flag the loop reads (no device sync). Several
processes: hosts may get the signal at different steps, and a host that stops alone would
hang the others in their next collective. JAX's preemption sync point (via Orbax's
`reached_preemption`, backed by the jax.distributed coordination service, which catches
SIGTERM itself) makes every host agree on the same step.
"""
from __future__ import annotations

import os
import signal
import sys

import jax

EXIT_STATUS = 143  # 128 + SIGTERM: "stopped on request, checkpoint saved", as shells report it


class Preempted(Exception):
  """Raised by the train loop after the preemption checkpoint is committed."""

  def __init__(self, step: int):
    super().__init__(f"stopped by SIGTERM at step {step} after saving checkpoint {step}; "
                     f"rerun the same command to resume")
    self.step = step


class PreemptionWatch:
  """`requested(step)` turns True once a stop was requested (consistently across hosts)."""

  def __init__(self, manager):
    self._manager, self._flag = manager, False
    self._previous = None
    if jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)

  def _on_signal(self, signum, frame):
    del signum, frame
    self._flag = True

  def requested(self, step: int) -> bool:
    if jax.process_count() > 1:
      return bool(self._manager.reached_preemption(step))
    return self._flag

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def exit_preempted() -> None:
  """Exits with EXIT_STATUS once the preemption checkpoint is committed.

  One process skips the interpreter's teardown (os._exit): tearing down TensorFlow and XLA
  took 4-7 s after the checkpoint (smoke and demo configs, busy cores; 0.3 s without it),
  and a campaign run pinned to one core was still exiting 20 s later: time a spot VM's ~30 s
  notice does not have. Nothing left to tear down holds data (the checkpoint is committed,
  the metric writer closed, stdio flushed). Several processes keep the normal exit, so that
  jax.distributed's shutdown barrier runs.
  """
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):  # a closed pipe (the launching shell is gone) must not
      pass                         # turn "checkpoint saved, exit 143" into a crash
  if jax.process_count() == 1:
    os._exit(EXIT_STATUS)
  sys.exit(EXIT_STATUS)
