"""Memory the compiled train step needs with and without per-block remat (XLA's analysis).

  python benchmarks/remat_memory.py [--models=B/16,L/16] [--batch_size=32]
      [--compute_dtype=float32] [--config=configs/pmsn_vits16_inat18.py]

For each model the official-views train step (configs/common.py: 1 target 224, 1 anchor 224
masked at 0.15, 10 focal 96) is lowered and compiled for one device from abstract shapes
(nothing is allocated, nothing runs), once with `model.remat=False` and once with True, and
`compiled.memory_analysis()` is read: temp bytes are the activations and workspace XLA keeps
alive inside the step, argument bytes the train state and batch. Remat trades the stored
per-block activations for a second forward pass of each block in backward.
The last lines are machine-readable:
  model=<m> remat=<0|1> temp_bytes=<t> argument_bytes=<a> output_bytes=<o> compile_s=<s>
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from pmsn_jax import sharding, step  # noqa: E402
from pmsn_jax.models import vit  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "configs", "pmsn_vits16_inat18.py"), "Heads and views.")
_MODELS = flags.DEFINE_list("models", ["B/16", "L/16"], "ViT variants.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Images per step (one device).")
_DTYPE = flags.DEFINE_enum("compute_dtype", "float32", vit.COMPUTE_DTYPES, "Matmul dtype.")

MiB = 2 ** 20


def compiled_memory(config):
  """-> (memory_analysis, compile seconds) of the train step for `config` on one device."""
  mesh = sharding.make_mesh((("data", 1), ("fsdp", 1), ("tensor", 1)), jax.devices()[:1])
  vit_cfg = vit.vit_config_from(config)
  graphdef, tx, scheds, create_state = step.build(config, vit_cfg)
  abstract = jax.eval_shape(create_state)
  batch = step.abstract_batch(config)
  train_step = jax.jit(
      step.make_train_step(graphdef, tx, scheds, config),  # train.py's step
      in_shardings=(sharding.state_shardings(abstract, mesh),
                    sharding.step_input_shardings(batch, mesh)),
      donate_argnums=0)
  t = time.perf_counter()
  compiled = train_step.lower(abstract, batch).compile()
  return compiled.memory_analysis(), time.perf_counter() - t


def main(argv):
  del argv
  rows = []
  for variant in _MODELS.value:
    for remat in (False, True):
      config = _CONFIG.value.copy_and_resolve_references()
      config.model.variant = variant
      config.model.remat = remat
      config.batch_size = _BATCH.value
      config.compute_dtype = _DTYPE.value
      memory, compile_s = compiled_memory(config)
      rows.append(dict(model=variant, remat=int(remat), temp=memory.temp_size_in_bytes,
                       argument=memory.argument_size_in_bytes,
                       output=memory.output_size_in_bytes, compile_s=compile_s))
  print(f"backend={jax.default_backend()} batch={_BATCH.value} compute_dtype={_DTYPE.value}")
  print("| model | remat | temp MiB (activations) | state+batch MiB | compile s |")
  print("|---|---|---:|---:|---:|")
  for r in rows:
    print(f"| ViT-{r['model']} | {'yes' if r['remat'] else 'no'} | {r['temp'] / MiB:.0f} | "
          f"{r['argument'] / MiB:.0f} | {r['compile_s']:.1f} |")
  for r in rows:
    print(f"model={r['model']} remat={r['remat']} temp_bytes={r['temp']} "
          f"argument_bytes={r['argument']} output_bytes={r['output']} "
          f"compile_s={r['compile_s']:.1f}")


if __name__ == "__main__":
  app.run(main)
