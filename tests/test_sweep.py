"""experiments/sweep.py: the plans' runs, equal compute within a plan, resumability, pinning."""

import importlib.util
import json
import os
import types

import pytest

from tests.subprocess_runs import ROOT

_spec = importlib.util.spec_from_file_location("sweep", os.path.join(ROOT, "experiments",
                                                                      "sweep.py"))
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)

ARGS = types.SimpleNamespace(tau=0.25, marginal="prior", seeds=3, skew=0.8, steps=0)


def _overrides(rows):
  return [dict(o.removeprefix("--config.").split("=", 1) for o in overrides)
          for _, _, overrides in rows]


@pytest.mark.parametrize("plan, runs", [("prior_grid", 10), ("paired", 6), ("minibatch", 4),
                                        ("imbalance", 24)])
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


def test_unknown_plan_names_the_plans():
  with pytest.raises(SystemExit, match="prior_grid, paired, minibatch"):
    sweep.plan_rows("grid", ARGS)
