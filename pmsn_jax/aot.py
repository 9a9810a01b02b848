"""Pre-flight for a TPU slice, on any machine: compile the real train step for a topology.

  python -m pmsn_jax.aot --config=configs/<file>.py[:arg] --topology=v5e:4x4 [--num_slices=2]
                         [--config.<key>=<value> ...]

Deviceless ahead-of-time compilation (as MaxText's train_compile): with libtpu installed,
`jax.experimental.topologies` describes the slice's chips, `program.build` lays the config's
mesh over them and the train step and the evaluation forward that train.py runs are compiled
for them, here, without a TPU. Printed: per-chip HBM (arguments, outputs, temporaries) against
the chip's capacity, FLOPs and HBM bytes per step, the collectives' bytes, and a roofline
estimate of the step time.

The estimate is a bound, not a measurement. Its terms, per chip per step:
  compute = FLOPs / dense bf16 peak;  memory = HBM bytes accessed / HBM bandwidth;
  collectives = sum of collective bytes / ICI bandwidth (all-reduce counted twice: a ring
  reduce-scatter + all-gather), with ICI bandwidth = 2 links x the one-way link bandwidth (a
  bidirectional ring on one mesh axis);
  step >= max(compute, memory, collectives), reached only if XLA overlaps them perfectly.
MFU = compute / step, with FLOPs as XLA counts them (remat's recomputation included).
FLOPs, bytes and collectives come from two shallow compiles of the same program (depth 1 and
2): XLA's cost analysis counts a scanned loop body once, and every block costs the same, so
X(depth) = X(1) + (depth - 1) (X(2) - X(1)) is exact where a full-depth count is not.

Exit status: 0 when the step fits the chip; 3 when it does not (one line on stderr with the
figure and the levers); 2 on bad input (unknown topology, bad config value, no libtpu).
The last stdout line is machine-readable:
  topology=<name> chips=<N> per_chip_gib=<X> capacity_gib=<Y> fits=<yes|no>
  est_img_per_s=<Z> est_mfu=<W>
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import time

# A deviceless compile must not probe the GCE metadata server, look for TPU workers or take
# the TPU (JAX runs on the CPU here; libtpu only compiles), and may run beside another
# process that loaded libtpu. A user's own values are kept.
for _key, _value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                     ("TPU_ACCELERATOR_TYPE", "v5litepod-4"), ("JAX_PLATFORMS", "cpu"),
                     ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
  os.environ.setdefault(_key, _value)

from absl import app, flags  # noqa: E402

USER_ERROR_EXIT = 2
DOES_NOT_FIT_EXIT = 3
GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """Published per-chip figures (Cloud TPU docs; ICI from the JAX scaling book)."""
  name: str
  hbm_gib: float
  bf16_flops: float        # dense bf16 peak, FLOP/s
  hbm_bytes_per_s: float
  ici_link_bytes_per_s: float  # one way, one link
  chip_config: str | None = None  # libtpu's chip config: v4 as one device per chip

  @property
  def ici_bytes_per_s(self) -> float:
    return 2 * self.ici_link_bytes_per_s


CHIPS = {
    "v4": Chip("TPU v4", 32, 275e12, 1.2e12, 4.5e10, chip_config="megacore"),
    "v5e": Chip("TPU v5e", 16, 197e12, 8.1e11, 4.5e10),
    "v5p": Chip("TPU v5p", 95, 459e12, 2.76e12, 9e10),
    "v6e": Chip("TPU v6e", 32, 918e12, 1.64e12, 9e10),
}
TOPOLOGY_EXAMPLES = ("v4:2x2x1 (v4-8), v4:2x2x4 (v4-32), v5e:2x2, v5e:4x4, v5e:16x16, v5p:2x2x4, "
                     "v6e:4x4")
_TOPOLOGY = re.compile(r"^(?P<gen>v4|v5e|v5p|v6e):(?P<shape>\d+x\d+(x\d+)?)$")
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
# `%name = <result shape> <op>(`: the synchronous op or the -done half of an async pair (whose
# result is the collective's output; the -start half would count it twice).
_COLLECTIVE_LINE = re.compile(
    r"=\s*(?P<shape>.+?)\s+(?P<op>" + "|".join(COLLECTIVES) + r")(?P<done>-done)?\(")
_COLLECTIVE_START = re.compile(r"\b(" + "|".join(COLLECTIVES) + r")-start\(")
_ARRAY = re.compile(r"\b(?P<dtype>[a-z]+\d*)\[(?P<dims>[\d,]*)\]")


class UserError(ValueError):
  """Bad input: reported as one line, exit status 2."""


def chip_of(topology: str) -> Chip:
  match = _TOPOLOGY.match(topology or "")
  if not match:
    raise UserError(f"--topology={topology!r} is not <generation>:<chips shape>; valid examples: "
                    f"{TOPOLOGY_EXAMPLES}")
  return CHIPS[match["gen"]]


def topology_devices(topology: str, num_slices: int = 1) -> list:
  """The TPU devices of `num_slices` slices of `topology`, from libtpu (no TPU needed)."""
  chip = chip_of(topology)
  try:
    import libtpu  # noqa: F401  pylint: disable=unused-import
  except ImportError:
    raise UserError('libtpu is not installed: pip install "jax[tpu]" (the same version as '
                    'jax; see requirements.txt), then run this again') from None
  from jax.experimental import topologies
  kwargs = {"chip_config_name": chip.chip_config} if chip.chip_config else {}
  if num_slices > 1:
    kwargs["num_slices"] = num_slices
  try:
    return topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                        **kwargs).devices
  except Exception as e:  # libtpu's INVALID_ARGUMENT for shapes it does not know
    raise UserError(f"--topology={topology!r}: {str(e).splitlines()[0][:160]}; valid examples: "
                    f"{TOPOLOGY_EXAMPLES}") from None


def array_shapes(shape_text: str) -> list[tuple[str, tuple[int, ...]]]:
  """(dtype, dims) of each array in an HLO shape, e.g. 'bf16[8,128]{1,0}' or a tuple."""
  return [(m["dtype"], tuple(int(d) for d in m["dims"].split(",") if d))
          for m in _ARRAY.finditer(shape_text)]


def array_bytes(shape_text: str) -> int:
  """Bytes of an HLO shape (all its arrays)."""
  return sum(math.prod(dims) * _DTYPE_BYTES.get(dtype, 4)
             for dtype, dims in array_shapes(shape_text))


def collective_ops(hlo_text: str):
  """(kind, result shape text) of every collective instruction of a compiled HLO module,
  counting an async pair once (its -done half)."""
  for line in hlo_text.splitlines():
    match = _COLLECTIVE_LINE.search(line)
    if match and not _COLLECTIVE_START.search(line):
      yield match["op"], match["shape"]


def collective_bytes(hlo_text: str) -> dict[str, int]:
  """Per chip: the bytes each kind of collective produces in a compiled module, summed over
  its instructions (each executed once: see the module docstring for scanned loops)."""
  totals = dict.fromkeys(COLLECTIVES, 0)
  for kind, shape in collective_ops(hlo_text):
    totals[kind] += array_bytes(shape)
  return totals


def collective_counts(hlo_text: str) -> dict[str, int]:
  """How many instructions of each collective a compiled module holds."""
  counts = dict.fromkeys(COLLECTIVES, 0)
  for kind, _ in collective_ops(hlo_text):
    counts[kind] += 1
  return counts


def loops_in(hlo_text: str) -> int:
  """How many while loops a compiled module holds. The shallow programs have none of their own
  (their one scanned block runs once), so these are loops XLA made, such as the windowed
  (collective) matmuls of some FSDP products, whose bodies its cost analysis counts once."""
  return len(re.findall(r"\swhile\(", hlo_text))


@dataclasses.dataclass
class Costs:
  """Per chip per step; `loops`: repeated loops whose bodies the figures count once."""
  flops: float
  hbm_bytes: float
  collectives: dict[str, float]
  loops: int = 0

  def __sub__(self, other: "Costs") -> "Costs":
    return Costs(self.flops - other.flops, self.hbm_bytes - other.hbm_bytes,
                 {k: v - other.collectives[k] for k, v in self.collectives.items()},
                 max(self.loops, other.loops))

  def plus(self, other: "Costs", times: float) -> "Costs":
    return Costs(self.flops + times * other.flops, self.hbm_bytes + times * other.hbm_bytes,
                 {k: v + times * other.collectives[k] for k, v in self.collectives.items()},
                 max(self.loops, other.loops))


def costs_of(compiled) -> Costs:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  text = compiled.as_text()
  return Costs(float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0)),
               {k: float(v) for k, v in collective_bytes(text).items()}, loops_in(text))


def step_costs(config, devices) -> Costs:
  """FLOPs, HBM bytes and collective bytes of the full-depth step, from depth 1 and 2."""
  from pmsn_jax import program, sharding
  from pmsn_jax.models import vit
  depth = vit.vit_config_from(config, "tpu").depth
  shallow = []
  for d in (1, 2):
    c = _copy(config)
    c.model.depth = d
    shallow.append(costs_of(program.build(c, sharding.make_mesh(c.mesh, devices), "tpu")
                            .lower_train_step().compile()))
  return shallow[0].plus(shallow[1] - shallow[0], depth - 1)


def _copy(config):
  c = config.copy_and_resolve_references()
  c.unlock()
  return c


@dataclasses.dataclass
class Estimate:
  compute_s: float
  memory_s: float
  collective_s: float

  @property
  def step_s(self) -> float:
    return max(self.compute_s, self.memory_s, self.collective_s)

  @property
  def mfu(self) -> float:
    return self.compute_s / self.step_s if self.step_s > 0 else 0.0

  @property
  def bound(self) -> str:
    terms = {"compute": self.compute_s, "HBM bandwidth": self.memory_s,
             "ICI collectives": self.collective_s}
    return max(terms, key=terms.get)


def roofline(costs: Costs, chip: Chip) -> Estimate:
  moved = sum(v * (2 if k == "all-reduce" else 1) for k, v in costs.collectives.items())
  return Estimate(costs.flops / chip.bf16_flops, costs.hbm_bytes / chip.hbm_bytes_per_s,
                  moved / chip.ici_bytes_per_s)


def resource_exhausted_bytes(message: str) -> int | None:
  """The byte count in XLA's RESOURCE_EXHAUSTED compile error, if it gives one."""
  match = re.search(r"([\d.]+)([GM])\b", message)
  if not match:
    return None
  return int(float(match[1]) * (GiB if match[2] == "G" else 2 ** 20))


