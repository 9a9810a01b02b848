"""experiments/prereg_analysis.py: the pre-registered statistics (paired t, Holm, Welch) against
scipy, and its decisions on hand-made campaigns whose answer is known."""

import importlib.util
import json
import os

import numpy as np
import pytest
from scipy import stats

from pmsn_jax.analysis import paired
from tests.subprocess_runs import ROOT

_spec = importlib.util.spec_from_file_location(
    "prereg_analysis", os.path.join(ROOT, "experiments", "prereg_analysis.py"))
prereg = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prereg)


def test_paired_p_value_is_scipys_one_sample_t_test():
  d = [0.01, 0.02, -0.005, 0.015, 0.01, 0.0]
  assert paired.paired_p_value(d) == pytest.approx(stats.ttest_1samp(d, 0).pvalue, rel=1e-12)
  assert paired.paired_p_value([0.01, 0.01]) == 0.0
  assert paired.paired_p_value([0.0, 0.0]) == 1.0


def test_holm_adjusts_step_down_and_keeps_order():
  # Sorted 0.01, 0.03, 0.04 -> 0.03, 0.06, max(0.06, 0.04) = 0.06.
  assert paired.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
  assert paired.holm([0.6, 0.02]) == pytest.approx([0.6, 0.04])
  assert paired.holm_levels([0.01, 0.04, 0.03]) == pytest.approx([1 - 0.05 / 3, 0.95, 0.975])


def test_welch_interval_is_scipys():
  a, b = [1.0, 2.0, 3.0, 4.0], [2.0, 2.5, 3.0, 9.0, 1.0]
  mean, low, high = paired.welch_ci(a, b)
  ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
  assert (mean, low, high) == pytest.approx((-1.0, ci.low, ci.high))


def _write(path, knn, few, random_init=0.70, nmi=0.5):
  os.makedirs(path)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"seed": 0, "loss": {"prior": "uniform"}}, f)
  with open(os.path.join(path, "eval.json"), "w") as f:
    json.dump({"knn_top1": knn, "knn_lt_top1": knn - 0.1, "linear_top1": knn,
               "random_init_knn_top1": random_init, "groups": {"few": few}}, f)
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    for step, value in ((100, 0.0), (1400, nmi - 0.01), (1500, nmi + 0.01)):
      f.write(json.dumps({"step": step, "proto/nmi": value,
                          "proto/raw_target_usage_effective": 8.0}) + "\n")


def _campaign(tmp_path, effect, skip=()):
  """Every planned run; B gains `effect[regime]` k-NN over A, C loses 1 point, seed noise."""
  noise = np.random.default_rng(0).normal(0, 0.002, size=100)
  for i, (name, _, _) in enumerate(prereg.sweep.prereg_rows()):
    if name in skip:
      continue
    regime, run = name.split("/")
    arm = prereg.ARM_OF_PREFIX[run.rpartition("_s")[0]]
    seed = int(run.rpartition("_s")[2])
    knn = 0.80 + 0.01 * seed + {"A": 0.0, "B": effect[regime] + noise[i], "C": -0.01}[arm]
    _write(str(tmp_path / regime / run), knn, few=knn - 0.2)
  return str(tmp_path)


def test_a_clear_long_tail_effect_reproduces_and_picks_the_uniform_marginal(tmp_path):
  runs = _campaign(tmp_path, {"prereg_lt_k10": 0.02, "prereg_balanced_k10": 0.0,
                              "prereg_hardtail_k32": 0.0})
  data, missing = prereg.load(runs)
  assert missing == []
  result = prereg.analyse(data)
  assert result["gate"]["prereg_lt_k10"] == pytest.approx(0.125)
  b = result["primary"]["B"]
  assert b["mean"] == pytest.approx(0.02, abs=0.002) and b["seeds"] == list(range(6))
  assert b["holm_p"] < 0.05 < b["confidence"]
  assert result["interaction"]["low"] > 0
  assert prereg.decide(result) == {"gate": "passed", "claim": "reproduced",
                                   "default_sinkhorn_marginal": "uniform"}
  nmi = next(c for c in result["comparisons"] if c["metric"] == "nmi")
  assert nmi["mean"] == pytest.approx(0.0)  # late mean of steps 1400 and 1500, equal in all arms
  rows = prereg.result_rows(result)
  primary = [r for r in rows if "holm_p" in r]
  assert [r["label"] for r in primary] == [prereg.ARM_LABELS["B"], prereg.ARM_LABELS["C"]]
  assert rows[-1]["regime"] == "prereg_interaction"


def test_no_effect_refutes_and_a_failed_gate_stops_everything(tmp_path):
  result = prereg.analyse(prereg.load(_campaign(
      tmp_path, dict.fromkeys(prereg.sweep.PREREG_REGIMES, 0.0)))[0])
  assert prereg.decide(result)["claim"] == "refuted at this scale"
  result["gate"]["prereg_balanced_k10"] = 0.02
  assert prereg.decide(result) == {
      "gate": "failed: lengthen every run (all arms) before reading anything"}


def test_an_unfinished_campaign_is_interim_and_never_merged(tmp_path, capsys):
  first = prereg.sweep.prereg_rows()[0][0]
  runs = _campaign(tmp_path / "runs", dict.fromkeys(prereg.sweep.PREREG_REGIMES, 0.02),
                   skip={first})
  results = tmp_path / "results.json"
  results.write_text(json.dumps([{"regime": "demo", "metric": "knn_top1"}]))
  with pytest.raises(SystemExit):
    prereg.main([runs, f"--out={tmp_path / 'out'}", f"--merge_into={results}"])
  out = capsys.readouterr().out
  assert out.startswith("INTERIM: 1 of 36 runs unfinished") and "Decisions" not in out
  assert json.loads(results.read_text()) == [{"regime": "demo", "metric": "knn_top1"}]
  assert json.load(open(tmp_path / "out" / "prereg.json"))["missing"] == [first]


def test_a_complete_campaign_merges_its_rows_in_place_of_earlier_ones(tmp_path):
  runs = _campaign(tmp_path / "runs", dict.fromkeys(prereg.sweep.PREREG_REGIMES, 0.02))
  results = tmp_path / "results.json"
  results.write_text(json.dumps([{"regime": "demo"}, {"regime": "prereg_lt_k10", "old": 1}]))
  prereg.main([runs, f"--merge_into={results}"])
  rows = json.loads(results.read_text())
  assert rows[0] == {"regime": "demo"} and not any("old" in r for r in rows)
  assert {r["regime"] for r in rows[1:]} == {*prereg.sweep.PREREG_REGIMES, "prereg_interaction"}


def test_kept_records_analyse_as_the_runs_do(tmp_path):
  runs = _campaign(tmp_path / "runs", dict.fromkeys(prereg.sweep.PREREG_REGIMES, 0.02),
                   skip={prereg.sweep.prereg_rows()[1][0]})
  os.makedirs(os.path.join(runs, "prereg_lt_k10", "msn_s0", "checkpoints"))
  assert prereg.keep_records(runs, str(tmp_path / "kept")) == 35
  assert not os.path.exists(tmp_path / "kept" / "prereg_lt_k10" / "msn_s0" / "checkpoints")
  assert prereg.load(str(tmp_path / "kept")) == prereg.load(runs)
