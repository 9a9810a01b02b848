"""`python -m pmsn_jax.analysis.report RUN_DIR [...] --out DIR`: one markdown report of many runs.

At demo scale one seed says little (seeds spread by ~1.6 k-NN points), so the results table
groups runs whose configs differ only in `seed` and gives mean ± std over them; the plots show
what the table hides: training curves, k-NN over steps, how prototype usage tracks the prior,
and which classes (head or tail) the encoder serves. It reads only what train.py (and
experiments/sweep.py) write, and computes with NumPy and matplotlib (no accelerator, nothing
compiled), so it runs on any machine with the `analysis` extra, on finished or still-running
workdirs.

What it reads in each RUN_DIR (only config.json is required; whatever else is missing is listed
in the report instead of failing it):
  config.json       the resolved config: the grouping key and the method label;
  eval.json         the final evaluation (evals/suite.py): the table and the per-class plot;
  metrics.jsonl     {"step", **scalars} per log step, and "eval/*" rows at evaluation steps;
  prototypes.jsonl  {"step", "target_usage_sorted", "mean_prediction_sorted", "prior_sorted"}.
What it writes in DIR: report.md, results.json (the table as rows), paired.json (PMSN − MSN over
shared seeds with 95% intervals, paired.py) and the PNGs report.md links (plots.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys

import numpy as np

from pmsn_jax.analysis import paired, plots
from pmsn_jax.analysis.runs import OPTIONAL_INPUTS, Group, Run, RunDirError, is_number, load_run

USER_ERROR_EXIT = 2
PROG = "python -m pmsn_jax.analysis.report"
USAGE = f"{PROG} RUN_DIR [RUN_DIR ...] --out DIR"

GROUP_IGNORED = ("seed",  # runs whose configs differ only in these are seeds of one method
                 "compilation_cache_dir")  # where compiled programs are cached, not what runs
# (id, column title): what the table shows of each eval.json, as fractions (shown in %).
COLUMNS = (
    ("knn_top1", "k-NN top-1"),
    ("knn_lt_top1", "k-NN, long-tailed bank"),
    ("linear_top1", "linear top-1"),
    ("many_top1", "k-NN many-shot"),
    ("medium_top1", "k-NN medium-shot"),
    ("few_top1", "k-NN few-shot"),
    ("balanced_top1", "k-NN balanced acc."),
    ("random_init_knn_top1", "random-init k-NN"),
)
BALANCED_KEYS = ("balanced_top1", "balanced_accuracy", "knn_balanced_top1")
LINESTYLES = ("-", "--", ":", "-.")


@dataclasses.dataclass(frozen=True)
class Cell:
  """One table entry: mean and sample std (ddof=1; None for one value) over n runs."""
  mean: float
  std: float | None
  n: int


# ------------------------------------------------------------------------------------ grouping

def flatten(config: dict, prefix: str = "") -> dict:
  """{"loss": {"prior": ...}} -> {"loss.prior": ...}."""
  out = {}
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(flatten(value, name + "."))
    else:
      out[name] = value
  return out


def _fmt(value) -> str:
  return f"{value:g}" if is_number(value) else str(value)


OFFICIAL_SINKHORN_ITERS = 3  # MSN's; other counts are named in PMSN labels


def method_label(config: dict) -> str:
  """"MSN" or e.g. "PMSN τ_p=0.25, Sinkhorn prior", from the loss keys (configs/common.py).

  MSN stays "MSN" whatever its Sinkhorn iterations (it is the baseline PMSN groups pair with;
  groups that share a label are told apart by their differing keys, see _group_labels)."""
  loss = config.get("loss", {})
  prior = loss.get("prior")
  marginal = "off" if loss.get("sinkhorn_iters") == 0 else loss.get("sinkhorn_marginal")
  if prior == "uniform" and marginal == "uniform":
    label = "MSN"
  else:
    name = {"power_law": f"PMSN τ_p={_fmt(loss.get('prior_exponent'))}",
            "fit": "PMSN τ_p fitted", "uniform": "uniform prior",
            "custom": "PMSN custom prior"}.get(prior, f"prior {prior}")
    label = f"{name}, Sinkhorn {marginal}"
    iters = loss.get("sinkhorn_iters", OFFICIAL_SINKHORN_ITERS)
    if iters not in (0, OFFICIAL_SINKHORN_ITERS):
      label += f" ({iters} iterations)"
    if loss.get("prior_order", "fixed") == "sorted" and prior != "uniform":  # else a no-op
      label += ", sorted prior"
  if loss.get("kl_direction") == "prior_to_mean":
    label += ", KL(π‖p̄)"
  return label


def is_msn(config: dict) -> bool:
  """The MSN baseline (uniform prior and marginal, default KL): what PMSN groups pair with."""
  return method_label(config) == "MSN"


def _group_labels(configs: list[dict]) -> list[str]:
  """Method labels, plus the config keys that tell apart groups sharing one (up to three)."""
  methods = [method_label(c) for c in configs]
  flats = [flatten(c) for c in configs]
  labels = []
  for i, method in enumerate(methods):
    same = [j for j, m in enumerate(methods) if m == method]
    if len(same) == 1:
      labels.append(method)
      continue
    keys = sorted(k for k in set().union(*(flats[j] for j in same))
                  if k not in GROUP_IGNORED
                  and len({json.dumps(flats[j].get(k)) for j in same}) > 1)
    shown = ", ".join(f"{k}={_fmt(flats[i].get(k))}" for k in keys[:3])
    labels.append(f"{method} ({shown}{', …' if len(keys) > 3 else ''})")
  return labels


def group_runs(runs: list[Run]) -> list[Group]:
  """Groups runs by config minus GROUP_IGNORED (first-seen order); labels and styles runs:
  one colour per group, one line style per seed."""
  members: dict[str, list[Run]] = {}
  for run in runs:
    key = {k: v for k, v in flatten(run.config).items() if k not in GROUP_IGNORED}
    members.setdefault(json.dumps(key, sort_keys=True, default=str), []).append(run)
  groups = [Group(label, group_members) for label, group_members in
            zip(_group_labels([m[0].config for m in members.values()]), members.values())]
  seen = set()
  for g, group in enumerate(groups):
    for s, run in enumerate(group.runs):
      run.method, run.label = group.label, f"{group.label}, seed {run.seed}"
      if run.label in seen:  # the same config and seed twice
        run.label += f" [{os.path.basename(os.path.normpath(run.path))}]"
      seen.add(run.label)
      run.style = {"color": f"C{g % 10}", "linestyle": LINESTYLES[s % len(LINESTYLES)]}
  return groups


# --------------------------------------------------------------------------------- aggregation

def balanced_accuracy(result: dict):
  """eval.json's balanced accuracy, else the mean of its per-class accuracies (the k-NN's)."""
  for key in BALANCED_KEYS:
    if is_number(result.get(key)):
      return result[key]
  per_class = [a for a in result.get("per_class_top1") or () if is_number(a)]
  return float(np.mean(per_class)) if per_class else None


def lowshot_numbers(lowshot) -> dict[str, float]:
  """{images per class: mean accuracy over label splits} from eval.json's "lowshot".

  Accepts {n: accuracy | [accuracy per split] | {"mean": ...} | {"accuracies": [...]}}: the
  evaluator that writes it is newer than this report, and a layout it does not know is skipped.
  """
  if not isinstance(lowshot, dict):
    return {}
  out = {}
  for shots, value in lowshot.items():
    if isinstance(value, dict):
      value = next((value[k] for k in ("mean", "top1_mean", "top1", "accuracy") if k in value),
                   value.get("accuracies", value.get("splits")))
    if isinstance(value, list) and value and all(is_number(v) for v in value):
      value = float(np.mean(value))
    if is_number(value):
      out[str(shots)] = float(value)
  return out


def eval_numbers(result: dict) -> dict[str, float]:
  """The table's numbers in one eval.json: COLUMNS ids plus "lowshot_<n>", where present."""
  groups = result.get("groups") or {}
  numbers = {key: result.get(key) for key in
             ("knn_top1", "knn_lt_top1", "linear_top1", "random_init_knn_top1")}
  numbers.update({f"{g}_top1": groups.get(g) for g in ("many", "medium", "few")})
  numbers["balanced_top1"] = balanced_accuracy(result)
  numbers.update({f"lowshot_{shots}": v
                  for shots, v in lowshot_numbers(result.get("lowshot")).items()})
  return {k: float(v) for k, v in numbers.items() if is_number(v)}


