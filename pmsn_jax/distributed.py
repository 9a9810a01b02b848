"""Multi-host start-up: one JAX process per host (TPU VM worker, GPU node, or a CPU test).

JAX's multi-controller runtime is the distributed engine: every process runs the same program
on its own devices, and `jax.distributed.initialize` connects them. This module decides when
and how to call it:
  * explicit --coordinator_address/--num_processes/--process_id (plain multi-node GPU, or
    several CPU processes on one machine, as the tests do);
  * a multi-host TPU slice or a SLURM job with several tasks: JAX finds the coordinator and
    this process's id in the environment, so initialize() takes no arguments;
  * otherwise a single process: nothing to do.
"""
from __future__ import annotations

import os

import jax


def cluster_detected() -> bool:
  """True inside a multi-process SLURM job or a multi-host TPU slice."""
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")  # set on every worker of a TPU VM slice
  return "," in hosts


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Connects this process to the others, if there are others. Call before any JAX op."""
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise ValueError("multi-process runs need all of --coordinator_address, --num_processes "
                       "and --process_id (or none of them inside SLURM / a TPU slice)")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} must be in [0, --num_processes="
                       f"{num_processes})")
    if _cpu_only():
      # Cross-process collectives on CPU need an implementation; gloo ships with jaxlib.
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif cluster_detected():
    jax.distributed.initialize()


def _cpu_only() -> bool:
  platforms = os.environ.get("JAX_PLATFORMS", "") or os.environ.get("JAX_PLATFORM_NAME", "")
  return platforms.strip().lower() == "cpu"
