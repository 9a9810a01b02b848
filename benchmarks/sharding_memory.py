"""Per-device bytes of the PMSN train state under data parallelism vs FSDP (vs FSDP + tensor).

  python benchmarks/sharding_memory.py [--config=configs/pmsn_vits16_inat18.py]
      [--models=S/16,B/16,L/16] [--devices=1,2,4,8] [--strategies=dp,fsdp,fsdp+tp]

Why: whether a ViT-L/16 state fits next to its activations depends on how the state is laid
out, and we want that answer from XLA rather than from arithmetic alone. The train state is
parameters + AdamW moments + EMA target + BatchNorm statistics; with pure data parallelism
every device holds all of it, with FSDP (sharding.DEFAULT_RULES) the big leaves are split
over the fsdp axis, so the per-device share should shrink ~1/N.

Nothing is materialised: for each mesh over the first N (fake CPU) devices we lower and
compile `jax.jit(create_state, out_shardings=...)` (an init function: cheap to compile, and
no train step is compiled) and read the compiled module's per-device output size from
`memory_analysis()`. The analytic figure (sum over leaves of the bytes of one shard,
`sharding.shard_shape`) is printed beside it as a cross-check, with the unsharded total.
Heads are the official recipe's (configs/pmsn_vits16_inat18.py); only model.variant changes.

Strategies: dp = mesh data=N; fsdp = data=1, fsdp=N; fsdp+tp = data=1, fsdp=N/2, tensor=2.
The last lines are machine-readable, one per table row:
  model=<m> devices=<n> strategy=<dp|fsdp|fsdp+tp> per_device_bytes=<b> source=<compiled|analytic>
(source=analytic only where XLA's memory analysis gave nothing on this backend).
"""

from __future__ import annotations

import math
import os
import sys
import time

# Fake 8 CPU devices before jax is imported (as tests/conftest.py does), unless already set.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# The fake devices exist on the CPU backend only; the layout arithmetic is the same anywhere.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from pmsn_jax import sharding, step  # noqa: E402
from pmsn_jax.models import vit  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(_ROOT, "configs", "pmsn_vits16_inat18.py"),
    "Experiment config (heads, partition rules); model.variant is overridden per row.",
    lock_config=True)
_MODELS = flags.DEFINE_list("models", ["S/16", "B/16", "L/16"], "model.variant values.")
_DEVICES = flags.DEFINE_list("devices", ["1", "2", "4", "8"], "Device counts N.")
_STRATEGIES = flags.DEFINE_list("strategies", ["dp", "fsdp", "fsdp+tp"],
                                "dp (data=N) | fsdp (fsdp=N) | fsdp+tp (fsdp=N/2, tensor=2).")

