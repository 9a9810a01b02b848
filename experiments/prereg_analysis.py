"""The pre-registered analysis of issue 28's campaign, exactly as docs/preregistration.md fixes it.

  python experiments/prereg_analysis.py runs/prereg [--out=runs/prereg/analysis]
      [--merge_into=docs/results.json] [--keep_records=docs/prereg_runs]

RUNS holds the runs of `python experiments/sweep.py prereg` (REGIME/ARM_sSEED). Prints the
summary (markdown) and, with --out, writes OUT/prereg.md and OUT/prereg.json (results.json
rows); --merge_into replaces that file's prereg_* rows with these. Until every planned run has
its eval.json the output is marked INTERIM and states no decision: the decision rules are read
once, on the complete campaign.

runs/ does not outlive a session, and the campaign spans several: --keep_records copies each
finished run's small files (RECORD_FILES, no checkpoint) to a directory of the same layout,
which is committed. This script reads that directory as it reads RUNS, and
`cp -rn docs/prereg_runs/. runs/prereg/` before the sweep makes it skip those runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sweep  # noqa: E402  (experiments/ is a directory of scripts, not a package)

from pmsn_jax.analysis import paired  # noqa: E402
from pmsn_jax.analysis.report import eval_numbers  # noqa: E402
from pmsn_jax.analysis.runs import load_run  # noqa: E402

PRIMARY_REGIME, BALANCED_REGIME = "prereg_lt_k10", "prereg_balanced_k10"
PRIMARY = "knn_top1"
# (metric id, name): eval.json numbers (report.eval_numbers), then two training diagnostics
# averaged over the log steps of the last 10% of training (one batch each, so noisy alone).
METRICS = (("knn_top1", "k-NN top-1 (balanced bank)"), ("few_top1", "k-NN few-shot group"),
           ("knn_lt_top1", "k-NN, long-tailed bank"), ("linear_top1", "linear probe top-1"),
           ("nmi", "NMI of assignments"), ("effective_clusters", "effective clusters"))
DIAGNOSTICS = {"nmi": "proto/nmi", "effective_clusters": "proto/raw_target_usage_effective"}
ARM_OF_PREFIX = {prefix: arm for arm, (prefix, _, _) in sweep.PREREG_ARMS.items()}
ARM_LABELS = {"A": "A (MSN)", "B": "B (PMSN, uniform marginal)", "C": "C (PMSN, prior marginal)"}
GATE_POINTS = 0.03      # A beats the random-init encoder by >= 3 k-NN points
MIN_EFFECT = 0.005      # +0.5 points
FEW_SHOT_FLOOR = -0.01  # the few-shot difference's lower bound stays above -1 point


RECORD_FILES = ("config.json", "eval.json", "metrics.jsonl", "driver.json", "prior_fit.json")


def late_mean(metrics: list[dict], key: str, fraction: float = 0.9) -> float | None:
  """Mean of `key` over the logged steps >= fraction x the last logged step."""
  if not metrics:
    return None
  last = max(row["step"] for row in metrics)
  values = [row[key] for row in metrics if row["step"] >= fraction * last and key in row]
  return float(np.mean(values)) if values else None


def run_numbers(run) -> dict[str, float]:
  numbers = eval_numbers(run.eval)
  for name, key in DIAGNOSTICS.items():
    value = late_mean(run.metrics, key)
    if value is not None:
      numbers[name] = value
  return numbers


def load(runs_dir: str) -> tuple[dict, list[str]]:
  """({regime: {arm: {seed: numbers}}} of the evaluated runs, run dirs still missing)."""
  data, missing = {}, []
  for name, _, _ in sweep.prereg_rows():
    regime, run_name = name.split("/")
    prefix, _, seed = run_name.rpartition("_s")
    path = os.path.join(runs_dir, regime, run_name)
    if not os.path.isfile(os.path.join(path, "eval.json")):
      missing.append(name)
      continue
    data.setdefault(regime, {}).setdefault(ARM_OF_PREFIX[prefix], {})[int(seed)] = (
        run_numbers(load_run(path)))
  return data, missing


def differences(data: dict, regime: str, arm: str, metric: str, versus: str = "A"):
  """(seeds, arm - versus per shared seed) on `metric`."""
  ours, theirs = data.get(regime, {}).get(arm, {}), data.get(regime, {}).get(versus, {})
  seeds = sorted(s for s in set(ours) & set(theirs) if metric in ours[s] and metric in theirs[s])
  return seeds, [ours[s][metric] - theirs[s][metric] for s in seeds]


def comparison(seeds, diffs, confidence: float = 0.95) -> dict:
  mean, low, high = paired.difference_ci(diffs, confidence)
  return {"seeds": seeds, "mean": mean, "low": low, "high": high, "confidence": confidence,
          "p": paired.paired_p_value(diffs)}


def gate(data: dict) -> dict[str, float]:
  """Per regime: mean over A's seeds of (A's k-NN - the random-init encoder's k-NN)."""
  margins = {}
  for regime, arms in data.items():
    gains = [n[PRIMARY] - n["random_init_knn_top1"] for n in arms.get("A", {}).values()
             if "random_init_knn_top1" in n]
    if gains:
      margins[regime] = float(np.mean(gains))
  return margins


