"""Reading one run directory for the report: what pmsn_jax.main (and experiments/sweep.py)
left there, tolerant of runs that are unfinished or still being written.

The lowest layer of pmsn_jax.analysis: the Run and Group records live here, so plots.py and
report.py can both use them without importing each other.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

# Core's defaults for config keys newer than a run: evaluate.py reads config.json with them too.
from pmsn_jax.validation import with_added_keys

# What the report loses without each optional input of a run.
OPTIONAL_INPUTS = {
    "eval.json": "not in the table (run unfinished, or eval.enabled=False)",
    "metrics.jsonl": "no training curves",
    "prototypes.jsonl": "no prototype-usage plot",
}


class RunDirError(ValueError):
  """A RUN_DIR (or --out) the report cannot use; the message names the fix."""


@dataclasses.dataclass
class Run:
  path: str                      # as given on the command line
  config: dict
  eval: dict | None = None
  metrics: list[dict] = dataclasses.field(default_factory=list)
  prototypes: dict | None = None  # the last line of prototypes.jsonl
  core_minutes: float | None = None  # wall time x cores, from experiments/sweep.py's driver.json
  missing: list[str] = dataclasses.field(default_factory=list)  # OPTIONAL_INPUTS not found
  warnings: list[str] = dataclasses.field(default_factory=list)
  method: str = ""               # its group's label, set by report.group_runs
  label: str = ""                # method and seed, ditto
  style: dict = dataclasses.field(default_factory=dict)  # matplotlib line style, ditto

  @property
  def seed(self):
    return self.config.get("seed")


@dataclasses.dataclass
class Group:
  """Runs whose configs differ only in the seed (report.group_runs makes them)."""
  label: str
  runs: list[Run]


def is_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _read_json(path: str, fix: str):
  try:
    with open(path) as f:
      return json.load(f)
  except OSError as e:
    raise RunDirError(f"{path} cannot be read ({e.strerror}); {fix}") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise RunDirError(f"{path} is not valid JSON ({e}); {fix}") from None


def _read_jsonl(path: str) -> tuple[list[dict], int]:
  """Rows with a "step", and the number of unreadable lines (a live run may be mid-write)."""
  rows, bad = [], 0
  with open(path) as f:
    for line in f:
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        bad += 1
        continue
      if isinstance(row, dict) and is_number(row.get("step")):
        rows.append(row)
      else:
        bad += 1
  return rows, bad


def load_run(path: str) -> Run:
  """Reads one workdir; raises RunDirError only when it is not a run at all."""
  if not os.path.isdir(path):
    what = "is a file, not a directory" if os.path.exists(path) else "does not exist"
    raise RunDirError(f"run dir {path} {what}; pass the --workdir of a pmsn_jax.main run")
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    raise RunDirError(f"run dir {path} has no config.json, so it is not a pmsn_jax.main "
                      f"workdir (or its run never started); pass the --workdir of a run")
  config = _read_json(config_path, "pass the --workdir of a pmsn_jax.main run")
  if not isinstance(config, dict):
    raise RunDirError(f"{config_path} holds no config dict; pass the --workdir of a run")
  run = Run(path=path, config=with_added_keys(config))

  eval_path = os.path.join(path, "eval.json")
  if os.path.isfile(eval_path):
    fix = "delete it and rerun the run's pmsn_jax.main command (it resumes and evaluates)"
    run.eval = _read_json(eval_path, fix)
    if not isinstance(run.eval, dict):
      raise RunDirError(f"{eval_path} holds no results dict; {fix}")
  else:
    run.missing.append("eval.json")

  metrics_path = os.path.join(path, "metrics.jsonl")
  if os.path.isfile(metrics_path):
    run.metrics, bad = _read_jsonl(metrics_path)
    if bad:
      run.warnings.append(f"{bad} unreadable line(s) of metrics.jsonl skipped")
  else:
    run.missing.append("metrics.jsonl")

  prototypes_path = os.path.join(path, "prototypes.jsonl")
  rows = _read_jsonl(prototypes_path)[0] if os.path.isfile(prototypes_path) else []
  if rows:
    run.prototypes = rows[-1]
  else:
    run.missing.append("prototypes.jsonl")

  driver = os.path.join(path, "driver.json")  # only runs started by experiments/sweep.py
  if os.path.isfile(driver):
    record = _read_json(driver, "delete it (it only feeds the cpu_minutes of results.json)")
    if isinstance(record, dict) and is_number(record.get("core_s")):  # summed over parts
      run.core_minutes = record["core_s"] / 60
    elif isinstance(record, dict) and is_number(record.get("wall_s")) and is_number(
        record.get("cores")):  # driver.json from before core_s
      run.core_minutes = record["wall_s"] * record["cores"] / 60
  return run
