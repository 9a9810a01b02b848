"""Multi-host start-up: one JAX process per host (TPU VM worker, GPU node, or a CPU test).

JAX's multi-controller runtime is the distributed engine: every process runs the same program
on its own devices, and `jax.distributed.initialize` connects them. This module decides when
and how to call it:
  * explicit --coordinator_address/--num_processes/--process_id (plain multi-node GPU, or
    several CPU processes on one machine, as the tests do);
  * a SLURM job with several tasks, a TPU slice that lists its workers in the environment
    (GKE), or any Cloud TPU VM (`gcloud compute tpus tpu-vm create`, where JAX reads the
    workers from the GCE metadata server and TPU_WORKER_HOSTNAMES may be unset): JAX finds
    the coordinator and this process's id itself, so initialize() takes no arguments;
  * otherwise a single process: nothing to do.
Then `check_started` refuses a run that would silently train as unconnected single processes.
Both decisions are pure functions of the environment (tests/test_distributed.py).
"""
from __future__ import annotations

import glob
import os
from typing import Mapping

import jax

# Cloud TPU chips on the PCI bus: Google's vendor id and the TPU device ids (v3 ... TPU7x), as
# jax._src.hardware_utils reads them (other Google devices, e.g. the gVNIC, share the vendor).
_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_PCI_DEVICES = ("0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076")


def should_initialize(environ: Mapping[str, str], *, tpu_vm: bool) -> str | None:
  """Why this process must call jax.distributed.initialize() with no arguments, or None.

  environ: the process environment. tpu_vm: JAX found TPU chips and libtpu on this machine
  (on_cloud_tpu_vm()); on such a VM, JAX reads the slice's workers from the metadata server.
  """
  ntasks = _int(environ.get("SLURM_NTASKS"), 1)
  if ntasks > 1:
    return f"SLURM job of {ntasks} tasks"
  if not _tpus_used(environ):
    return None  # e.g. JAX_PLATFORMS=cpu on a TPU VM: one process on its CPU
  hosts = _tpu_worker_hosts(environ)
  if len(hosts) > 1:
    return f"TPU slice of {len(hosts)} workers (TPU_WORKER_HOSTNAMES)"
  if tpu_vm and "TPU_SKIP_MDS_QUERY" not in environ:
    return "Cloud TPU VM (JAX reads the slice's workers from the GCE metadata server)"
  return None


def expected_process_count(environ: Mapping[str, str],
                           num_processes: int | None = None) -> int | None:
  """How many processes the environment (or --num_processes) promises, at least, if it says."""
  if num_processes is not None:
    return num_processes
  ntasks = _int(environ.get("SLURM_NTASKS"), 1)
  if ntasks > 1:
    return ntasks
  hosts = _tpu_worker_hosts(environ)
  if len(hosts) > 1 and _tpus_used(environ):
    return len(hosts) * _int(environ.get("MEGASCALE_NUM_SLICES"), 1)
  return None


def startup_error(process_count: int, connected: bool, expected: int | None) -> str | None:
  """The one-line error for a run whose processes are not connected as promised, or None.

  connected: jax.distributed.is_initialized(), i.e. this process has a distributed client.
  """
  if process_count > 1 and not connected:
    return (f"JAX sees {process_count} processes but jax.distributed was not initialized; "
            f"pass --coordinator_address, --num_processes and --process_id, or run inside "
            f"SLURM / on a TPU VM where it is automatic")
  # Fewer only: more is fine (a multislice job whose slice count only the metadata server
  # knows connects more processes than TPU_WORKER_HOSTNAMES lists).
  if expected is not None and process_count < expected:
    return (f"this job has {expected} processes but JAX connected only {process_count}; hosts "
            f"would train as independent runs: check that every host runs the same command "
            f"(launch/tpu_vm.sh runs it with --worker=all) and can reach the coordinator")
  return None


def check_explicit(coordinator_address: str | None, num_processes: int | None,
                   process_id: int | None) -> bool:
  """True when the multi-process flags are given (all of them, valid); False when none are."""
  explicit = (coordinator_address, num_processes, process_id)
  if all(v is None for v in explicit):
    return False
  if any(v is None for v in explicit):
    raise ValueError("multi-process runs need all of --coordinator_address, --num_processes "
                     "and --process_id (or none of them inside SLURM / a TPU slice)")
  if not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id={process_id} must be in [0, --num_processes="
                     f"{num_processes})")
  return True


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Connects this process to the others, if there are others. Call before any JAX op."""
  if check_explicit(coordinator_address, num_processes, process_id):
    if _cpu_only():
      # Cross-process collectives on CPU need an implementation; gloo ships with jaxlib.
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  else:
    reason = should_initialize(os.environ, tpu_vm=on_cloud_tpu_vm())
    if reason is not None:
      try:
        jax.distributed.initialize()
      except (RuntimeError, ValueError) as e:  # e.g. no metadata server, coordinator unreachable
        raise ValueError(f"jax.distributed.initialize() failed on this {reason}: "
                         f"{(str(e).strip().splitlines() or [''])[0][:200]}; pass "
                         f"--coordinator_address, --num_processes and --process_id to connect "
                         f"the processes by hand") from None
  check_started(expected_process_count(os.environ, num_processes))


def check_started(expected: int | None = None) -> None:
  """Fails (one line) when several processes exist, or are expected, but are not connected."""
  error = startup_error(jax.process_count(), jax.distributed.is_initialized(), expected)
  if error:
    raise ValueError(error)


def on_cloud_tpu_vm() -> bool:
  """True on a Cloud TPU VM: JAX's own verdict, made at `import jax` from libtpu and the PCI
  bus (no network), which its TPU cluster detection reads; the same PCI check if JAX moves it."""
  try:
    from jax._src import cloud_tpu_init
    return bool(cloud_tpu_init.running_in_cloud_tpu_vm)
  except (ImportError, AttributeError):
    return _tpu_chips_on_pci() > 0


def _tpu_chips_on_pci() -> int:
  count = 0
  for device in glob.glob("/sys/bus/pci/devices/*"):
    try:
      with open(os.path.join(device, "vendor")) as v, open(os.path.join(device, "device")) as d:
        count += v.read().strip() == _GOOGLE_PCI_VENDOR and d.read().strip() in _TPU_PCI_DEVICES
    except OSError:
      pass
  return count


def _tpus_used(environ: Mapping[str, str]) -> bool:
  """False when JAX_PLATFORMS (or the older JAX_PLATFORM_NAME) leaves out the TPU."""
  platforms = (environ.get("JAX_PLATFORMS") or environ.get("JAX_PLATFORM_NAME") or "").lower()
  return not platforms or "tpu" in platforms


def _tpu_worker_hosts(environ: Mapping[str, str]) -> list[str]:
  """The slice's workers as GKE lists them (JAX reads the same two variables)."""
  hosts = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES") or ""
  return [h for h in hosts.split(",") if h.strip()]


def _int(value: str | None, default: int) -> int:
  try:
    return int(value) if value not in (None, "") else default
  except ValueError:
    return default


def _cpu_only() -> bool:
  platforms = os.environ.get("JAX_PLATFORMS", "") or os.environ.get("JAX_PLATFORM_NAME", "")
  return platforms.strip().lower() == "cpu"