def analyse(data: dict) -> dict:
  """Every pre-registered quantity that the runs at hand allow (fewer than 2 seeds: left out)."""
  out = {"gate": gate(data), "comparisons": [], "primary": {}}
  for regime, (_, arms, _) in sweep.PREREG_REGIMES.items():
    for arm in arms[1:]:
      for metric, _ in METRICS:
        seeds, diffs = differences(data, regime, arm, metric)
        if len(seeds) >= 2:
          out["comparisons"].append({"regime": regime, "arm": arm, "metric": metric,
                                     **comparison(seeds, diffs)})
  primary = {arm: differences(data, PRIMARY_REGIME, arm, PRIMARY) for arm in "BC"}
  if all(len(seeds) >= 2 for seeds, _ in primary.values()):
    p = [paired.paired_p_value(primary[arm][1]) for arm in "BC"]
    for arm, holm_p, level in zip("BC", paired.holm(p), paired.holm_levels(p)):
      out["primary"][arm] = {**comparison(*primary[arm], confidence=level), "holm_p": holm_p}
  lt, bal = (differences(data, regime, "B", PRIMARY)[1] for regime in (PRIMARY_REGIME,
                                                                        BALANCED_REGIME))
  if len(lt) >= 2 and len(bal) >= 2:
    mean, low, high = paired.welch_ci(lt, bal)
    out["interaction"] = {"mean": mean, "low": low, "high": high, "seeds": [len(lt), len(bal)]}
  seeds, diffs = differences(data, PRIMARY_REGIME, "C", PRIMARY, versus="B")
  if len(seeds) >= 2:
    out["c_minus_b"] = comparison(seeds, diffs)
  return out


def decide(result: dict) -> dict[str, str]:
  """The pre-registered decisions on a complete campaign."""
  if not result["gate"] or min(result["gate"].values()) < GATE_POINTS:
    return {"gate": "failed: lengthen every run (all arms) before reading anything"}
  b = result["primary"]["B"]
  few = next(c for c in result["comparisons"] if (c["regime"], c["arm"], c["metric"]) ==
             (PRIMARY_REGIME, "B", "few_top1"))
  reproduced = (b["holm_p"] < 0.05 and b["low"] > 0 and b["mean"] >= MIN_EFFECT
                and result["interaction"]["low"] > 0 and few["low"] > FEW_SHOT_FLOOR)
  verdict = ("reproduced" if reproduced else "refuted at this scale" if b["high"] < MIN_EFFECT
             else "inconclusive")
  marginal = "prior" if result["c_minus_b"]["mean"] >= 0 else "uniform"
  return {"gate": "passed", "claim": verdict, "default_sinkhorn_marginal": marginal}


def _interval(c: dict) -> str:
  return (f"{100 * c['mean']:+.2f} [{100 * c['low']:+.2f}, {100 * c['high']:+.2f}]")


