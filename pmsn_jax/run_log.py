"""What the train loop reports, and when: the periodic-action rule, the profiler window, and the
one-line summaries a run prints (parameters, the compiled step, input-bound warnings, memory)."""

from __future__ import annotations

import math
import os
import resource

import jax

from pmsn_jax import sharding


def due(step: int, every: int, last: int | None = None) -> bool:
  """Whether a periodic action (log, checkpoint, ... every `every` steps; 0 = never) runs at
  `step`; `last` (the final step) always runs it. A predicate rather than clu-style callbacks:
  the loop decides before acting, so that one host sync serves both logging and saving and a
  non-finite state is never saved."""
  return bool(every) and step % every == 0 or step == last


class StepProfiler:
  """A jax.profiler trace of steps first .. first + steps - 1 into WORKDIR/plugins/profile
  (TensorBoard's Profile tab, with the tensorboard-plugin-profile package). steps=0: off."""

  def __init__(self, workdir, *, first: int, steps: int):
    self.workdir, self.first, self.last = os.fspath(workdir), first, first + steps - 1
    self.active = False

  def before(self, step: int) -> None:
    if step == self.first and self.last >= self.first:
      jax.profiler.start_trace(self.workdir)
      self.active = True

  def after(self, step: int, result) -> None:
    if self.active and step == self.last:
      jax.block_until_ready(result)  # the trace holds the traced steps' device work
      self.close()

  def close(self) -> None:
    if self.active:
      self.active = False
      jax.profiler.stop_trace()
      if jax.process_index() == 0:
        print(f"profile of steps {self.first}-{self.last} in {self.workdir}/plugins/profile",
              flush=True)


def parameter_summary(params) -> str:
  """'model: N trained parameters (online: encoder a, head b; prototypes c)'."""
  counts = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    names = tuple(sharding.path_string(path).split("/")[:2])
    counts[names] = counts.get(names, 0) + math.prod(leaf.shape)
  groups = {}
  for (top, *sub), n in counts.items():
    groups.setdefault(top, []).append((sub[0] if sub else "", n))
  parts = [f"{top}: " + ", ".join(f"{name} {_millions(n)}" if name else _millions(n)
                                  for name, n in subs) for top, subs in groups.items()]
  return f"model: {_millions(sum(counts.values()))} trained parameters ({'; '.join(parts)})"


def _millions(n: int) -> str:
  return f"{n / 1e6:.2f}M" if n >= 10_000 else str(n)


INPUT_BOUND_PCT = 5.0  # Input wait, in % of the wall time, that is worth a warning.


def input_bound_warning(scalars) -> str:
  return (f"warning: input-bound: the devices waited {scalars['input_wait_pct']:.0f}% of the "
          f"time ({scalars['input_wait_ms']:.0f} ms per step) for host "
          f"{scalars['input_slowest_host']:.0f}'s batches, which delivers "
          f"{scalars['host_img_per_s']:.0f} img/s; levers: more CPU cores per host, images stored "
          f"smaller (long side <= 512 px decodes ~2x faster), data nearer the hosts "
          f"(docs/data.md, Feeding the chips)")


def peak_rss_mib() -> float:
  """High-water mark of this process's resident memory (Linux reports KiB, macOS bytes)."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak / 2 ** 20 if os.uname().sysname == "Darwin" else peak / 2 ** 10


def compiled_summary(compiled) -> str:
  """Per-device memory and FLOPs of a compiled step, as XLA reports them."""
  parts = []
  memory = compiled.memory_analysis()
  if memory is not None:
    gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
    parts.append(f"per device: arguments {gib(memory.argument_size_in_bytes)}, temporaries "
                 f"{gib(memory.temp_size_in_bytes)}, outputs {gib(memory.output_size_in_bytes)}"
                 f" (aliased {gib(memory.alias_size_in_bytes)})")
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  if cost and "flops" in cost:
    parts.append(f"{cost['flops'] / 1e9:.1f} GFLOP per step per device as XLA counts them "
                 f"(scanned blocks, as on TPU, count once; benchmarks/train_step.py counts all)")
  return "compiled train step: " + "; ".join(parts or ["no analysis from this backend"])
