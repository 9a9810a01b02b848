"""experiments/: the sweep's plans (equal compute within a plan, resumability, pinning), the
prior-shape table, and results.json collection from report directories."""

import importlib.util
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from tests.subprocess_runs import ROOT


def _script(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "experiments",
                                                                   f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


sweep, prior_shapes = _script("sweep"), _script("prior_shapes")

ARGS = types.SimpleNamespace(tau=0.25, marginal="prior", sorted_prior=False, seeds=3, skew=0.8,
                             steps=0, imbalance=0, prototypes=0, kl_direction="mean_to_prior")


def _overrides(rows):
  return [dict(o.removeprefix("--config.").split("=", 1) for o in overrides)
          for _, _, overrides in rows]


@pytest.mark.parametrize("plan, runs", [("prior_grid", 10), ("paired", 6), ("minibatch", 4),
                                        ("imbalance", 24), ("prereg", 36)])
def test_plans_have_their_runs_with_unique_names(plan, runs):
  rows = sweep.plan_rows(plan, ARGS)
  assert len(rows) == runs and len({name for name, _, _ in rows}) == runs


def test_prior_grid_is_msn_plus_every_tau_and_marginal():
  rows = sweep.plan_rows("prior_grid", ARGS)
  assert rows[0][:2] == ("msn_s0", "msn")
  cells = {(o["loss.prior_exponent"], o.get("loss.sinkhorn_marginal", "off"))
           for o in _overrides(rows[1:])}
  assert cells == {(t, m) for t in ("0.25", "0.5", "1.0") for m in ("prior", "uniform", "off")}
  assert all(o["loss.sinkhorn_iters"] == "0" for o in _overrides(rows[1:])
             if "loss.sinkhorn_marginal" not in o)


def test_paired_plan_gives_both_methods_the_same_seeds():
  rows = sweep.plan_rows("paired", ARGS)
  seeds = {}
  for (name, arg, _), o in zip(rows, _overrides(rows)):
    seeds.setdefault(arg or "pmsn", []).append(o["seed"])
  assert seeds == {"msn": ["0", "1", "2"], "pmsn": ["0", "1", "2"]}
  # In another cell both methods move there, and the names say so.
  rows = sweep.plan_rows("paired", types.SimpleNamespace(**{**vars(ARGS), "imbalance": 1000.0,
                                                            "prototypes": 16}))
  assert [name for name, _, _ in rows[:2]] == ["msn_r1000_k16_s0",
                                              "pmsn_tau0.25_prior_r1000_k16_s0"]
  assert all(o["data.imbalance_ratio"] == "1000" and o["model.num_prototypes"] == "16"
             for o in _overrides(rows))


def test_sorted_prior_runs_are_named_and_configured_apart():
  args = types.SimpleNamespace(**{**vars(ARGS), "sorted_prior": True, "tau": 2.0})
  names = [name for name, _, _ in sweep.plan_rows("minibatch", args)]
  assert names == ["msn_skew0.0_s0", "pmsn_tau2.0_prior_sorted_skew0.0_s0",
                   "msn_skew0.8_s0", "pmsn_tau2.0_prior_sorted_skew0.8_s0"]
  overrides = _overrides(sweep.plan_rows("minibatch", args))
  assert [o.get("loss.prior_order") for o in overrides] == [None, "sorted", None, "sorted"]
  with pytest.raises(SystemExit, match="fixed-order"):
    sweep.plan_rows("prior_grid", args)


def test_reverse_kl_reaches_pmsn_runs_only_and_names_them():
  args = types.SimpleNamespace(**{**vars(ARGS), "kl_direction": "prior_to_mean", "tau": 1.0,
                                  "seeds": 1})
  rows = sweep.plan_rows("paired", args)
  assert [name for name, _, _ in rows] == ["msn_s0", "pmsn_tau1.0_prior_prior_to_mean_s0"]
  # MSN keeps ME-MAX: KL(p̄ ‖ uniform) is its regulariser, whichever direction PMSN uses.
  assert [o.get("loss.kl_direction") for o in _overrides(rows)] == [None, "prior_to_mean"]
  with pytest.raises(SystemExit, match="fixed-order"):
    sweep.plan_rows("prior_grid", args)


def test_long_plan_is_one_run_named_by_its_length_with_four_evaluations():
  rows = sweep.plan_rows("long", types.SimpleNamespace(**{**vars(ARGS), "steps": 16000}))
  assert [(name, arg) for name, arg, _ in rows] == [("pmsn_16k", "")]
  assert _overrides(rows) == [{"total_steps": "16000", "eval_every_steps": "4000"}]
  with pytest.raises(SystemExit, match="long needs --steps"):
    sweep.plan_rows("long", ARGS)


def test_overrides_reach_every_run_of_the_plan(tmp_path):
  result = subprocess.run([sys.executable, "experiments/sweep.py", "paired", "--seeds=1",
                           "--dry_run", f"--runs_dir={tmp_path}",
                           "--override=data.class_order=(1,0,2,3,4,5,6,7,8,9)"],
                          cwd=ROOT, capture_output=True, text=True, check=True)
  commands = [line for line in result.stdout.splitlines() if "pmsn_jax.main" in line]
  assert len(commands) == 2
  assert all(c.endswith(" '--config.data.class_order=(1,0,2,3,4,5,6,7,8,9)'") for c in commands)


def test_length_overrides_keep_the_schedule_shape():
  assert sweep.length_overrides(0) == []
  o = dict(x.removeprefix("--config.").split("=") for x in sweep.length_overrides(1000))
  assert o == {"total_steps": "1000", "optim.warmup_steps": "100",
               "checkpoint_every_steps": "250", "log_every_steps": "100"}


def test_single_threaded_env_adds_to_existing_xla_flags(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
  env = sweep.single_threaded_env()
  assert env["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_cpu_multi_thread_eigen=false"
  assert env["TF_NUM_INTRAOP_THREADS"] == env["OMP_NUM_THREADS"] == "1"


def test_a_finished_run_is_skipped_and_a_dry_run_only_prints(tmp_path):
  done = tmp_path / "done"
  done.mkdir()
  (done / "eval.json").write_text(json.dumps({"knn_top1": 0.8}))
  assert sweep.run_one(str(done), "msn", [], dry_run=False).startswith("skip (done)")
  line = sweep.run_one(str(tmp_path / "new"), "msn", ["--config.seed=1"], dry_run=True)
  assert "--config=configs/demo.py:msn" in line and line.endswith("--config.seed=1")
  assert not (tmp_path / "new").exists()


def test_driver_record_adds_up_the_parts_of_a_resumed_run(tmp_path, monkeypatch):
  record_path = str(tmp_path / "driver.json")
  # A first part whose driver was killed: only its periodic record is left (1 core pinned).
  (tmp_path / "driver.json").write_text(json.dumps({"wall_s": 100.0, "core_s": 100.0,
                                                    "parts": 1, "returncode": None}))
  seen_while_running = []
  command = [sys.executable, "-c", "import time; time.sleep(0.6)"]
  original_write = json.dump

  def spy(obj, f, **kw):
    seen_while_running.append(dict(obj))
    return original_write(obj, f, **kw)

  monkeypatch.setattr(sweep.json, "dump", spy)
  record = sweep.timed_call(command, record_path, cores=2, pinned_core=None, resumes=True,
                            update_every_s=0.1)
  monkeypatch.undo()
  assert record["returncode"] == 0 and record["parts"] == 2
  part = record["wall_s"] - 100
  assert 0.5 <= part < 30
  # This part had 2 cores: core_s adds wall x cores per part, not total wall x last cores.
  assert record["core_s"] == pytest.approx(100 + 2 * part, abs=0.2)
  assert json.loads((tmp_path / "driver.json").read_text()) == record
  # Updated while the command ran, before it finished.
  running = [r for r in seen_while_running if r["finished"] is None]
  assert running and all(100 < r["wall_s"] <= record["wall_s"] for r in running)
  assert not (tmp_path / "driver.json.tmp").exists()


@pytest.mark.parametrize("earlier, resumes", [('{"wall_s": 100.0, "cores": 1}', False),
                                              ('{"wall_s": 10', True), ('[1, 2]', True),
                                              ('{"wall_s": null}', True)])
def test_driver_record_starts_from_zero_for_a_fresh_run_or_an_unusable_record(
    tmp_path, capsys, earlier, resumes):
  record_path = tmp_path / "driver.json"
  record_path.write_text(earlier)
  record = sweep.timed_call([sys.executable, "-c", "pass"], str(record_path), cores=1,
                            pinned_core=None, resumes=resumes)
  assert record["returncode"] == 0 and record["parts"] == 1 and record["wall_s"] < 30
  assert ("unreadable" in capsys.readouterr().err) == resumes


def test_sigterm_to_the_driver_stops_its_runs_and_starts_no_more(tmp_path, monkeypatch):
  monkeypatch.setattr(sweep, "_stopping", sweep.threading.Event())
  record_path = str(tmp_path / "driver.json")
  result = {}
  runner = sweep.threading.Thread(target=lambda: result.update(sweep.timed_call(
      [sys.executable, "-c", "import time; time.sleep(60)"], record_path, cores=1,
      pinned_core=0, resumes=False)))
  runner.start()
  deadline = sweep.time.time() + 30
  while not sweep._running and sweep.time.time() < deadline:
    sweep.time.sleep(0.05)
  sweep.stop_on_sigterm()
  runner.join(timeout=30)
  assert not runner.is_alive() and result["returncode"] == -15 and result["wall_s"] < 30
  assert result["finished"] is None  # stopped, not finished
  assert json.loads((tmp_path / "driver.json").read_text()) == result
  assert not sweep._running
  assert sweep.run_one(str(tmp_path / "next"), "msn", [], dry_run=False).startswith(
      "skip (stopped by SIGTERM)")
  assert not (tmp_path / "next").exists()


def test_a_real_sigterm_stops_the_sweep_with_143_and_records_its_run(tmp_path):
  driver = subprocess.Popen([sys.executable, "experiments/sweep.py", "paired", "--seeds=2",
                             "--steps=10", f"--runs_dir={tmp_path}"], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
  first_log = tmp_path / "paired" / "msn_s0" / "driver.log"
  deadline = sweep.time.time() + 60
  while not first_log.exists() and sweep.time.time() < deadline:
    sweep.time.sleep(0.1)
  sweep.time.sleep(0.5)  # the run has started (it is killed long before it can finish)
  driver.send_signal(sweep.signal.SIGTERM)
  out, _ = driver.communicate(timeout=120)
  assert driver.returncode == 143 and "stopped by SIGTERM" in out
  assert out.count("skip (stopped by SIGTERM)") == 3  # the other three runs never started
  record = json.loads((tmp_path / "paired" / "msn_s0" / "driver.json").read_text())
  assert record["returncode"] != 0 and record["finished"] is None


def test_a_plan_directory_keeps_one_set_of_overrides(tmp_path):
  plan = str(tmp_path / "paired")
  sweep.check_overrides(plan, ["data.class_order=(1,0)"])
  sweep.check_overrides(plan, ["data.class_order=(1,0)"])  # the same sweep again: fine
  with pytest.raises(SystemExit, match="swept with --override.*another --runs_dir"):
    sweep.check_overrides(plan, [])
  made_without = tmp_path / "other"
  (made_without / "msn_s0").mkdir(parents=True)
  with pytest.raises(SystemExit, match="holds runs made without --override"):
    sweep.check_overrides(str(made_without), ["seed=3"])
  sweep.check_overrides(str(made_without), [])  # and it stays an override-free directory
  with pytest.raises(SystemExit, match="swept with --override none"):
    sweep.check_overrides(str(made_without), ["seed=3"])


def test_has_checkpoint_needs_a_finished_step(tmp_path):
  assert not sweep.has_checkpoint(str(tmp_path))
  (tmp_path / "checkpoints" / "8.orbax-checkpoint-tmp-1").mkdir(parents=True)
  assert not sweep.has_checkpoint(str(tmp_path))
  (tmp_path / "checkpoints" / "8").mkdir()
  assert sweep.has_checkpoint(str(tmp_path))


def test_unknown_plan_names_the_plans():
  with pytest.raises(SystemExit, match="prior_grid, paired, minibatch"):
    sweep.plan_rows("grid", ARGS)


@pytest.mark.parametrize("script,argv,message", [
    ("sweep.py", ["paired", "--steps=-5"], "--steps=-5: expected >= 0"),
    ("sweep.py", ["paired", "--seeds=0"], "--seeds=0: expected >= 1"),
    ("sweep.py", ["paired", "--imbalance=0.5"], "--imbalance=0.5: expected >= 1"),
    ("sweep.py", ["minibatch", "--skew=2"], "must be in [0, 1]"),
    ("sweep.py", ["minibatch", "--override=data.class_order=(1,0)"], "balanced data"),
    ("sweep.py", ["paired", "--override=seed"], "expected KEY=VALUE"),
    ("sweep.py", ["paired", "--override=config.seed=1"], "expected KEY=VALUE"),
    ("prior_shapes.py", ["--prototypes=16,x"], "comma-separated numbers"),
    ("prior_shapes.py", ["--exponents=-1"], "--exponents >= 0"),
])
def test_bad_arguments_fail_in_one_line(script, argv, message):
  result = subprocess.run([sys.executable, f"experiments/{script}", *argv],
                          cwd=ROOT, capture_output=True, text=True)
  assert result.returncode == 2 and message in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith(f"{script}: error:")


def test_prior_shapes_effective_numbers():
  assert prior_shapes.effective_number(prior_shapes.power_law(32, 0.0)) == pytest.approx(32)
  assert prior_shapes.effective_number([0.5, 0.5, 0.0]) == pytest.approx(2)
  # The demo's long-tailed class counts (configs/demo.py docstring: 14,886 images, 6000 ... 60).
  counts = np.floor(6000 * 100.0 ** (-np.arange(10) / 9))
  assert counts.sum() == 14886 and counts[-1] == 60
  np.testing.assert_allclose(prior_shapes.class_distribution(100), counts / counts.sum())
  tau = [prior_shapes.effective_number(prior_shapes.power_law(32, t)) for t in (0.25, 1, 2)]
  assert 31 < tau[0] < 32 and tau[0] > tau[1] > tau[2]


def test_collect_results_writes_method_and_paired_rows(tmp_path):
  report = tmp_path / "report"
  report.mkdir()
  table = [{"method": "MSN", "msn": True, "prior": "uniform", "prior_exponent": 0.25,
            "sinkhorn_marginal": "uniform", "seeds": [0, 1], "knn_top1_mean": 0.8,
            "knn_top1_std": 0.01, "linear_top1_mean": 0.77, "few_top1_mean": 0.9,
            "random_init_knn_top1_mean": 0.74, "random_init_knn_top1_std": 0.0,
            "cpu_minutes": 30.0},
           {"method": "PMSN τ_p=1, Sinkhorn prior", "msn": False, "prior": "power_law",
            "prior_exponent": 1.0, "prior_order": "sorted",
            "sinkhorn_marginal": "prior", "seeds": [0, 1], "knn_top1_mean": 0.81,
            "knn_top1_std": 0.02, "linear_top1_mean": 0.78, "few_top1_mean": None,
            "cpu_minutes": 31.0}]
  pairs = [{"regime": "PMSN τ_p=1, Sinkhorn prior", "versus": "MSN", "metric": "knn_top1",
            "seeds": [0, 1], "pmsn_minus_msn_mean": 0.01, "ci95_low": -0.1, "ci95_high": 0.12}]
  (report / "results.json").write_text(json.dumps(table))
  (report / "paired.json").write_text(json.dumps(pairs))
  raw = tmp_path / "raw"
  raw.mkdir()
  (raw / "eval.json").write_text(json.dumps({"knn_top1": 0.857, "linear_top1": 0.84,
                                             "groups": {"few": 0.95}}))
  (raw / "driver.json").write_text(json.dumps({"wall_s": 30, "cores": 2}))
  unit = tmp_path / "raw01"  # pixels in [0, 1]: raw_pixels.py records the normalisation
  unit.mkdir()
  (unit / "eval.json").write_text(json.dumps({"knn_top1": 0.846, "pixel_mean": [0.0],
                                              "pixel_std": [1.0]}))
  out = tmp_path / "results.json"
  subprocess.run([sys.executable, "experiments/collect_results.py", f"--out={out}",
                  f"--report=prior_grid:{report}", f"--raw_pixels={raw}",
                  f"--raw_pixels={unit}"], cwd=ROOT, check=True)
  rows = json.loads(out.read_text())
  assert rows[1]["label"] == "raw pixels in [0, 1]" and rows[1]["cpu_minutes"] is None
  del rows[1]
  assert [r.get("method") for r in rows] == ["raw_pixels", "random_init", "msn", "pmsn", None]
  assert rows[0]["cpu_minutes"] == 1.0 and rows[0]["few_top1_mean"] == 0.95
  assert rows[1]["knn_top1_mean"] == 0.74 and rows[2]["prior_exponent"] is None
  assert [r["prior_order"] for r in rows[:4]] == [None, None, None, "sorted"]
  assert [r["kl_direction"] for r in rows[:4]] == [None] * 4  # the report predates the field
  assert [r.get("features") for r in rows[:4]] == [None] * 4  # likewise
  main_keys = {"method", "prior", "prior_exponent", "sinkhorn_marginal", "seeds",
               "knn_top1_mean", "knn_top1_std", "linear_top1_mean", "few_top1_mean",
               "cpu_minutes"}
  assert all(main_keys <= set(r) for r in rows[:4])
  assert rows[4]["regime"] == "prior_grid" and rows[4]["ci95_high"] == 0.12
  assert {"regime", "metric", "seeds", "pmsn_minus_msn_mean", "ci95_low", "ci95_high"} <= set(
      rows[4])
  # --keep: a new regime is added next to the earlier file's rows; a re-collected one replaces
  # its rows (runs/ does not outlive a session, the earlier tables must survive).
  table[1]["kl_direction"] = "prior_to_mean"
  (report / "results.json").write_text(json.dumps(table))
  kept = tmp_path / "kept.json"
  for regime in ("hard_tail", "hard_tail"):  # twice: the second run replaces, never duplicates
    subprocess.run([sys.executable, "experiments/collect_results.py", f"--out={kept}",
                    f"--keep={kept if kept.exists() else out}", f"--report={regime}:{report}"],
                   cwd=ROOT, check=True)
  merged = json.loads(kept.read_text())
  assert [(r["regime"], r.get("method")) for r in merged] == [
      ("baseline", "raw_pixels"), ("baseline", "raw_pixels"), ("prior_grid", "random_init"),
      ("prior_grid", "msn"), ("prior_grid", "pmsn"), ("hard_tail", "random_init"),
      ("hard_tail", "msn"), ("hard_tail", "pmsn"), ("prior_grid", None), ("hard_tail", None)]
  assert merged[:5] == json.loads(out.read_text())[:5]  # copied as they were
  assert merged[7]["kl_direction"] == "prior_to_mean"
  missing = subprocess.run([sys.executable, "experiments/collect_results.py", f"--out={kept}",
                            f"--keep={tmp_path / 'nope.json'}", f"--report=x:{report}"],
                           cwd=ROOT, capture_output=True, text=True)
  assert missing.returncode != 0 and "drop --keep" in missing.stderr
  bad = subprocess.run([sys.executable, "experiments/collect_results.py", f"--out={out}",
                        f"--report={report}"], cwd=ROOT, capture_output=True, text=True)
  assert bad.returncode == 2 and "REGIME:DIR" in bad.stderr
  del table[0]["msn"]  # a report written before the "msn" column
  (report / "results.json").write_text(json.dumps(table))
  old = subprocess.run([sys.executable, "experiments/collect_results.py", f"--out={out}",
                        f"--report=prior_grid:{report}"], cwd=ROOT, capture_output=True, text=True)
  assert old.returncode == 2 and "rerun python -m pmsn_jax.analysis.report" in old.stderr


def test_imbalance_map_pairs_cells_and_seeds(tmp_path):
  imbalance_map = _script("imbalance_map")

  def run(name, ratio, k, knn, prior="power_law", marginal="prior", seed=0, nmi=0.5):
    path = tmp_path / "plan" / name
    path.mkdir(parents=True)
    config = {"seed": seed, "model": {"num_prototypes": k}, "data": {"imbalance_ratio": ratio},
              "loss": {"prior": prior, "prior_exponent": 1.0, "sinkhorn_marginal": marginal,
                       "sinkhorn_iters": 3, "kl_direction": "mean_to_prior"}}
    (path / "config.json").write_text(json.dumps(config))
    (path / "eval.json").write_text(json.dumps({"knn_top1": knn, "knn_lt_top1": knn - 0.1,
                                                "linear_top1": knn, "groups": {"few": 0.5}}))
    rows = [{"step": s, "loss": 1.0, "proto/nmi": nmi + s / 100, "prototypes_in_use": 10}
            for s in range(1, 6)] + [{"step": 5, "eval/knn_top1": knn}]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

  run("msn_r1000_k16", 1000, 16, 0.70, "uniform", "uniform")
  run("pmsn_r1000_k16", 1000, 16, 0.73)
  run("msn_r10_k16", 10, 16, 0.80, "uniform", "uniform")
  run("pmsn_r10_k16", 10, 16, 0.79)
  run("pmsn_r10_k16_s1", 10, 16, 0.79, seed=1)  # no MSN run with seed 1: left out
  out = tmp_path / "map"
  assert imbalance_map.main([str(tmp_path / "plan"), f"--out={out}"]) == 0
  rows = json.loads((out / "map.json").read_text())
  assert [(r["imbalance_ratio"], r["num_prototypes"]) for r in rows] == [(1000, 16), (10, 16)]
  assert rows[0]["diff_knn_top1"] == pytest.approx(0.03)
  assert rows[1]["diff_linear_top1"] == pytest.approx(-0.01)
  assert rows[0]["pmsn_clustering"]["proto/nmi"] == pytest.approx(0.54)  # steps 3-5
  text = (out / "map.md").read_text()
  assert "| 1000 | 16 | PMSN τ_p=1, Sinkhorn prior | 70.00 | 73.00 | +3.00 |" in text
  assert "pmsn_r10_k16_s1" in text and (out / "map.png").read_bytes()[:4] == b"\x89PNG"
  with pytest.raises(SystemExit):
    imbalance_map.main([str(tmp_path / "nope")])
  for name in ("msn_skewed", "pmsn_skewed"):  # one more pair in a cell, differing in skew
    run(name, 1000, 16, 0.6, *(("uniform", "uniform") if name.startswith("msn") else ()))
    config = json.loads((tmp_path / "plan" / name / "config.json").read_text())
    config["data"]["batch_class_skew"] = 0.8
    (tmp_path / "plan" / name / "config.json").write_text(json.dumps(config))
  with pytest.raises(SystemExit):
    imbalance_map.main([str(tmp_path / "plan"), f"--out={out}"])


def test_prereg_plan_is_the_registered_design():
  rows = sweep.plan_rows("prereg", ARGS)
  by_regime = {}
  for (name, config_arg, _), overrides in zip(rows, _overrides(rows)):
    regime, run = name.split("/")
    by_regime.setdefault(regime, []).append((run, config_arg, overrides))
  assert {r: len(v) for r, v in by_regime.items()} == {
      "prereg_lt_k10": 18, "prereg_balanced_k10": 12, "prereg_hardtail_k32": 6}
  for regime, runs in by_regime.items():
    for run, config_arg, o in runs:
      assert (config_arg == "msn") == run.startswith("msn_")
      assert o["model.num_prototypes"] == ("32" if regime.endswith("k32") else "10")
      if run.startswith("pmsn"):
        assert o["loss.prior"] == "fit" and o["loss.prior_fit_source"] == "labels"
        assert o["loss.sinkhorn_marginal"] == ("uniform" if "uniform" in run else "prior")
      if regime == "prereg_balanced_k10":
        assert o["data.imbalance_ratio"] == "1" and o["data.max_per_class"] == "1489"
      else:
        assert o["data.class_order"] == "(0,1,3,5,7,8,9,4,2,6)"
    # Arms pair on seeds: every arm has the same ones.
    seeds = {}
    for run, _, o in runs:
      seeds.setdefault(run.rpartition("_s")[0], []).append(o["seed"])
    assert len({tuple(v) for v in seeds.values()}) == 1
  # Seed by seed: the first 7 runs are seed 0 of every regime.
  assert {o["seed"] for o in _overrides(rows[:7])} == {"0"}
