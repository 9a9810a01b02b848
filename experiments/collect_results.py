"""Writes docs/results.json from report directories and baseline runs.

  python experiments/collect_results.py --out=docs/results.json \
      --report=minibatch:runs/map1000/minibatch/report --report=prior_grid:runs/... \
      --raw_pixels=runs/baselines/raw_pixels
  python experiments/collect_results.py --out=docs/results.json --keep=docs/results.json \
      --report=hard_tail_kl:runs/hardtail_klpm/paired/report

runs/ does not outlive a session, so --keep=FILE adds or replaces the regimes collected here
and copies every other regime's rows (and the raw-pixel rows, unless --raw_pixels is given) from
an earlier results.json.

Each --report=REGIME:DIR is the --out of `python -m pmsn_jax.analysis.report` (its results.json
and paired.json); REGIME names the table it came from. The rows follow issue 7's schema:
  method rows  {"regime", "method", "label", "prior", "prior_exponent", "prior_order",
                "kl_direction", "features", "sinkhorn_marginal", "seeds", "knn_top1_mean",
                "knn_top1_std", "linear_top1_mean", "few_top1_mean", "cpu_minutes"}; method is
                "msn", "pmsn", "raw_pixels" or "random_init" ("features": the encoder readout
                scored, eval.features; absent for raw pixels);
  paired rows  {"regime", "metric", "seeds", "pmsn_minus_msn_mean", "ci95_low", "ci95_high"}
               (plus "label" and "versus": the two groups compared).
cpu_minutes are core-minutes (wall time x cores the run had) of all the group's runs.
"""

from __future__ import annotations

import argparse
import json
import os

MAIN_KEYS = ("knn_top1_mean", "knn_top1_std", "linear_top1_mean", "few_top1_mean")


def _load(path: str):
  with open(path) as f:
    return json.load(f)


def method_rows(regime: str, report_dir: str) -> list[dict]:
  rows = []
  for row in _load(os.path.join(report_dir, "results.json")):
    msn = row["msn"]  # the report's own test (analysis.report.is_msn)
    rows.append({"regime": regime, "method": "msn" if msn else "pmsn", "label": row["method"],
                 "prior": row["prior"],
                 "prior_exponent": None if msn else row["prior_exponent"],
                 "prior_order": row.get("prior_order"),  # None for MSN and pre-order reports
                 "kl_direction": row.get("kl_direction"),  # None: a report older than the field
                 "features": row.get("features"),  # the encoder readout; None: ditto
                 "sinkhorn_marginal": row["sinkhorn_marginal"], "seeds": row["seeds"],
                 **{k: row.get(k) for k in MAIN_KEYS}, "cpu_minutes": row.get("cpu_minutes")})
  return rows


def paired_rows(regime: str, report_dir: str) -> list[dict]:
  path = os.path.join(report_dir, "paired.json")
  if not os.path.exists(path):
    return []
  return [{"regime": regime, "label": r["regime"], "versus": r["versus"], "metric": r["metric"],
           "seeds": r["seeds"], "pmsn_minus_msn_mean": r["pmsn_minus_msn_mean"],
           "ci95_low": r["ci95_low"], "ci95_high": r["ci95_high"]} for r in _load(path)]


def raw_pixel_label(result: dict) -> str:
  """Which pixels: cosine k-NN differs between [0, 1] and mean/std-normalised pixels."""
  mean, std = result.get("pixel_mean"), result.get("pixel_std")
  if mean is None or std is None:
    return "raw pixels"
  if all(m == 0 for m in mean) and all(s == 1 for s in std):
    return "raw pixels in [0, 1]"
  return "raw pixels, normalised with the dataset mean and std"


def raw_pixel_row(run_dir: str) -> dict:
  result = _load(os.path.join(run_dir, "eval.json"))
  driver = os.path.join(run_dir, "driver.json")
  record = _load(driver) if os.path.exists(driver) else {}
  return {"regime": "baseline", "method": "raw_pixels", "label": raw_pixel_label(result),
          "prior": None, "prior_exponent": None, "prior_order": None, "kl_direction": None,
          "sinkhorn_marginal": None, "seeds": [],
          "knn_top1_mean": result["knn_top1"], "knn_top1_std": None,
          "linear_top1_mean": result.get("linear_top1"),
          "few_top1_mean": (result.get("groups") or {}).get("few"),
          "cpu_minutes": (round(record["wall_s"] * record["cores"] / 60, 2)
                          if "wall_s" in record and "cores" in record else None)}


def random_init_rows(regime: str, report_dir: str) -> list[dict]:
  """The random-init k-NN every run reports, once per regime (MSN groups' runs)."""
  for row in _load(os.path.join(report_dir, "results.json")):
    if row.get("random_init_knn_top1_mean") is not None and row["msn"]:
      return [{"regime": regime, "method": "random_init", "label": "random-init encoder",
               "prior": None, "prior_exponent": None, "prior_order": None, "kl_direction": None,
               "sinkhorn_marginal": None, "features": row.get("features"),
               "seeds": row["seeds"], "knn_top1_mean": row["random_init_knn_top1_mean"],
               "knn_top1_std": row.get("random_init_knn_top1_std"), "linear_top1_mean": None,
               "few_top1_mean": None, "cpu_minutes": None}]
  return []


def kept_rows(path: str, fresh_regimes: set[str]) -> tuple[list[dict], list[dict]]:
  """(method rows, paired rows) of an earlier results.json whose regimes are not in
  fresh_regimes, in their order."""
  try:
    earlier = _load(path)
  except (OSError, ValueError) as e:
    raise SystemExit(f"--keep={path}: cannot read it ({e}); give an earlier results.json or "
                     "drop --keep") from None
  kept = [row for row in earlier if row.get("regime") not in fresh_regimes]
  return ([r for r in kept if "metric" not in r], [r for r in kept if "metric" in r])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--report", action="append", default=[], metavar="REGIME:DIR")
  parser.add_argument("--raw_pixels", action="append", default=[],
                      help="an experiments/raw_pixels.py --out directory (repeatable)")
  parser.add_argument("--out", required=True)
  parser.add_argument("--keep", metavar="FILE",
                      help="an earlier results.json whose other regimes' rows are copied")
  args = parser.parse_args()
  rows = [raw_pixel_row(run_dir) for run_dir in args.raw_pixels]
  pairs = []
  for spec in args.report:
    regime, sep, report_dir = spec.partition(":")
    if not sep or not os.path.exists(os.path.join(report_dir, "results.json")):
      parser.error(f"--report={spec}: give REGIME:DIR, DIR the --out of pmsn_jax.analysis.report")
    if any("msn" not in row for row in _load(os.path.join(report_dir, "results.json"))):
      parser.error(f"--report={spec}: its results.json predates the report's \"msn\" column; "
                   f"rerun python -m pmsn_jax.analysis.report with --out={report_dir}")
    rows += random_init_rows(regime, report_dir) + method_rows(regime, report_dir)
    pairs += paired_rows(regime, report_dir)
  if args.keep:
    fresh = {row["regime"] for row in rows + pairs}
    kept_methods, kept_pairs = kept_rows(args.keep, fresh)
    rows, pairs = kept_methods + rows, kept_pairs + pairs
  with open(args.out, "w") as f:
    f.write("[\n" + ",\n".join(json.dumps(r) for r in rows + pairs) + "\n]\n")
  print(f"wrote {args.out}: {len(rows)} method rows, {len(pairs)} paired rows")


if __name__ == "__main__":
  main()
