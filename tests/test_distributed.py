"""When and how a process joins the others (distributed.py), decided from the environment alone:
no network, no TPU. The real multi-process path runs in tests/test_multihost.py."""

import pytest

from pmsn_jax import distributed

TPU_VM = {"TPU_ACCELERATOR_TYPE": "v4-32", "TPU_WORKER_ID": "1"}  # what a TPU VM may export


def test_tpu_vm_without_worker_hostnames_initializes():
  # `gcloud compute tpus tpu-vm create` slices: JAX reads the workers from the GCE metadata
  # server; TPU_WORKER_HOSTNAMES is not set, yet initialize() must still run.
  reason = distributed.should_initialize(TPU_VM, tpu_vm=True)
  assert reason is not None and "Cloud TPU VM" in reason
  assert distributed.should_initialize({}, tpu_vm=True) is not None
  assert distributed.expected_process_count(TPU_VM) is None  # only the metadata server knows


def test_tpu_slice_listing_its_workers_initializes():
  env = {"TPU_WORKER_HOSTNAMES": "w-0,w-1,w-2,w-3", "TPU_WORKER_ID": "2"}
  assert "4 workers" in distributed.should_initialize(env, tpu_vm=True)
  assert "4 workers" in distributed.should_initialize(env, tpu_vm=False)
  assert distributed.expected_process_count(env) == 4
  assert distributed.expected_process_count(dict(env, MEGASCALE_NUM_SLICES="2")) == 8
  # One worker listed: a single-host VM, still a TPU VM.
  assert distributed.should_initialize({"TPU_WORKER_HOSTNAMES": "w-0"}, tpu_vm=False) is None
  assert distributed.should_initialize({"TPU_WORKER_HOSTNAMES": "w-0"}, tpu_vm=True)


def test_single_cpu_or_gpu_process_does_not_initialize():
  for env in ({}, {"JAX_PLATFORMS": "cpu"}, {"SLURM_NTASKS": "1"}, {"SLURM_NTASKS": ""}):
    assert distributed.should_initialize(env, tpu_vm=False) is None, env
    assert distributed.expected_process_count(env) is None, env


def test_tpu_vm_told_to_use_cpu_or_to_skip_the_metadata_server_does_not():
  assert distributed.should_initialize({"JAX_PLATFORMS": "cpu"}, tpu_vm=True) is None
  on_cpu = {"JAX_PLATFORMS": "cpu", "TPU_WORKER_HOSTNAMES": "w-0,w-1"}
  assert distributed.should_initialize(on_cpu, tpu_vm=True) is None
  assert distributed.expected_process_count(on_cpu) is None  # one process, as asked
  assert distributed.should_initialize({"JAX_PLATFORMS": "tpu,cpu"}, tpu_vm=True) is not None
  assert distributed.should_initialize({"TPU_SKIP_MDS_QUERY": "1"}, tpu_vm=True) is None


def test_slurm_with_several_tasks_initializes():
  env = {"SLURM_NTASKS": "16", "SLURM_PROCID": "3"}
  assert distributed.should_initialize(env, tpu_vm=False) == "SLURM job of 16 tasks"
  assert distributed.expected_process_count(env) == 16


def test_explicit_flags_are_all_or_nothing_and_in_range():
  assert distributed.check_explicit(None, None, None) is False
  assert distributed.check_explicit("localhost:1234", 2, 1) is True
  with pytest.raises(ValueError, match="need all of --coordinator_address"):
    distributed.check_explicit("localhost:1234", None, 0)
  with pytest.raises(ValueError, match=r"--process_id=2 must be in \[0, --num_processes=2\)"):
    distributed.check_explicit("localhost:1234", 2, 2)
  with pytest.raises(ValueError, match="process_id=-1"):
    distributed.check_explicit("localhost:1234", 2, -1)
  # The flags' process count is what the started job must have.
  assert distributed.expected_process_count({"SLURM_NTASKS": "8"}, num_processes=2) == 2


def test_unconnected_processes_fail_in_one_line():
  assert distributed.startup_error(1, False, None) is None  # one process, nothing to connect
  assert distributed.startup_error(1, True, None) is None  # a single-host TPU VM
  assert distributed.startup_error(4, True, 4) is None
  no_client = distributed.startup_error(4, False, None)
  assert "jax.distributed was not initialized" in no_client and "\n" not in no_client
  # A slice whose hosts did not connect: each would train alone on its own chips.
  alone = distributed.startup_error(1, False, 4)
  assert "this job has 4 processes but JAX connected only 1" in alone and "\n" not in alone
  assert "JAX connected only 2" in distributed.startup_error(2, True, 4)
  # More than the environment lists: multislice, whose slice count the metadata server holds.
  assert distributed.startup_error(8, True, 4) is None


def test_this_machine_is_one_process_and_passes_the_start_up_check():
  # No TPU here (CI, this machine), no cluster variables in the test environment.
  assert distributed.on_cloud_tpu_vm() is False
  distributed.check_started(None)
