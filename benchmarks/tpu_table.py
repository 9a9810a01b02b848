"""docs/tpu.md's table: the pre-flight (python -m pmsn_jax.aot) for each model, slice and mesh.

  python benchmarks/tpu_table.py [--models=S,B,L] [--topologies=v4:2x2x1,v4:2x2x4,...]
      [--meshes=default,dp,fsdp] [--jobs=1] [--out=DIR]

Each row is one subprocess of the pre-flight CLI on the inat18 config of that size (the official
recipe: global batch 1024, 1 target + 1 masked anchor at 224 + 10 focal at 96, K 1024), with
`config.mesh` replaced for dp (data only) and fsdp (fsdp only). Its full output goes to
DIR/<row>.txt; a markdown row, with the command, is printed as each finishes. Hours are for 300
epochs of iNaturalist 2018 (437,513 images) at the estimated img/s: an estimate, not a
measurement (docs/tpu.md says how it is made).
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import subprocess
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"S": "configs/pmsn_vits16_inat18.py", "B": "configs/pmsn_vitb16_inat18.py",
           "L": "configs/pmsn_vitl16_inat18.py"}
MESHES = {"default": None, "dp": "((\"data\",-1),)", "fsdp": "((\"data\",1),(\"fsdp\",-1))"}
INAT18_IMAGES, EPOCHS = 437_513, 300

_MODELS = flags.DEFINE_list("models", ["S", "B", "L"], "ViT sizes: S, B, L.")
_TOPOLOGIES = flags.DEFINE_list(
    "topologies", ["v4:2x2x1", "v4:2x2x4", "v5e:4x4", "v5e:16x16", "v5p:2x2x4"], "Slices.")
_MESHES = flags.DEFINE_list("meshes", ["default", "dp", "fsdp"], "default | dp | fsdp.")
_JOBS = flags.DEFINE_integer("jobs", 1, "Rows compiled at once.")
_OUT = flags.DEFINE_string("out", "/tmp/pmsn_tpu_table", "Folder for each row's full output.")


def command(model: str, topology: str, mesh: str) -> list[str]:
  cmd = [sys.executable, "-m", "pmsn_jax.aot", f"--config={CONFIGS[model]}",
         f"--topology={topology}"]
  if MESHES[mesh]:
    cmd.append(f"--config.mesh={MESHES[mesh]}")
  return cmd


def row(model: str, topology: str, mesh: str) -> str:
  cmd = command(model, topology, mesh)
  start = time.perf_counter()
  result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  seconds = time.perf_counter() - start
  name = f"{model}_{topology.replace(':', '-')}_{mesh}"
  with open(os.path.join(_OUT.value, name + ".txt"), "w") as f:
    f.write(result.stdout + "\n--- stderr ---\n" + result.stderr)
  lines = result.stdout.strip().splitlines()
  shown = " ".join(a for a in cmd[3:])
  if result.returncode not in (0, 3) or not lines or not lines[-1].startswith("topology="):
    error = (result.stderr.strip().splitlines() or ["?"])[-1][:120]
    return f"| {model}/16 | {topology} | {mesh} | error: {error} | | | | | | `{shown}` |"
  fields = dict(item.split("=", 1) for item in lines[-1].split())
  mesh_line = re.search(r"mesh (\{[^}]*\})", result.stdout)
  collectives = re.search(r"^collectives: (.*)$", result.stdout, re.M)
  img_per_s = fields["est_img_per_s"]
  # XLA's loops (collective matmuls) are counted once: an optimistic estimate (aot.loops_in).
  flag = " (under-counted)" if "warning: XLA made" in result.stdout else ""
  hours = ("–" if img_per_s == "n/a" else
           f"{EPOCHS * INAT18_IMAGES / float(img_per_s) / 3600:.0f}")
  moved = "–"
  if collectives:
    moved = ", ".join(f"{k} {float(v[:-2]):.2f}" for k, v in
                      (item.split("=") for item in collectives[1].split())
                      if float(v[:-2]) >= 0.005) or "none"
  return (f"| {model}/16 | {topology} | {mesh} {mesh_line[1] if mesh_line else ''} | "
          f"{fields['per_chip_gib']} / {fields['capacity_gib']} | {fields['fits']} | "
          f"{img_per_s}{flag} | {fields['est_mfu']}{flag} | {hours} | {moved} | {seconds:.0f} s "
          f"| `{shown}` |")


def main(argv):
  del argv
  os.makedirs(_OUT.value, exist_ok=True)
  print("| model | topology | mesh | per-chip GiB / HBM | fits | est. img/s | est. MFU | "
        f"est. h, {EPOCHS} epochs | collectives GB/step/chip | wall | command |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  rows = [(m, t, s) for m in _MODELS.value for t in _TOPOLOGIES.value for s in _MESHES.value]
  with concurrent.futures.ThreadPoolExecutor(_JOBS.value) as pool:
    for line in pool.map(lambda r: row(*r), rows):
      print(line, flush=True)


if __name__ == "__main__":
  app.run(main)