MiB = 2 ** 20
# Output buffer sizes are fixed by shapes and shardings at buffer assignment; LLVM's
# optimisation level only changes the generated code, and level 0 compiles ~4x faster here.
_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def mesh_config(strategy: str, n: int):
  """The config.mesh of a strategy on n devices, or None where it does not apply."""
  if strategy == "dp":
    return (("data", n), ("fsdp", 1), ("tensor", 1))
  if strategy == "fsdp":
    return (("data", 1), ("fsdp", n), ("tensor", 1))
  if strategy == "fsdp+tp":
    return None if n < 2 or n % 2 else (("data", 1), ("fsdp", n // 2), ("tensor", 2))
  raise ValueError(f"--strategies: unknown {strategy!r}; use dp, fsdp or fsdp+tp.")


def leaf_bytes(x, shape=None) -> int:
  shape = x.shape if shape is None else shape
  return math.prod(shape) * np.dtype(x.dtype).itemsize


def analytic_per_device(abstract, shardings) -> int:
  """Bytes of one device's shards: each leaf's shard shape (its size / its number of shards)."""
  sizes = jax.tree.map(lambda x, s: leaf_bytes(x, s.shard_shape(x.shape)), abstract, shardings)
  return sum(jax.tree.leaves(sizes))


def compiled_per_device(create_state, shardings) -> int | None:
  """Per-device output bytes of the compiled init, or None if XLA reports nothing here."""
  compiled = jax.jit(create_state, out_shardings=shardings).lower().compile(
      compiler_options=_COMPILER_OPTIONS)
  stats = compiled.memory_analysis()
  size = getattr(stats, "output_size_in_bytes", None) if stats is not None else None
  return int(size) if size else None


def breakdown(abstract) -> str:
  """Unsharded MiB of each part of the state, to see where the bytes are."""
  parts = {"params": abstract.params, "opt": abstract.opt_state, "ema": abstract.target,
           "bn": abstract.batch_stats}
  return " ".join(f"{k}={sum(leaf_bytes(x) for x in jax.tree.leaves(v)) / MiB:.1f}"
                  for k, v in parts.items())


def main(argv):
  del argv
  t0 = time.perf_counter()
  counts = [int(n) for n in _DEVICES.value]
  if max(counts) > jax.device_count():
    raise ValueError(f"--devices asks for {max(counts)} but only {jax.device_count()} "
                     f"{jax.default_backend()} devices exist "
                     f"(XLA_FLAGS={os.environ['XLA_FLAGS']!r}).")
  rows, summaries = [], []
  for variant in _MODELS.value:
    config = _CONFIG.value.copy_and_resolve_references()
    config.model.variant = variant
    vit_cfg = vit.vit_config_from(config)
    _, _, _, create_state = step.build(config, vit_cfg)
    abstract = jax.eval_shape(create_state)
    total = sum(leaf_bytes(x) for x in jax.tree.leaves(abstract))
    summaries.append(f"ViT-{variant}: {total / MiB:.1f} MiB unsharded "
                     f"({total} bytes; MiB {breakdown(abstract)})")
    cache = {}  # mesh layout -> (compiled, analytic): N=1 meshes coincide for every strategy
    base = None
    for n in counts:
      for strategy in _STRATEGIES.value:
        mesh_cfg = mesh_config(strategy, n)
        if mesh_cfg is None:
          continue
        mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:n])
        key = tuple(sorted((a, s) for a, s in mesh.shape.items() if s > 1))
        if key not in cache:
          shardings = sharding.state_shardings(abstract, mesh, config.partition_rules,
                                               config.fsdp_min_size)
          cache[key] = (compiled_per_device(create_state, shardings),
                        analytic_per_device(abstract, shardings))
        compiled, analytic = cache[key]
        per_device = compiled if compiled is not None else analytic
        base = per_device if base is None else base
        rows.append(dict(model=variant, devices=n, strategy=strategy, compiled=compiled,
                         analytic=analytic, per_device=per_device, ratio=per_device / base,
                         source="compiled" if compiled is not None else "analytic"))

  print(f"backend={jax.default_backend()} devices={jax.device_count()} "
        f"heads: hidden={config.model.hidden_dim} output={config.model.output_dim} "
        f"prototypes={config.model.num_prototypes}")
  for line in summaries:
    print(line)
  if any(r["compiled"] is None for r in rows):
    print("NOTE: XLA's memory_analysis() gave no output size for rows marked n/a; their "
          "per_device_bytes below are the ANALYTIC figure (source=analytic).")
  print()
  print("| model | devices | strategy | per-device MiB (compiled) | analytic MiB | vs 1 device |")
  print("|---|---:|---|---:|---:|---:|")
  for r in rows:
    compiled = "n/a" if r["compiled"] is None else f"{r['compiled'] / MiB:.1f}"
    print(f"| ViT-{r['model']} | {r['devices']} | {r['strategy']} | {compiled} | "
          f"{r['analytic'] / MiB:.1f} | {r['ratio']:.3f} |")
  print()
  print(f"wall_s={time.perf_counter() - t0:.1f}")
  for r in rows:
    print(f"model={r['model']} devices={r['devices']} strategy={r['strategy']} "
          f"per_device_bytes={r['per_device']} source={r['source']}")


if __name__ == "__main__":
  app.run(main)