def aggregate(runs: list[Run]) -> dict[str, Cell]:
  """Mean ± sample std over the runs with an eval.json, per number; absent numbers skipped."""
  per_run = [eval_numbers(run.eval) for run in runs if run.eval is not None]
  cells = {}
  for key in set().union(*per_run):
    values = [numbers[key] for numbers in per_run if key in numbers]
    cells[key] = Cell(float(np.mean(values)),
                      float(np.std(values, ddof=1)) if len(values) > 1 else None, len(values))
  return cells


def format_cell(cell: Cell | None, runs: int) -> str:
  """"81.00 ± 1.41" (%); "—" when absent; "(n=k)" when only k of the group's runs have it."""
  if cell is None:
    return "—"
  text = f"{100 * cell.mean:.2f}" + ("" if cell.std is None else f" ± {100 * cell.std:.2f}")
  return text + (f" (n={cell.n})" if cell.n < runs else "")


def _lowshot_columns(runs: list[Run]) -> list[tuple[str, str]]:
  shots = {s for run in runs if run.eval for s in lowshot_numbers(run.eval.get("lowshot"))}
  ordered = sorted(shots, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))
  return [(f"lowshot_{s}", f"low-shot {s}/class" if s.isdigit() else f"low-shot {s}")
          for s in ordered]


