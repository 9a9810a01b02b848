"""Host settings for XLA:CPU (pmsn_jax/host_setup.py), which the entry points apply and a plain
`import pmsn_jax` does not: matmuls on Eigen instead of YNNPACK, and a re-execution with glibc's
malloc on transparent huge pages, so that XLA's per-run temporary buffer, mapped afresh every
run, faults in 2 MiB pages instead of 4 KiB ones. Each keeps what the user set."""

import os
import pathlib
import subprocess
import sys

import pytest

from pmsn_jax import host_setup

# Fresh processes: XLA reads its flags when JAX opens the CPU backend, and glibc its tunables
# when a process starts. JAX is imported first, as user code often does.
DOT_PROBE = """
import os
import jax, jax.numpy as jnp
from pmsn_jax import host_setup
host_setup.use_eigen_dots()
hlo = jax.jit(lambda a, b: a @ b).lower(jnp.ones((64, 32)), jnp.ones((32, 16))).compile().as_text()
print(os.environ["XLA_FLAGS"])
print("__ynn_fusion" in hlo)
"""

# A run whose [131072, 256] float32 matmul result (128 MiB) is an XLA temporary buffer.
FAULT_PROBE = """
import resource
import jax, jax.numpy as jnp
from pmsn_jax import host_setup
host_setup.use_eigen_dots()  # Eigen's dot, whose result is the temporary (YNN fuses the max)
largest = jax.jit(lambda x, w: (x @ w).max())
x, w = jnp.ones((131072, 64)), jnp.ones((64, 256))
largest(x, w).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
  largest(x, w).block_until_ready()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 3)
"""
EXEC_PROBE = """
import os
from pmsn_jax import host_setup
print(os.environ.get("GLIBC_TUNABLES"))
host_setup.exec_with_huge_page_malloc()
"""
TEMP_PAGES = 131072 * 256 * 4 // 4096


def run(probe: str, **env_changes: str | None) -> list[str]:
  env = {k: v for k, v in os.environ.items() if k not in env_changes}
  env.update({k: v for k, v in env_changes.items() if v is not None})
  return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                        check=True).stdout.splitlines()


IMPORT_PROBE = """
import os, pmsn_jax
print(os.environ.get("XLA_FLAGS"), os.environ.get("GLIBC_TUNABLES"))
"""


def test_import_changes_no_setting():
  assert run(IMPORT_PROBE, XLA_FLAGS=None, GLIBC_TUNABLES=None) == ["None None"]
  assert run(IMPORT_PROBE, XLA_FLAGS="--xla_cpu_use_thunk_runtime=true", GLIBC_TUNABLES=None) == [
      "--xla_cpu_use_thunk_runtime=true None"]


def test_eigen_dots_turn_off_ynnpack_dots_and_keep_other_flags():
  assert run(DOT_PROBE, XLA_FLAGS=None)[-2:] == ["--xla_cpu_experimental_ynn_fusion_type=",
                                                 "False"]
  flags, ynn = run(DOT_PROBE, XLA_FLAGS="--xla_force_host_platform_device_count=2")[-2:]
  assert flags.split() == ["--xla_force_host_platform_device_count=2",
                           "--xla_cpu_experimental_ynn_fusion_type="]
  assert ynn == "False"


def test_a_users_own_ynn_setting_is_kept():
  # Also shows the flag is live in this jaxlib: asked for, YNNPACK takes the dot.
  assert run(DOT_PROBE, XLA_FLAGS="--xla_cpu_experimental_ynn_fusion_type=dot")[-2:] == [
      "--xla_cpu_experimental_ynn_fusion_type=dot", "True"]


def test_entry_points_re_execute_once_with_huge_page_malloc():
  assert run(EXEC_PROBE, GLIBC_TUNABLES=None) == ["None", "glibc.malloc.hugetlb=1"]
  assert run(EXEC_PROBE, GLIBC_TUNABLES="glibc.rtld.nns=8") == [
      "glibc.rtld.nns=8", "glibc.rtld.nns=8:glibc.malloc.hugetlb=1"]
  # A malloc of the user's own choosing: no re-execution.
  assert run(EXEC_PROBE, GLIBC_TUNABLES="glibc.malloc.hugetlb=0") == ["glibc.malloc.hugetlb=0"]
  assert run(EXEC_PROBE, GLIBC_TUNABLES=None, MALLOC_CONF="oversize_threshold:0") == ["None"]
  # (the probe only reads LD_PRELOAD; the named library need not exist for that)
  assert run(EXEC_PROBE, GLIBC_TUNABLES=None, LD_PRELOAD="libtcmalloc_minimal.so.4") == ["None"]


THP = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")


@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(),
                    reason="transparent huge pages are off on this machine")
def test_huge_page_malloc_cuts_the_page_faults_of_a_temporary_buffer():
  faults_4k = int(run(FAULT_PROBE, GLIBC_TUNABLES="glibc.malloc.hugetlb=0")[-1])
  faults_2m = int(run(FAULT_PROBE, GLIBC_TUNABLES=host_setup.HUGE_PAGE_MALLOC)[-1])
  assert faults_4k >= TEMP_PAGES  # the buffer is mapped and faulted in afresh every run
  assert faults_2m < TEMP_PAGES // 10
