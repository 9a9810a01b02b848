"""The imbalance x prototypes map (sweep plan `imbalance`) as one table and one heatmap.

  python experiments/imbalance_map.py runs/map500/imbalance [--out=runs/map500/imbalance/map]

Pairs each PMSN run with the MSN run of the same config apart from the loss (so of the same
(data.imbalance_ratio, model.num_prototypes) cell) and seed, and writes OUT/map.md (table),
OUT/map.json (its rows) and OUT/map.png (PMSN − MSN k-NN per cell, one panel per PMSN setting).
Next to the accuracies it shows what the prior did to the clustering, averaged over the last
LAST_ROWS training log rows: the effective number of prototypes of the prior and of the mean
prediction p̄, the prototypes in use (argmax) and the NMI of assignments vs classes. With one
seed per cell a difference under the demo's seed spread (~1.6 k-NN points) is no evidence: the
map says where to spend paired seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pmsn_jax.analysis import paired, report  # noqa: E402
from pmsn_jax.analysis.runs import RunDirError, is_number, load_run  # noqa: E402

LAST_ROWS = 3  # training log rows averaged for the clustering columns (one batch each)
DIFFERENCES = (("knn_top1", "Δ k-NN"), ("knn_lt_top1", "Δ LT-bank k-NN"),
               ("linear_top1", "Δ linear"), ("few_top1", "Δ few-shot"))
CLUSTERING = (("proto/prior_effective", "prior eff."), ("proto/mean_prediction_effective",
              "p̄ eff."), ("prototypes_in_use", "in use"), ("proto/nmi", "NMI"))


def clustering_means(run) -> dict[str, float]:
  """Means over the last LAST_ROWS training rows (not eval rows) of the CLUSTERING scalars."""
  rows = [row for row in run.metrics if "loss" in row][-LAST_ROWS:]
  out = {}
  for key, _ in CLUSTERING:
    values = [row[key] for row in rows if is_number(row.get(key))]
    if values:
      out[key] = float(np.mean(values))
  return out


def cell_of(config: dict) -> tuple[float, int]:
  return (float(config["data"]["imbalance_ratio"]), int(config["model"]["num_prototypes"]))


def _partner_key(run) -> tuple[str, object]:
  """Runs with equal keys differ only in the loss: the pairing rule of the report's paired
  comparisons (pmsn_jax/analysis/paired.py)."""
  return paired.setting_key(report.flatten(run.config)), run.seed


def map_rows(runs) -> list[dict]:
  """One row per PMSN run with an MSN run of the same config (loss aside) and seed."""
  rows = []
  evaluated = [r for r in runs if r.eval is not None]
  for run, partner in paired.with_msn_partner(evaluated, _partner_key,
                                              lambda r: report.is_msn(r.config)):
    ours, theirs = report.eval_numbers(run.eval), report.eval_numbers(partner.eval)
    ratio, k = cell_of(run.config)
    rows.append({
        "imbalance_ratio": ratio, "num_prototypes": k, "seed": run.seed,
        "pmsn": report.method_label(run.config), "pmsn_run": run.path, "msn_run": partner.path,
        "msn_knn_top1": theirs.get("knn_top1"), "pmsn_knn_top1": ours.get("knn_top1"),
        **{f"diff_{key}": ours[key] - theirs[key] for key, _ in DIFFERENCES
           if key in ours and key in theirs},
        "msn_clustering": clustering_means(partner), "pmsn_clustering": clustering_means(run)})
  return sorted(rows, key=lambda r: (r["pmsn"], -r["imbalance_ratio"], r["num_prototypes"]))


def _pct(x, signed=False) -> str:
  return "—" if x is None else f"{100 * x:+.2f}" if signed else f"{100 * x:.2f}"


def _num(x) -> str:
  return "—" if x is None else f"{x:.2f}" if x < 1.5 else f"{x:.1f}"


def markdown(rows: list[dict]) -> list[str]:
  head = (["imbalance", "K", "PMSN", "MSN k-NN", "PMSN k-NN"] + [t for _, t in DIFFERENCES]
          + [f"{t} MSN / PMSN" for _, t in CLUSTERING[1:]] + ["PMSN prior eff."])
  lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * 2 + "---|" + "---:|" * (len(head) - 3)]
  for r in rows:
    m, p = r["msn_clustering"], r["pmsn_clustering"]
    lines.append("| " + " | ".join(
        [f"{r['imbalance_ratio']:g}", str(r["num_prototypes"]), r["pmsn"],
         _pct(r["msn_knn_top1"]), _pct(r["pmsn_knn_top1"])]
        + [_pct(r.get(f"diff_{key}"), signed=True) for key, _ in DIFFERENCES]
        + [f"{_num(m.get(key))} / {_num(p.get(key))}" for key, _ in CLUSTERING[1:]]
        + [_num(p.get("proto/prior_effective"))]) + " |")
  return lines


def plot(rows: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib.figure import Figure

  settings = sorted({r["pmsn"] for r in rows})
  ratios = sorted({r["imbalance_ratio"] for r in rows})
  ks = sorted({r["num_prototypes"] for r in rows})
  fig = Figure(figsize=(1.6 + 1.3 * len(ks) * len(settings), 1.6 + 0.8 * len(ratios)))
  diffs = [abs(100 * r["diff_knn_top1"]) for r in rows if "diff_knn_top1" in r]
  bound = max([1.0] + diffs)  # one colour scale for every panel
  for i, setting in enumerate(settings):
    grid = np.full((len(ratios), len(ks)), np.nan)
    for r in rows:
      if r["pmsn"] == setting and "diff_knn_top1" in r:
        grid[ratios.index(r["imbalance_ratio"]), ks.index(r["num_prototypes"])] = (
            100 * r["diff_knn_top1"])
    ax = fig.add_subplot(1, len(settings), i + 1)
    image = ax.imshow(grid, cmap="RdBu", vmin=-bound, vmax=bound, aspect="auto")
    for (y, x), value in np.ndenumerate(grid):
      if np.isfinite(value):
        ax.text(x, y, f"{value:+.1f}", ha="center", va="center", fontsize=9)
    ax.set_xticks(range(len(ks)), [str(k) for k in ks])
    ax.set_yticks(range(len(ratios)), [f"{r:g}" for r in ratios])
    ax.set_xlabel("prototypes K")
    ax.set_ylabel("imbalance ratio")
    ax.set_title(textwrap.fill(f"{setting} − MSN, k-NN top-1 points", 24), fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("runs_dir", help="the plan's folder: one run per subdirectory")
  parser.add_argument("--out", help="default: RUNS_DIR/map")
  args = parser.parse_args(argv)
  out = args.out or os.path.join(args.runs_dir, "map")
  if not os.path.isdir(args.runs_dir):
    parser.error(f"{args.runs_dir} is not a directory; pass the plan's --runs_dir/PLAN folder")
  runs = []
  for name in sorted(os.listdir(args.runs_dir)):
    path = os.path.join(args.runs_dir, name)
    if os.path.isfile(os.path.join(path, "config.json")):
      try:
        runs.append(load_run(path))
      except RunDirError as e:
        parser.error(str(e))
  rows = map_rows(runs)
  cells = [(r["pmsn"], r["imbalance_ratio"], r["num_prototypes"], r["seed"]) for r in rows]
  if len(set(cells)) < len(cells):
    parser.error(f"{args.runs_dir} holds pairs that differ in more than imbalance and K (e.g. "
                 f"the minibatch plan's skews); use pmsn_jax.analysis.report for those")
  if not rows:
    parser.error(f"{args.runs_dir} holds no evaluated PMSN run with an evaluated MSN run of the "
                 f"same imbalance, K and seed; run `experiments/sweep.py imbalance` first")
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "map.json"), "w") as f:
    json.dump(rows, f, indent=2)
  paired_paths = {r[key] for r in rows for key in ("pmsn_run", "msn_run")}
  unpaired = [r.path for r in runs if r.eval is not None and r.path not in paired_paths]
  table = markdown(rows)
  with open(os.path.join(out, "map.md"), "w") as f:
    f.write("\n".join(table + ["", f"{len(rows)} pairs; evaluated runs without a partner, left "
                                f"out: {unpaired or 'none'}.", ""]))
  plot(rows, os.path.join(out, "map.png"))
  print("\n".join(table))
  print(f"wrote {out}/map.md, map.json, map.png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