def results_table(groups: list[Group]) -> tuple[list[str], list[dict]]:
  """The markdown table, and the same as rows for results.json."""
  columns = list(COLUMNS) + _lowshot_columns([r for g in groups for r in g.runs])
  lines = ["| method | seeds | " + " | ".join(title for _, title in columns) + " |",
           "|---|---|" + "---:|" * len(columns)]
  rows = []
  for group in groups:
    evaluated = [run for run in group.runs if run.eval is not None]
    seeds = [run.seed for run in evaluated]
    cells = aggregate(group.runs)
    lines.append(f"| {group.label} | {len(seeds)} ({', '.join(map(str, seeds))}) | "
                 + " | ".join(format_cell(cells.get(key), len(evaluated)) for key, _ in columns)
                 + " |")
    loss, msn = group.runs[0].config.get("loss", {}), is_msn(group.runs[0].config)
    row = {"method": group.label, "msn": msn, "prior": loss.get("prior"),
           "prior_exponent": loss.get("prior_exponent"),
           # A uniform prior is the same in any order: no order for MSN.
           "prior_order": None if msn else loss.get("prior_order"),
           "kl_direction": loss.get("kl_direction"),
           # The encoder readout every evaluator scored (eval.features).
           "features": group.runs[0].config.get("eval", {}).get("features", "cls"),
           "sinkhorn_marginal": ("off" if loss.get("sinkhorn_iters") == 0
                                 else loss.get("sinkhorn_marginal")),
           "seeds": seeds, "runs": [run.path for run in group.runs],
           # Core-minutes of all the group's runs (training + evaluation), when all are known.
           "cpu_minutes": (sum(run.core_minutes for run in group.runs)
                           if all(run.core_minutes is not None for run in group.runs)
                           else None)}
    for key, _ in columns:
      cell = cells.get(key)
      row.update({f"{key}_mean": cell.mean if cell else None,
                  f"{key}_std": cell.std if cell else None, f"{key}_n": cell.n if cell else 0})
    rows.append(row)
  return lines, rows


# ------------------------------------------------------------------------------------- markdown

FIGURES = (  # (file, title, what it shows)
    ("training_curves.png", "Training curves",
     "Every learned scalar of metrics.jsonl against the step, one line per run (colour: "
     "method, line style: seed). Schedules and throughput are left out."),
    ("knn_over_steps.png", "k-NN over steps",
     "k-NN top-1 on the balanced test set at each evaluation during training, with the "
     "balanced train split and the long-tailed pretraining subset as banks."),
    ("prototype_usage.png", "Prototype usage vs prior",
     "Last line of prototypes.jsonl, log-log: the share of the batch each prototype takes in "
     "the Sinkhorn targets and in the mean prediction p̄, sorted, against the sorted prior π."),
    ("per_class_accuracy.png", "Per-class accuracy",
     "Per-class top-1 (mean over seeds, shaded ± std), classes ordered from the most to the "
     "fewest pretraining images, with those counts above: does the tail pay for the head?"),
)


