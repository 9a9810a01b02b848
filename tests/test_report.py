"""The report: seed grouping and mean ± std on hand-made runs, its CLI errors, the whole report
on two tiny smoke trainings, and the Figure 1 toy's splits."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from pmsn_jax.analysis import report
from pmsn_jax.analysis.runs import Run, load_run
from tests import subprocess_runs
from tests.subprocess_runs import ROOT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# demo.py:smoke made tinier still: 4 steps, a mid-training evaluation at step 2, small eval sets.
TINY = ("--config.total_steps=4", "--config.batch_size=16", "--config.log_every_steps=2",
        "--config.checkpoint_every_steps=4", "--config.eval_every_steps=2",
        "--config.eval.max_train_examples=300", "--config.eval.max_test_examples=100",
        "--config.eval.batch_size=100", "--config.eval.linear_epochs=1")


def _config(seed, prior="power_law", marginal="prior", exponent=0.25, **data):
  return {"seed": seed, "model": {"num_prototypes": 4},
          "data": {"imbalance_ratio": 100.0, **data},
          "loss": {"prior": prior, "prior_exponent": exponent, "sinkhorn_marginal": marginal,
                   "sinkhorn_iters": 3, "kl_direction": "mean_to_prior"}}


def _eval(knn, linear=0.7, lowshot=None):
  result = {"knn_top1": knn, "knn_lt_top1": knn - 0.1, "linear_top1": linear,
            "per_class_top1": [1.0, 0.5, None, knn], "per_class_classifier": "knn",
            "groups": {"many": 0.9, "medium": None, "few": knn / 2},
            "pretrain_class_counts": [5, 500, 0, 50], "step": 8}
  if lowshot is not None:
    result["lowshot"] = lowshot
  return result


def _write_run(path, config, result=None, metrics=(), prototypes=None):
  os.makedirs(path)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  if result is not None:
    with open(os.path.join(path, "eval.json"), "w") as f:
      json.dump(result, f)
  if metrics:
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
      f.writelines(json.dumps(row) + "\n" for row in metrics)
  if prototypes is not None:
    with open(os.path.join(path, "prototypes.jsonl"), "w") as f:
      f.write(json.dumps(prototypes) + "\n")
  return str(path)


def _pngs_linked(markdown, out):
  names = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
  for name in names:
    with open(os.path.join(out, name), "rb") as f:
      assert f.read(8) == PNG_MAGIC, name
  return names


# --- aggregation, on hand-made eval.json dicts -------------------------------------------------

def test_groups_seeds_and_aggregates_mean_and_sample_std():
  runs = [Run("a", _config(0), _eval(0.80)),
          Run("b", _config(1), _eval(0.82)),
          Run("c", _config(0, "uniform", "uniform"), _eval(0.75, lowshot={
              "1": {"mean": 0.3, "std": 0.01}, "5": [0.5, 0.7]})),
          Run("d", _config(0, imbalance_ratio=10.0))]  # no eval.json
  groups = report.group_runs(runs)
  # Groups sharing a method label are told apart by the config keys where they differ.
  pmsn = "PMSN τ_p=0.25, Sinkhorn prior"
  assert [g.label for g in groups] == [f"{pmsn} (data.imbalance_ratio=100)", "MSN",
                                       f"{pmsn} (data.imbalance_ratio=10)"]
  assert [[r.path for r in g.runs] for g in groups] == [["a", "b"], ["c"], ["d"]]
  assert runs[1].label == f"{pmsn} (data.imbalance_ratio=100), seed 1"

  cells = report.aggregate(groups[0].runs)
  assert cells["knn_top1"].mean == pytest.approx(0.81)
  assert cells["knn_top1"].std == pytest.approx(0.0141421, rel=1e-4)  # ddof = 1
  assert cells["few_top1"].mean == pytest.approx(0.405)
  assert "medium_top1" not in cells  # None in every run
  # Balanced accuracy from per-class accuracy when eval.json has none (None classes left out).
  assert cells["balanced_top1"].mean == pytest.approx((1.5 + 0.81) / 3)
  assert report.format_cell(cells["knn_top1"], 2) == "81.00 ± 1.41"
  assert report.format_cell(report.aggregate(groups[1].runs)["knn_top1"], 1) == "75.00"
  assert report.format_cell(report.Cell(0.5, None, 1), 3) == "50.00 (n=1)"
  assert report.format_cell(None, 2) == "—"

  lines, rows = report.results_table(groups)
  header = lines[0]
  assert "low-shot 1/class" in header and "low-shot 5/class" in header
  pmsn, msn, unevaluated = lines[2:]
  assert "| 2 (0, 1) |" in pmsn and "81.00 ± 1.41" in pmsn
  assert pmsn.rstrip(" |").endswith("— | —")  # no low-shot in these runs
  assert msn.rstrip(" |").endswith("30.00 | 60.00")
  assert "| 0 () |" in unevaluated and "±" not in unevaluated
  assert rows[0]["knn_top1_mean"] == pytest.approx(0.81) and rows[0]["seeds"] == [0, 1]
  assert rows[1]["method"] == "MSN" and rows[1]["lowshot_5_mean"] == pytest.approx(0.6)
  assert rows[2]["knn_top1_mean"] is None and rows[2]["knn_top1_n"] == 0


def test_method_labels():
  assert report.method_label(_config(0, "uniform", "uniform")) == "MSN"
  assert report.method_label(_config(0, exponent=0.5, marginal="uniform")) == (
      "PMSN τ_p=0.5, Sinkhorn uniform")
  off = _config(0)
  off["loss"]["sinkhorn_iters"] = 0
  assert report.method_label(off) == "PMSN τ_p=0.25, Sinkhorn off"
  assert report.method_label(_config(0, "fit")) == "PMSN τ_p fitted, Sinkhorn prior"
  longer = _config(0, exponent=1.0)
  longer["loss"]["sinkhorn_iters"] = 10
  assert report.method_label(longer) == "PMSN τ_p=1, Sinkhorn prior (10 iterations)"
  msn = _config(0, "uniform", "uniform")
  msn["loss"]["sinkhorn_iters"] = 10
  assert report.method_label(msn) == "MSN"  # still the baseline PMSN groups pair with
  ranked = _config(0, exponent=2.0)
  ranked["loss"]["prior_order"] = "sorted"
  assert report.method_label(ranked) == "PMSN τ_p=2, Sinkhorn prior, sorted prior"
  ranked["loss"].update(prior="uniform", sinkhorn_marginal="uniform")  # sorting uniform: no-op
  assert report.method_label(ranked) == "MSN"


def test_runs_from_before_a_config_key_group_with_runs_that_have_its_default(tmp_path):
  new = _config(1)
  new["loss"]["prior_order"] = "fixed"
  new["data"]["class_order"] = []  # config.json's form of the default ()
  old = _config(0)
  del old["loss"]["kl_direction"]
  runs = [load_run(_write_run(tmp_path / name, config, _eval(0.8)))
          for name, config in (("old", old), ("new", new))]
  groups = report.group_runs(runs)
  assert len(groups) == 1 and [r.seed for r in groups[0].runs] == [0, 1]
  # results.json names the order for PMSN (old runs read as "fixed"), none for MSN.
  msn = load_run(_write_run(tmp_path / "msn", _config(0, "uniform", "uniform"), _eval(0.8)))
  _, rows = report.results_table(report.group_runs(runs + [msn]))
  assert [row["prior_order"] for row in rows] == ["fixed", None]
  assert [row["features"] for row in rows] == ["cls", "cls"]  # eval.features' default
  assert [row["kl_direction"] for row in rows] == ["mean_to_prior"] * 2


def test_one_run_scored_with_two_readouts_is_two_labelled_rows(tmp_path):
  scored, rescored = _config(0), _config(0)
  scored["eval"], rescored["eval"] = {"features": "cls"}, {"features": "cls_avgpool"}
  runs = [load_run(_write_run(tmp_path / name, config, _eval(knn)))
          for name, config, knn in (("cls", scored, 0.8), ("both", rescored, 0.82))]
  _, rows = report.results_table(report.group_runs(runs))
  assert [row["features"] for row in rows] == ["cls", "cls_avgpool"]
  assert rows[1]["method"] == "PMSN τ_p=0.25, Sinkhorn prior (eval.features=cls_avgpool)"


def test_report_of_hand_made_runs_notes_missing_inputs(tmp_path):
  usage = {"step": 8, "target_usage_sorted": [0.5, 0.3, 0.2, 0.0],
           "mean_prediction_sorted": [0.4, 0.3, 0.2, 0.1], "prior_sorted": [0.4, 0.3, 0.2, 0.1]}
  metrics = [{"step": s, "loss": 3.0 - s / 10, "ce": 2.0, "learning_rate": 1e-3}
             for s in (2, 4, 6, 8)] + [{"step": s, "eval/knn_top1": 0.5 + s / 100,
                                        "eval/knn_lt_top1": 0.4} for s in (4, 8)]
  a = _write_run(tmp_path / "a", _config(0), _eval(0.80), metrics, usage)
  b = _write_run(tmp_path / "b", _config(1), _eval(0.82), metrics[:2])
  for run, wall_s, cores in ((a, 600, 1), (b, 300, 2)):  # as experiments/sweep.py writes it
    with open(os.path.join(run, "driver.json"), "w") as f:
      json.dump({"wall_s": wall_s, "cores": cores, "returncode": 0}, f)
  out = tmp_path / "out"
  assert report.main([a, b, "--out", str(out)]) == 0

  markdown = (out / "report.md").read_text()
  assert a in markdown and b in markdown and "81.00 ± 1.41" in markdown
  assert f"`{b}`: no prototypes.jsonl" in markdown
  assert "no eval.json holds `lowshot`" in markdown
  assert sorted(_pngs_linked(markdown, out)) == ["knn_over_steps.png", "per_class_accuracy.png",
                                                 "prototype_usage.png", "training_curves.png"]
  row = json.loads((out / "results.json").read_text())[0]
  assert row["seeds"] == [0, 1] and row["cpu_minutes"] == pytest.approx(20.0)

  # Rerun without what the plots need: no stale PNG stays behind, the reasons are given.
  os.remove(os.path.join(a, "prototypes.jsonl"))
  os.remove(os.path.join(a, "metrics.jsonl"))
  for run, knn in ((a, 0.80), (b, 0.82)):
    result = _eval(knn)
    del result["pretrain_class_counts"]
    with open(os.path.join(run, "eval.json"), "w") as f:
      json.dump(result, f)
  assert report.main([a, b, "--out", str(out)]) == 0
  markdown = (out / "report.md").read_text()
  assert "no run has prototypes.jsonl" in markdown and "no mid-training evaluations" in markdown
  assert "classes in index order" in markdown
  assert sorted(_pngs_linked(markdown, out)) == ["per_class_accuracy.png", "training_curves.png"]
  assert not (out / "prototype_usage.png").exists() and not (out / "knn_over_steps.png").exists()


def test_paired_comparison_pairs_seeds_within_a_setting(tmp_path):
  # MSN and PMSN at two batch skews, seeds 0-2 (PMSN lacks seed 2 at skew 0.8): each PMSN
  # group is compared with the MSN group of its own skew, over the seeds both have.
  runs, knn = [], {}
  for skew in (0.0, 0.8):
    for seed in range(3):
      for method, prior, marginal, bump in (("msn", "uniform", "uniform", 0.0),
                                            ("pmsn", "power_law", "prior", 0.01 + seed / 100)):
        if (method, skew, seed) == ("pmsn", 0.8, 2):
          continue
        value = 0.70 + seed / 50 + bump + skew / 10
        knn[method, skew, seed] = value
        runs.append(_write_run(tmp_path / f"{method}_{skew}_{seed}",
                               _config(seed, prior, marginal, batch_class_skew=skew),
                               _eval(value)))
  out = tmp_path / "out"
  assert report.main([*runs, "--out", str(out)]) == 0
  rows = [r for r in json.loads((out / "paired.json").read_text()) if r["metric"] == "knn_top1"]
  assert [r["seeds"] for r in rows] == [[0, 1, 2], [0, 1]]
  for row, skew, seeds in zip(rows, (0.0, 0.8), ([0, 1, 2], [0, 1])):
    d = [knn["pmsn", skew, s] - knn["msn", skew, s] for s in seeds]
    mean = sum(d) / len(d)
    sd = (sum((x - mean) ** 2 for x in d) / (len(d) - 1)) ** 0.5
    t975 = {2: 4.302652729911275, 1: 12.706204736174705}[len(d) - 1]  # Student t tables
    assert row["pmsn_minus_msn_mean"] == pytest.approx(mean)
    assert row["ci95_high"] - row["pmsn_minus_msn_mean"] == pytest.approx(
        t975 * sd / len(d) ** 0.5)
    assert f"batch_class_skew={skew:g}" in row["regime"]
  # Seeds 0-2 at skew 0: differences 0.01, 0.02, 0.03 -> interval [-0.0048, 0.0448]: "no".
  assert "| +2.00 | [-0.48, +4.48] | no |" in (out / "report.md").read_text()


def test_bad_run_dirs_fail_in_one_line_with_status_2(tmp_path, capsys):
  out = str(tmp_path / "out")
  assert report.main([str(tmp_path / "nope"), "--out", out]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "does not exist" in err and "--workdir" in err
  (tmp_path / "empty").mkdir()
  assert report.main([str(tmp_path / "empty"), "--out", out]) == 2
  assert "no config.json" in capsys.readouterr().err
  run = _write_run(tmp_path / "run", _config(0))
  assert report.main([run, run, "--out", out]) == 2
  assert "given twice" in capsys.readouterr().err
  # A glob like runs/PLAN/* also matches the plan's report folder: it is skipped, not an error.
  assert report.main([run, out, "--out", out]) == 0
  assert "skipping" in capsys.readouterr().out
  assert report.main([out, "--out", out]) == 2
  assert "only RUN_DIR given is --out" in capsys.readouterr().err
  with pytest.raises(SystemExit) as exit_info:
    report.main([run])  # no --out
  assert exit_info.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_without_matplotlib_the_cli_names_the_extra_in_one_line(tmp_path, capsys, monkeypatch):
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "matplotlib" else find_spec(name, *a))
  assert report.main([_write_run(tmp_path / "run", _config(0)), "--out", str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and ".[analysis]" in err


# --- the analysis package stays out of the core ------------------------------------------------

def test_training_and_evaluation_never_import_the_analysis_package():
  # Campaign analysis (and its optional matplotlib) must not become a dependency of the core.
  # matplotlib is made unimportable rather than looked for in sys.modules: where it is installed,
  # `import tensorflow` loads it through keras (which tolerates its absence), not through us.
  code = ("import sys; sys.modules['matplotlib'] = None\n"
          "import pmsn_jax.evaluate, pmsn_jax.main, pmsn_jax.train\n"
          "print(sorted(m for m in sys.modules if m.startswith('pmsn_jax.analysis')))")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().splitlines()[-1] == "[]"


# --- the Figure 1 toy ---------------------------------------------------------------------------

def test_toy_uniform_prior_splits_the_big_blob_power_law_keeps_blobs(tmp_path):
  out = tmp_path / "toy.png"
  proc = subprocess.run([sys.executable, "experiments/toy_prior_clustering.py", f"--out={out}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  found = {}
  for line in proc.stdout.splitlines():
    m = re.match(r"(uniform|power-law).*cluster sizes \[(\d+), (\d+)\]; big blob per cluster "
                 r"\[(\d+), (\d+)\]; small blob per cluster \[(\d+), (\d+)\]", line)
    if m:
      found[m.group(1)] = [int(x) for x in m.groups()[1:]]
  _, _, big_0, big_1, _, _ = found["uniform"]
  assert min(big_0, big_1) > 0.3 * 900  # equal-size clusters: the big blob is cut
  _, _, big_0, big_1, small_0, small_1 = found["power-law"]
  assert big_0 >= 0.98 * 900 and small_1 >= 0.98 * 100  # one cluster per blob
  assert out.read_bytes()[:8] == PNG_MAGIC


# --- the whole report on two tiny smoke trainings -----------------------------------------------

def _slow(test):
  for mark in subprocess_runs.MARKS:
    test = mark(test)
  return test


@_slow
def test_report_on_two_tiny_smoke_runs(tmp_path):
  env = dict(os.environ, XLA_FLAGS="")  # one CPU device, like the README's demo
  workdirs = [str(tmp_path / f"seed{seed}") for seed in (0, 1)]
  procs = []
  for seed, workdir in enumerate(workdirs):  # both at once: two cores
    log = open(tmp_path / f"seed{seed}.log", "w+")
    procs.append((log, subprocess.Popen(
        [sys.executable, "-m", "pmsn_jax.main", "--config=configs/demo.py:smoke",
         f"--workdir={workdir}", f"--config.seed={seed}", *TINY],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)))
  for log, proc in procs:
    returncode = proc.wait(timeout=300)
    log.seek(0)
    assert returncode == 0, log.read()[-3000:]
    log.close()

  out = tmp_path / "report"
  proc = subprocess.run(
      [sys.executable, "-m", "pmsn_jax.analysis.report", *workdirs, "--out", str(out)],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  markdown = (out / "report.md").read_text()
  assert all(workdir in markdown for workdir in workdirs)
  row = next(line for line in markdown.splitlines() if line.startswith("| PMSN τ_p=0.25"))
  assert "| 2 (0, 1) |" in row and row.count("±") >= 4  # k-NN, LT bank, linear, random init
  names = _pngs_linked(markdown, out)
  assert {"training_curves.png", "knn_over_steps.png", "per_class_accuracy.png"} <= set(names)
  # prototypes.jsonl is newer than some trainings: plotted when written, else said so.
  assert "prototype_usage.png" in names or "no run has prototypes.jsonl" in markdown