def markdown(result: dict, missing: list[str]) -> str:
  names = dict(METRICS)
  lines = [("INTERIM: " + f"{len(missing)} of {len(sweep.prereg_rows())} runs unfinished; no "
            "decision is read." if missing else "Complete: every planned run evaluated."), ""]
  lines += [f"Gate (A − random init, k-NN): " + ", ".join(
      f"{r} {100 * g:+.2f}" for r, g in result["gate"].items()), ""]
  for arm, c in result["primary"].items():
    lines.append(f"- Primary {ARM_LABELS[arm]} − A on {PRIMARY_REGIME}: {_interval(c)} points "
                 f"({100 * c['confidence']:.1f}% Holm-step interval), Holm p {c['holm_p']:.3f}, "
                 f"seeds {c['seeds']}")
  if "interaction" in result:
    lines.append(f"- Interaction (B − A) long-tailed − (B − A) balanced: "
                 f"{_interval(result['interaction'])} (95% Welch)")
  if "c_minus_b" in result:
    lines.append(f"- C − B on {PRIMARY_REGIME}: {_interval(result['c_minus_b'])} (95%)")
  if not missing and result["primary"]:
    lines += ["", "Decisions: " + "; ".join(f"{k} = {v}" for k, v in decide(result).items())]
  lines += ["", "| regime | arm − A | metric | seeds | difference (points) | 95% interval | p |",
            "|---|---|---|---|---:|---|---:|"]
  for c in result["comparisons"]:
    scale = 1 if c["metric"] == "effective_clusters" else 100
    lines.append(f"| {c['regime']} | {ARM_LABELS[c['arm']]} | {names[c['metric']]} | "
                 f"{len(c['seeds'])} | {scale * c['mean']:+.2f} | [{scale * c['low']:+.2f}, "
                 f"{scale * c['high']:+.2f}] | {c['p']:.3f} |")
  return "\n".join(lines) + "\n"


def result_rows(result: dict) -> list[dict]:
  """results.json rows (the paired-row schema, plus holm_p on the two primary comparisons)."""
  rows = []
  for c in result["comparisons"]:
    row = {"regime": c["regime"], "label": ARM_LABELS[c["arm"]], "versus": ARM_LABELS["A"],
           "metric": c["metric"], "seeds": c["seeds"], "pmsn_minus_msn_mean": c["mean"],
           "ci95_low": c["low"], "ci95_high": c["high"], "p": c["p"]}
    if c["regime"] == PRIMARY_REGIME and c["metric"] == PRIMARY and c["arm"] in result["primary"]:
      row["holm_p"] = result["primary"][c["arm"]]["holm_p"]
    rows.append(row)
  if "interaction" in result:
    i = result["interaction"]
    rows.append({"regime": "prereg_interaction", "label": "(B − A) long-tailed − (B − A) balanced",
                 "versus": ARM_LABELS["A"], "metric": PRIMARY, "seeds": i["seeds"],
                 "pmsn_minus_msn_mean": i["mean"], "ci95_low": i["low"], "ci95_high": i["high"]})
  return rows


def keep_records(runs_dir: str, records_dir: str) -> int:
  """Copies RECORD_FILES of every finished planned run; returns how many runs it copied."""
  copied = 0
  for name, _, _ in sweep.prereg_rows():
    source, target = os.path.join(runs_dir, name), os.path.join(records_dir, name)
    if not os.path.isfile(os.path.join(source, "eval.json")):
      continue
    os.makedirs(target, exist_ok=True)
    for file in RECORD_FILES:
      if os.path.isfile(os.path.join(source, file)):
        shutil.copy2(os.path.join(source, file), os.path.join(target, file))
    copied += 1
  return copied


def merge_into(path: str, rows: list[dict]) -> None:
  with open(path) as f:
    kept = [r for r in json.load(f) if not str(r.get("regime", "")).startswith("prereg_")]
  with open(path, "w") as f:
    f.write("[\n" + ",\n".join(json.dumps(r) for r in kept + rows) + "\n]\n")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("runs_dir")
  parser.add_argument("--out")
  parser.add_argument("--merge_into", metavar="RESULTS_JSON")
  parser.add_argument("--keep_records", metavar="DIR",
                      help="copy the finished runs' small files here (e.g. docs/prereg_runs)")
  args = parser.parse_args(argv)
  if not os.path.isdir(args.runs_dir):
    parser.error(f"{args.runs_dir} is not a directory: give the --runs_dir/prereg of "
                 "`python experiments/sweep.py prereg`")
  data, missing = load(args.runs_dir)
  result = analyse(data)
  text = markdown(result, missing)
  print(text, end="")
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "prereg.md"), "w") as f:
      f.write(text)
    with open(os.path.join(args.out, "prereg.json"), "w") as f:
      json.dump({"missing": missing, "result": result, "rows": result_rows(result)}, f, indent=1)
  if args.keep_records:
    print(f"kept the records of {keep_records(args.runs_dir, args.keep_records)} finished "
          f"runs in {args.keep_records}")
  if args.merge_into:
    if missing:
      parser.error("--merge_into: the campaign is unfinished; interim rows stay out of "
                   "results.json")
    merge_into(args.merge_into, result_rows(result))


if __name__ == "__main__":
  main()