def write_report(runs: list[Run], out: str) -> str:
  """Writes out/report.md, out/results.json, out/paired.json and the PNGs; returns report.md's
  path."""
  try:
    os.makedirs(out, exist_ok=True)
  except OSError as e:
    raise RunDirError(f"--out={out} cannot be created ({e.strerror}); pick a writable "
                      f"directory") from None
  groups = group_runs(runs)
  table, rows = results_table(groups)
  pairs = paired.paired_rows(
      groups, lambda run: eval_numbers(run.eval) if run.eval is not None else None, flatten,
      lambda group: is_msn(group.runs[0].config))
  drawers = {"training_curves.png": lambda p: plots.plot_training_curves(runs, p),
             "knn_over_steps.png": lambda p: plots.plot_knn_over_steps(runs, p),
             "prototype_usage.png": lambda p: plots.plot_prototype_usage(runs, p),
             "per_class_accuracy.png": lambda p: plots.plot_per_class(groups, p)}

  lines = ["# PMSN report", "",
           f"{len(runs)} run(s) in {len(groups)} group(s): runs whose configs differ only in "
           f"`seed` are one group.", "",
           "| run dir | method | seed | last logged step | missing inputs |",
           "|---|---|---|---:|---|"]
  for run in runs:
    last = max((int(row["step"]) for row in run.metrics), default=None)
    lines.append(f"| `{run.path}` | {run.method} | {run.seed} | "
                 f"{'—' if last is None else last} | {', '.join(run.missing) or '—'} |")
  lines += ["", "## Results", "",
            "Top-1 in % on the balanced test set: mean ± sample std (ddof = 1) over the seeds "
            "of each group; (n=k) when only k of its runs have that number, — when none does. "
            "Shot groups are classes by pretraining images per class, split at each run's "
            "`eval.shot_thresholds` (OLTR's > 100 / 20–100 / < 20 unless the config says "
            "otherwise); k-NN balanced acc. is eval.json's when it has one, else the mean of its "
            "per-class k-NN accuracy.",
            "", *table, ""]
  if pairs:
    lines += ["## Paired comparisons", "",
              "Each PMSN group against the MSN group with the same config apart from the loss, "
              "over their shared seeds (same data order and initial weights): the mean per-seed "
              "difference and its 95% Student-t interval (pmsn_jax/analysis/paired.py). Also in "
              "paired.json.", "", *paired.markdown(pairs), ""]
  notes = [f"`{run.path}`: no {name}: {OPTIONAL_INPUTS[name]}"
           for run in runs for name in run.missing]
  notes += [f"`{run.path}`: {warning}" for run in runs for warning in run.warnings]
  if not _lowshot_columns(runs):
    notes.append("no eval.json holds `lowshot`: no low-shot columns")
  for name, title, about in FIGURES:
    path = os.path.join(out, name)
    if os.path.exists(path):  # a PNG of an earlier report in the same --out must not linger
      os.remove(path)
    note = drawers[name](path)
    lines += [f"## {title}", "", about, ""]
    if note:
      notes.append(f"{title}: {note}")
      lines += [f"*{note}.*", ""]
    if os.path.exists(path):
      lines += [f"![{title}]({name})", ""]
  lines += ["## Missing inputs", ""] + [f"- {n}" for n in notes or ["none"]] + [""]
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(rows, f, indent=2)
  with open(os.path.join(out, "paired.json"), "w") as f:
    json.dump(pairs, f, indent=2)
  report_path = os.path.join(out, "report.md")
  with open(report_path, "w") as f:
    f.write("\n".join(lines))
  return report_path


# ------------------------------------------------------------------------------------------ CLI

class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line and exit status 2, like pmsn_jax.main
    self.exit(USER_ERROR_EXIT, f"error: {message}; usage: {USAGE}\n")


def main(argv: list[str] | None = None) -> int:
  parser = _Parser(prog=PROG, description=__doc__.splitlines()[0])
  parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                      help="workdirs of pmsn_jax.main runs (seeds of one config are grouped)")
  parser.add_argument("--out", required=True, help="directory for report.md and its PNGs")
  args = parser.parse_args(argv)
  # matplotlib is an optional extra: say so in one line before any work, not in a traceback
  # after the runs are read.
  if importlib.util.find_spec("matplotlib") is None:
    print("error: the report's plots need matplotlib, which core pmsn_jax does not install; "
          "pip install -e '.[analysis]'", file=sys.stderr)
    return USER_ERROR_EXIT
  try:
    # `report runs/PLAN/* --out=runs/PLAN/report` globs the report folder too: not a run.
    run_dirs = [p for p in args.run_dirs if os.path.realpath(p) != os.path.realpath(args.out)]
    if len(run_dirs) < len(args.run_dirs):
      print(f"skipping {args.out}: it is --out, not a run dir")
    if not run_dirs:
      raise RunDirError("the only RUN_DIR given is --out; pass the workdirs of runs")
    paths = [os.path.realpath(p) for p in run_dirs]
    twice = next((p for p, r in zip(run_dirs, paths) if paths.count(r) > 1), None)
    if twice:
      raise RunDirError(f"run dir {twice} is given twice; pass each run once (a seed counted "
                        f"twice would shrink the std)")
    report_path = write_report([load_run(p) for p in run_dirs], args.out)
  except RunDirError as e:
    print(f"error: {e}", file=sys.stderr)
    return USER_ERROR_EXIT
  print(f"wrote {report_path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