def preflight(config, topology: str, num_slices: int = 1, *, out=print) -> int:
  """Compiles, reports, and returns the exit status (0 fits, 3 does not)."""
  from pmsn_jax import program, sharding, validation
  chip = chip_of(topology)
  devices = topology_devices(topology, num_slices)
  try:
    validation.validate(config)
    mesh = sharding.make_mesh(config.mesh, devices)
    sharding.check_batch_size(config.batch_size, mesh,
                              processes=len({d.process_index for d in devices}))
  except (ValueError, KeyError) as e:
    raise UserError(str(e).splitlines()[0]) from None
  name = topology + (f" x {num_slices} slices" if num_slices > 1 else "")
  prog = program.build(config, mesh, "tpu")
  v = prog.vit_cfg
  out(f"{name}: {len(devices)} {chip.name} chips, mesh {dict(mesh.shape)}; model "
      f"{config.model.variant} ({v.dtype}, remat {'on' if v.remat else 'off'}), global batch "
      f"{config.batch_size} ({config.batch_size // sharding.batch_shards(mesh)} per batch shard)")

  start = time.perf_counter()
  capacity = chip.hbm_gib * GiB
  try:
    compiled = prog.lower_train_step().compile()
  except Exception as e:  # XLA: the program does not fit the chip's memory
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    needed = resource_exhausted_bytes(str(e))
    figure = f"{needed / GiB:.2f} GiB" if needed else "more than the chip has"
    out(f"train step: does not compile for {chip.name}: {figure} per chip, HBM "
        f"{chip.hbm_gib:g} GiB")
    out(_last_line(topology, len(devices), (needed or 0) / GiB, chip.hbm_gib, False, None,
                   None))
    _say_levers(figure, chip)
    return DOES_NOT_FIT_EXIT
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  per_chip = (memory.argument_size_in_bytes + memory.output_size_in_bytes
              - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
  fits = per_chip <= capacity
  out(f"train step compiled in {compile_s:.0f} s; per chip: arguments "
      f"{memory.argument_size_in_bytes / GiB:.2f} GiB, outputs "
      f"{memory.output_size_in_bytes / GiB:.2f} GiB (aliased "
      f"{memory.alias_size_in_bytes / GiB:.2f}), temporaries {memory.temp_size_in_bytes / GiB:.2f}"
      f" GiB; total {per_chip / GiB:.2f} of {chip.hbm_gib:g} GiB HBM "
      f"({100 * (1 - per_chip / capacity):.0f}% headroom)")
  counts = collective_counts(compiled.as_text())
  out("collective instructions in the compiled step: "
      + " ".join(f"{k}={counts[k]}" for k in COLLECTIVES))

  eval_memory = prog.lower_eval_forward().compile().memory_analysis()
  out(f"eval forward (batch {config.eval.batch_size}) compiled; per chip: temporaries "
      f"{eval_memory.temp_size_in_bytes / GiB:.2f} GiB")

  costs = step_costs(config, devices)
  estimate = roofline(costs, chip)
  img_per_s = config.batch_size / estimate.step_s if estimate.step_s > 0 else 0.0
  out(f"per chip per step: {costs.flops / 1e12:.2f} TFLOP, HBM {costs.hbm_bytes / 1e9:.1f} GB")
  if costs.loops:
    out(f"warning: XLA made {costs.loops} loops (e.g. collective matmuls) whose bodies its "
        "cost analysis counts once: FLOPs and bytes are under-counted, so the estimate below "
        "is optimistic")
  out("collectives: " + " ".join(f"{k}={costs.collectives[k] / 1e9:.3f}GB" for k in COLLECTIVES))
  out(f"estimate (a roofline bound, not a measurement): compute {estimate.compute_s * 1e3:.1f} ms"
      f", HBM {estimate.memory_s * 1e3:.1f} ms, collectives {estimate.collective_s * 1e3:.1f} ms"
      f" -> step >= {estimate.step_s * 1e3:.1f} ms ({estimate.bound}-bound), "
      f"{img_per_s:.0f} img/s, MFU {estimate.mfu:.2f}; {config.total_steps} steps in "
      f">= {config.total_steps * estimate.step_s / 3600:.1f} h")
  views = roofline(costs_of(prog.lower_device_views().compile()), chip)
  out(f"of which the on-device views (colour jitter, grayscale, blur, normalisation of the "
      f"uint8 views): >= {views.step_s * 1e3:.2f} ms ({views.bound}-bound), "
      f"{100 * views.step_s / estimate.step_s:.1f}% of the step")
  out(_last_line(topology, len(devices), per_chip / GiB, chip.hbm_gib, fits, img_per_s,
                 estimate.mfu))
  if not fits:
    _say_levers(f"{per_chip / GiB:.2f} GiB", chip)
    return DOES_NOT_FIT_EXIT
  return 0


def _last_line(topology, chips, per_chip_gib, capacity_gib, fits, img_per_s, mfu) -> str:
  fmt = lambda x, spec: "n/a" if x is None else format(x, spec)  # noqa: E731
  return (f"topology={topology} chips={chips} per_chip_gib={per_chip_gib:.2f} "
          f"capacity_gib={capacity_gib:g} fits={'yes' if fits else 'no'} "
          f"est_img_per_s={fmt(img_per_s, '.0f')} est_mfu={fmt(mfu, '.3f')}")


def _say_levers(figure: str, chip: Chip) -> None:
  print(f"does not fit: the train step needs {figure} per chip, a {chip.name} has "
        f"{chip.hbm_gib:g} GiB; levers: a larger fsdp axis (--config.mesh), "
        "--config.model.remat=True, --config.compute_dtype=bfloat16, or a smaller per-chip "
        "batch (--config.batch_size or more chips)", file=sys.stderr)


from pmsn_jax import main as cli  # noqa: E402  --config and its one-line flag errors

_TOPOLOGY_FLAG = flags.DEFINE_string("topology", None, f"TPU topology, e.g. {TOPOLOGY_EXAMPLES}.")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices joined over the data-center "
                                   "network (multi-slice: the data axis spans them).")
flags.declare_key_flag("config")
flags.FLAGS.set_default("workdir", "")  # main.py's flag; a pre-flight writes nothing


def main(argv):
  del argv
  try:
    if not _TOPOLOGY_FLAG.value:
      raise UserError(f"--topology is required, e.g. {TOPOLOGY_EXAMPLES}")
    if _NUM_SLICES.value < 1:
      raise UserError(f"--num_slices={_NUM_SLICES.value} must be >= 1")
    status = preflight(flags.FLAGS.config, _TOPOLOGY_FLAG.value, _NUM_SLICES.value)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(USER_ERROR_EXIT)
  sys.exit(status)


def run():
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
  run()
