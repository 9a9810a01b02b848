"""Paired-seed comparisons for the report: PMSN − MSN per metric with a 95% confidence interval.

Runs of two methods that share a seed also share their data order and initial weights (both
come from `config.seed`), so the per-seed difference cancels most of the seed-to-seed spread
that an unpaired comparison of two means would carry. For n shared seeds with differences d:
mean(d) ± t_{0.975, n-1} · sd(d) / √n (Student's t; needs n ≥ 2).

A PMSN group is paired with the MSN group whose config is the same apart from the loss keys
that make the two methods (LOSS_KEYS) and the seed: e.g. in the mini-batch study the skewed
PMSN runs are compared with the skewed MSN runs, not with the balanced ones.
"""

from __future__ import annotations

import json
import math

import numpy as np
from scipy import stats

# (eval number id as in report.eval_numbers, its name in the table)
METRICS = (
    ("knn_top1", "k-NN top-1"),
    ("knn_lt_top1", "k-NN, long-tailed bank"),
    ("linear_top1", "linear top-1"),
    ("few_top1", "k-NN few-shot"),
)
# What tells MSN and PMSN apart (configs/common.py `msn`), ignored when pairing groups.
LOSS_KEYS = ("loss.prior", "loss.prior_exponent", "loss.sinkhorn_marginal",
             "loss.sinkhorn_iters", "loss.kl_direction", "loss.prior_fit_source",
             "loss.prior_fit_warmup_steps", "loss.custom_prior", "loss.prior_order")


def difference_ci(differences, confidence: float = 0.95) -> tuple[float, float, float]:
  """(mean, low, high) of >= 2 per-seed differences."""
  d = np.asarray(differences, np.float64)
  if d.size < 2:
    raise ValueError(f"{d.size} paired difference(s): an interval needs at least 2 shared seeds")
  mean = float(d.mean())
  half = float(stats.t.ppf(0.5 + confidence / 2, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size))
  return mean, mean - half, mean + half


def paired_p_value(differences) -> float:
  """Two-sided p of the paired t test that the mean difference is 0 (0 if every difference is
  the same non-zero number, 1 if all are 0)."""
  d = np.asarray(differences, np.float64)
  if d.size < 2:
    raise ValueError(f"{d.size} paired difference(s): a test needs at least 2 shared seeds")
  sd = d.std(ddof=1)
  if sd == 0:
    return 1.0 if d.mean() == 0 else 0.0
  t = d.mean() / (sd / math.sqrt(d.size))
  return float(2 * stats.t.sf(abs(t), d.size - 1))


def holm(p_values) -> list[float]:
  """Holm's step-down adjusted p values (family-wise error), in the order given: the i-th
  smallest p is multiplied by m - i + 1 (i from 1), then made non-decreasing and capped at 1."""
  p = np.asarray(p_values, np.float64)
  adjusted, running = np.empty_like(p), 0.0
  for i, index in enumerate(np.argsort(p, kind="stable")):
    running = max(running, min(1.0, (p.size - i) * p[index]))
    adjusted[index] = running
  return adjusted.tolist()


def holm_levels(p_values, alpha: float = 0.05) -> list[float]:
  """The confidence level of each comparison's interval at its Holm step: the i-th smallest p
  is tested at alpha / (m - i + 1), so its interval is the 1 - alpha / (m - i + 1) one (a
  two-sided t interval excludes 0 exactly when p is below that level's alpha)."""
  order = np.argsort(np.asarray(p_values, np.float64), kind="stable")
  levels = [0.0] * len(order)
  for i, index in enumerate(order):
    levels[index] = 1 - alpha / (len(order) - i)
  return levels


def welch_ci(a, b, confidence: float = 0.95) -> tuple[float, float, float]:
  """(mean(a) - mean(b), low, high): Welch's interval for two independent samples (>= 2
  each), e.g. one regime's per-seed differences against another's."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.size < 2 or b.size < 2:
    raise ValueError(f"samples of {a.size} and {b.size}: Welch's interval needs >= 2 in each")
  va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
  mean = float(a.mean() - b.mean())
  if va + vb == 0:
    return mean, mean, mean
  df = (va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))
  half = float(stats.t.ppf(0.5 + confidence / 2, df) * math.sqrt(va + vb))
  return mean, mean - half, mean + half


def setting_key(flat_config: dict) -> str:
  """The config minus seed and LOSS_KEYS, as a key for pairing groups."""
  return json.dumps({k: v for k, v in flat_config.items()
                     if k != "seed" and k not in LOSS_KEYS}, sort_keys=True, default=str)


def with_msn_partner(items, key_of, is_msn) -> list[tuple]:
  """(item, its MSN partner) for every non-MSN item whose key_of equals an MSN item's.

  items: run groups (paired seeds) or single runs (the imbalance map); key_of gives the
  setting_key of a group, or (setting_key, seed) of a run. The first MSN item of a key wins.
  """
  msn_by_key = {}
  for item in items:
    if is_msn(item):
      msn_by_key.setdefault(key_of(item), item)
  return [(item, msn_by_key[key_of(item)]) for item in items
          if not is_msn(item) and key_of(item) in msn_by_key]


def _numbers_by_seed(group, numbers_of) -> dict:
  """{seed: numbers} of the group's evaluated runs (numbers_of is called once per run)."""
  return {run.seed: numbers for run in group.runs if (numbers := numbers_of(run))}


def paired_rows(groups, numbers_of, flatten, is_msn) -> list[dict]:
  """Rows {"regime", "metric", "seeds", "pmsn_minus_msn_mean", "ci95_low", "ci95_high"}.

  groups: report.Group list; numbers_of(run) -> {metric id: value} (None for an unevaluated
  run); flatten(config) -> flat dict; is_msn(group) -> bool. Only pairs with >= 2 shared,
  evaluated seeds give rows (a single seed has no interval).
  """
  rows = []
  for group, msn in with_msn_partner(
      groups, lambda g: setting_key(flatten(g.runs[0].config)), is_msn):
    ours, theirs = _numbers_by_seed(group, numbers_of), _numbers_by_seed(msn, numbers_of)
    for metric, _ in METRICS:
      seeds = sorted(s for s in set(ours) & set(theirs)
                     if metric in ours[s] and metric in theirs[s])
      if len(seeds) < 2:
        continue
      mean, low, high = difference_ci([ours[s][metric] - theirs[s][metric] for s in seeds])
      rows.append({"regime": group.label, "versus": msn.label, "metric": metric,
                   "seeds": seeds, "pmsn_minus_msn_mean": mean, "ci95_low": low,
                   "ci95_high": high})
  return rows


def markdown(rows: list[dict]) -> list[str]:
  """The rows as a markdown table in percentage points; empty list for no rows."""
  if not rows:
    return []
  names = dict(METRICS)
  lines = ["| PMSN run group | vs | metric | seeds | PMSN − MSN (points) | 95% CI | beyond CI |",
           "|---|---|---|---|---:|---|---|"]
  for r in rows:
    verdict = ("PMSN better" if r["ci95_low"] > 0 else
               "MSN better" if r["ci95_high"] < 0 else "no")
    lines.append(f"| {r['regime']} | {r['versus']} | {names[r['metric']]} | "
                 f"{', '.join(map(str, r['seeds']))} | {100 * r['pmsn_minus_msn_mean']:+.2f} | "
                 f"[{100 * r['ci95_low']:+.2f}, {100 * r['ci95_high']:+.2f}] | {verdict} |")
  return lines
