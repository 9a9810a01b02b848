"""The TPU pre-flight (pmsn_jax.aot): the real train step compiled for TPU topologies, here.

Deviceless: libtpu (a test requirement) describes the chips of a slice and compiles for them
on this CPU machine. Checked: the CLI's exit codes and last line; that under data parallelism
and head-parallel tensor parallelism the compiled ViT-S/16 step (official views: a masked
anchor at 224, focal crops at 96) moves no activations between chips beyond all-reduces; that
under FSDP only parameters are gathered and per-chip temporaries fall with the chip count.
"""

import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import demo, pmsn_vits16_inat18
from pmsn_jax import aot, program, sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytest.importorskip("libtpu")


def run_cli(*args):
  return subprocess.run([sys.executable, "-m", "pmsn_jax.aot", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=600)


def test_unknown_topology_is_one_line_listing_valid_ones():
  result = run_cli("--config=configs/demo.py:smoke", "--topology=v9:2x2")
  assert result.returncode == 2
  lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and "v5e:4x4" in lines[0] and "v4:2x2x4" in lines[0]


def test_step_too_big_for_the_chip_exits_3_with_the_figure_and_the_levers():
  result = run_cli("--config=configs/demo.py:smoke", "--topology=v5e:2x2",
                   "--config.batch_size=262144")
  assert result.returncode == 3, result.stderr[-2000:]
  last = result.stdout.strip().splitlines()[-1]
  assert re.fullmatch(r"topology=v5e:2x2 chips=4 per_chip_gib=[\d.]+ capacity_gib=16 fits=no "
                      r"est_img_per_s=n/a est_mfu=n/a", last), last
  assert float(re.search(r"per_chip_gib=([\d.]+)", last)[1]) > 16
  assert "fsdp" in result.stderr and "remat" in result.stderr


def test_preflight_of_the_smoke_config_fits_and_reports_everything():
  lines = []
  status = aot.preflight(demo.get_config("smoke"), "v5e:2x2", out=lines.append)
  assert status == 0
  text = "\n".join(lines)
  assert "4 TPU v5e chips" in text and "bfloat16" in text  # compute_dtype "auto" on TPU
  assert "warning" not in text  # data parallel: no loops of XLA's hide FLOPs from the count
  assert re.search(r"^collectives: all-gather=[\d.]+GB all-reduce=[\d.]+GB reduce-scatter="
                   r"[\d.]+GB all-to-all=0\.000GB collective-permute=0\.000GB$", text, re.M)
  views = re.search(r"^of which the on-device views .*: >= ([\d.]+) ms .*, ([\d.]+)% of the step$",
                    text, re.M)
  assert views and float(views[1]) > 0 and 0 < float(views[2]) < 100
  fields = dict(item.split("=") for item in lines[-1].split())
  assert fields["topology"] == "v5e:2x2" and fields["chips"] == "4"
  assert fields["fits"] == "yes" and float(fields["capacity_gib"]) == 16
  assert 0 < float(fields["est_mfu"]) <= 1 and float(fields["est_img_per_s"]) > 0


def test_on_device_views_are_per_example_and_move_nothing_between_chips():
  config = pmsn_vits16_inat18.get_config()
  config.unlock()
  config.batch_size = 16
  prog = program.build(config, sharding.make_mesh(config.mesh, aot.topology_devices("v5e:2x2")),
                       "tpu")
  compiled = prog.lower_device_views().compile()  # a chip's views from its own examples only
  assert not any(aot.collective_counts(compiled.as_text()).values())


def official_views_step(topology: str, mesh, batch_size: int, depth: int = 2):
  """The ViT-S/16 recipe's step (official views, K 1024), `depth` blocks, compiled for a
  TPU topology: -> (compiled, set of the trailing two dims of every parameter and its
  shards)."""
  config = pmsn_vits16_inat18.get_config()
  config.unlock()
  config.model.depth = depth
  config.batch_size = batch_size
  config.mesh = mesh
  devices = aot.topology_devices(topology)
  prog = program.build(config, sharding.make_mesh(config.mesh, devices), "tpu")
  shapes = set()
  for leaf in jax.tree.leaves((prog.abstract_state.params, prog.abstract_state.target)):
    dims = [d for d in leaf.shape if d > 1]
    for n in (1, len(devices)):
      shapes.update({tuple(dims[-2:]), (dims[-2] // n, dims[-1]) if len(dims) > 1 else (),
                     (dims[-2], dims[-1] // n) if len(dims) > 1 else ()})
  return prog.lower_train_step().compile(), shapes


def moved_arrays(hlo_text: str, op: str) -> list[tuple[int, ...]]:
  """Dims (size-1 dims dropped) of every `op` result in a compiled module."""
  return [tuple(d for d in dims if d > 1)
          for kind, shape in aot.collective_ops(hlo_text) if kind == op
          for _, dims in aot.array_shapes(shape)]


@pytest.mark.parametrize("mesh", [(("data", -1),), (("data", 2), ("tensor", 2))],
                         ids=["data", "data+tensor"])
def test_data_and_head_parallel_steps_move_no_activations(mesh):
  # Data parallel: only gradient and statistics all-reduces. Tensor parallel by heads: the
  # Megatron all-reduces after proj and fc2 too, and nothing else (no heads re-split).
  compiled, _ = official_views_step("v5e:2x2", mesh, batch_size=16)
  text = compiled.as_text()
  counts = aot.collective_counts(text)
  assert counts["all-to-all"] == 0 and counts["collective-permute"] == 0, counts
  assert counts["all-reduce"] > 0
  assert aot.collective_bytes(text)["all-gather"] <= 64 * 1024  # per-example labels at most


def test_fsdp_moves_only_parameters_and_temporaries_fall_with_chips():
  on4, shapes = official_views_step("v5e:2x2", (("data", 1), ("fsdp", -1)), batch_size=16)
  on8, shapes8 = official_views_step("v5e:2x4", (("data", 1), ("fsdp", -1)), batch_size=16)
  for compiled, params in ((on4, shapes), (on8, shapes8)):
    text = compiled.as_text()
    assert aot.collective_counts(text)["all-to-all"] == 0
    # Parameters (whole, or an fsdp shard of one) are what is gathered or passed around. The
    # token stream (batch x 539 tokens x 384) never is; per-view rows (batch x 11 views x at
    # most the head's 2048 units) may be: XLA computes the gradients of the fsdp-sharded head
    # kernels from gathered rows (docs/tpu.md).
    per_view_rows = 16 * 11 * 2048
    for op in ("all-gather", "collective-permute"):
      for dims in moved_arrays(text, op):
        assert dims[-2:] in params or np.prod(dims) <= per_view_rows, (op, dims)
  temp4 = on4.memory_analysis().temp_size_in_bytes
  temp8 = on8.memory_analysis().temp_size_in_bytes
  assert temp8 < 0.6 * temp4, (temp4, temp8)


def test_without_libtpu_the_cli_says_how_to_install_it(monkeypatch):
  monkeypatch.setitem(sys.modules, "libtpu", None)  # `import libtpu` raises ImportError
  with pytest.raises(aot.UserError, match=r'pip install "jax\[tpu\]"'):
    aot.topology_devices("v5e:2x2")


def test_multi_slice_mesh_keeps_fsdp_within_a_slice_and_splits_data_over_slices():
  devices = aot.topology_devices("v5e:2x2", num_slices=2)
  mesh = sharding.make_mesh((("data", -1), ("fsdp", 2)), devices)
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
  slices = np.vectorize(lambda d: d.slice_index)(mesh.devices)
  assert all(len(set(row)) == 1 for row in slices)  # fsdp collectives stay on ICI
  assert sorted(set(slices[:, 0])) == [0, 1]  # only the data axis crosses the DCN
  with pytest.raises(ValueError, match="multiple of the 2 slices"):
    sharding.make_mesh((("data", 1), ("fsdp", -1)), devices)
