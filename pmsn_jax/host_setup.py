"""XLA:CPU process settings that made the train step faster on the CPUs measured in
docs/performance.md. Nothing here runs on import: the command-line entry points apply them
(`tune_cpu`) unless run with --nocpu_tuning; library users call `tune_cpu()` themselves, first
thing, if they want them. GPU and TPU runs are unaffected.

Both must be in place before the process starts JAX's CPU backend, and each is left alone where
the user set their own value:
  * `use_eigen_dots`: XLA reads its flags when JAX opens the backend;
  * `exec_with_huge_page_malloc`: glibc reads its tunables only when a process starts, so it
    re-executes the command.
"""

from __future__ import annotations

import os
import platform
import sys

# XLA:CPU in the pinned jaxlib hands every matmul to YNNPACK; on the AVX2 CPUs measured here its
# f32 GEMM ran the ViT's [4296, 192] x [192, 768] at 52-69 GFLOP/s per core against Eigen's 71-86
# (PyTorch's 73-80), and the Ti/16 step ran faster with Eigen's dots. GPU and TPU compilations do
# not read the flag.
YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
HUGE_PAGE_MALLOC = "glibc.malloc.hugetlb=1"


def tune_cpu() -> None:
  """Both settings below; call before anything uses JAX (it may re-execute the process)."""
  use_eigen_dots()
  exec_with_huge_page_malloc()


def use_eigen_dots() -> None:
  if YNN_FUSION_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {YNN_FUSION_FLAG}=".strip()


def exec_with_huge_page_malloc() -> None:
  """Re-executes this command with GLIBC_TUNABLES += glibc.malloc.hugetlb=1, once.

  XLA:CPU allocates one temporary buffer per executable run (972 MB for the Ti/16 official-views
  step) on a worker thread, where glibc maps an allocation that large afresh and unmaps it on
  free: every step faults in ~237,000 new 4 KiB pages, 0.6 s of kernel time in a 3.6 s
  single-threaded step. Asked to back its memory with transparent huge pages, glibc takes ~800
  faults per step instead. (Keeping the buffer instead, with one malloc arena and no mmap, made
  tf.data 23% slower in the demo.) Does nothing off glibc, or where the user chose a malloc:
  a glibc.malloc tunable (glibc.malloc.hugetlb=0 opts out), MALLOC_CONF, or an LD_PRELOAD naming
  a malloc library (jemalloc with MALLOC_CONF=oversize_threshold:0 keeps the buffer: faster
  still for Ti/16, at +40% peak memory; docs/performance.md).
  """
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  if (sys.platform != "linux" or platform.libc_ver()[0] != "glibc" or "glibc.malloc" in tunables
      or "MALLOC_CONF" in os.environ or "malloc" in os.environ.get("LD_PRELOAD", "")):
    return
  env = {**os.environ, "GLIBC_TUNABLES": ":".join(filter(None, [tunables, HUGE_PAGE_MALLOC]))}
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
