"""Runs a named plan of demo-scale experiments (one training run per row), resumably.

  python experiments/sweep.py PLAN [--runs_dir=runs] [--parallel=1] [--dry_run]
  python experiments/sweep.py --list

Each run is `python -m pmsn_jax.main --config=configs/demo.py[:msn] --workdir=RUNS/PLAN/NAME
<overrides>`; a run whose eval.json exists is skipped, a half-finished one resumes from its
checkpoint (training resumes by itself). Next to each run the driver keeps driver.json:
{"command", "wall_s", "core_s", "parts", "cores", "pinned_core", "returncode", "finished"},
updated every minute; wall_s and core_s (wall x cores) are summed over the parts of a resumed
run — the report's CPU minutes are core_s / 60. SIGTERM to the driver (a session's end, a
preemption) starts no further run and passes the signal to the running ones, which save a
checkpoint and exit; rerunning the same command resumes them.
Then `python -m pmsn_jax.analysis.report RUNS/PLAN/* --out=RUNS/PLAN/report` makes the tables
and plots.

Plans (issue 7; docs/results.md says which ran, how long they took, and what they showed):
  prior_grid   MSN vs PMSN tau_p in {0.25, 0.5, 1} x Sinkhorn marginal in {prior, uniform,
               off}, long-tailed Fashion-MNIST (imbalance 100), seed 0: 10 runs.
  paired       MSN and PMSN (tau_p and marginal from --tau/--marginal), seeds 0..--seeds-1;
               --imbalance/--prototypes pick another cell; --kl_direction=prior_to_mean gives
               PMSN KL(pi || p_bar) (its own group in the report; MSN keeps ME-MAX).
  minibatch    balanced Fashion-MNIST, balanced vs skewed mini-batches, MSN and PMSN.
  imbalance    imbalance {1000, 100, 10} x prototypes K {16, 64, 256, 1024}, MSN and PMSN
               (tau_p and marginal from --tau/--marginal), short runs (500 steps unless --steps).
  long         one demo-config PMSN run of --steps (e.g. 16000: runs/long/pmsn_16k), with the
               demo's own warm-up and a k-NN evaluation every quarter: longer training against
               raw pixels.
  prereg       issue 28's pre-registered campaign (docs/preregistration.md): arms A (MSN),
               B (PMSN, label-fitted power law, uniform Sinkhorn marginal) and C (B with the
               prior as marginal) in three regimes (PREREG_REGIMES), 1500 steps unless --steps;
               run dirs RUNS/prereg/REGIME/ARM_sSEED, ordered seed by seed so that a campaign
               stopped early holds whole seeds of every regime.
Every run of a plan gets the same compute (steps x batch), so rows compare at equal cost.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLANS = ("prior_grid", "paired", "minibatch", "imbalance", "long", "prereg")
MARGINALS = {"prior": ["--config.loss.sinkhorn_marginal=prior"],
             "uniform": ["--config.loss.sinkhorn_marginal=uniform"],
             "off": ["--config.loss.sinkhorn_iters=0"]}


HARD_TAIL = "--config.data.class_order=(0,1,3,5,7,8,9,4,2,6)"
# regime -> (data and prototype overrides, arms, seeds); docs/preregistration.md fixes them.
PREREG_REGIMES = {
    "prereg_lt_k10": ([HARD_TAIL, "--config.model.num_prototypes=10"], "ABC", 6),
    # 14,886 long-tailed images / 10 classes -> 1,489 per class: the same size, balanced.
    "prereg_balanced_k10": (["--config.data.imbalance_ratio=1", "--config.data.max_per_class=1489",
                             "--config.model.num_prototypes=10"], "AB", 6),
    "prereg_hardtail_k32": ([HARD_TAIL, "--config.model.num_prototypes=32"], "AB", 3),
}
# arm -> (run-name prefix, demo config arg, loss overrides). B is PMSN as lightly's PMSNLoss and
# stable-pretraining's PMSN do it (MSN's uniform Sinkhorn, KL(p̄ ‖ π)); the power law's τ_p is
# fitted to the pretraining labels (label-informed); C differs from B in the marginal only.
PREREG_ARMS = {
    "A": ("msn", "msn", []),
    "B": ("pmsn_fit_uniform", "", ["--config.loss.prior=fit", "--config.loss.prior_fit_source=labels",
                                   "--config.loss.sinkhorn_marginal=uniform"]),
    "C": ("pmsn_fit_prior", "", ["--config.loss.prior=fit", "--config.loss.prior_fit_source=labels",
                                 "--config.loss.sinkhorn_marginal=prior"]),
}


def prereg_rows() -> list[tuple[str, str, list[str]]]:
  """The pre-registered runs, seed by seed across regimes (primary regime first)."""
  rows = []
  for seed in range(max(seeds for _, _, seeds in PREREG_REGIMES.values())):
    for regime, (data, arms, seeds) in PREREG_REGIMES.items():
      if seed < seeds:
        for arm in arms:
          prefix, config_arg, loss = PREREG_ARMS[arm]
          rows.append((f"{regime}/{prefix}_s{seed}", config_arg,
                       data + loss + [f"--config.seed={seed}"]))
  return rows


def pmsn(tau: float, marginal: str) -> list[str]:
  return ["--config.loss.prior=power_law", f"--config.loss.prior_exponent={tau}",
          *MARGINALS[marginal]]


def pmsn_of(args) -> tuple[str, list[str]]:
  """(run-name prefix, overrides) of the PMSN named by --tau/--marginal/--sorted_prior/
  --kl_direction; MSN runs keep ME-MAX, KL(p̄ ‖ uniform), whatever --kl_direction says."""
  name, overrides = f"pmsn_tau{args.tau}_{args.marginal}", pmsn(args.tau, args.marginal)
  if args.sorted_prior:
    name, overrides = name + "_sorted", overrides + ["--config.loss.prior_order=sorted"]
  if args.kl_direction != "mean_to_prior":
    name += "_" + args.kl_direction
    overrides = overrides + [f"--config.loss.kl_direction={args.kl_direction}"]
  return name, overrides


def cell_of(ratio: float, prototypes: int) -> tuple[str, list[str]]:
  """(run-name part, overrides) of an imbalance x K cell, e.g. ("r1000_k16_", [...]); a 0 keeps
  the config's value and adds nothing."""
  name, overrides = "", []
  if ratio:
    name += f"r{ratio:g}_"
    overrides.append(f"--config.data.imbalance_ratio={ratio:g}")
  if prototypes:
    name += f"k{prototypes}_"
    overrides.append(f"--config.model.num_prototypes={prototypes}")
  return name, overrides


def plan_rows(plan: str, args) -> list[tuple[str, str, list[str]]]:
  """-> [(run name, config arg, overrides)] for a plan."""
  rows = []
  if plan == "prior_grid":
    if args.sorted_prior or args.kl_direction != "mean_to_prior":
      raise SystemExit("prior_grid is the paper's fixed-order KL(p̄ ‖ π) grid; --sorted_prior "
                       "and --kl_direction apply to paired, minibatch and imbalance")
    rows.append(("msn_s0", "msn", ["--config.seed=0"]))
    for tau in (0.25, 0.5, 1.0):
      for marginal in MARGINALS:
        rows.append((f"pmsn_tau{tau}_{marginal}_s0", "", pmsn(tau, marginal) + ["--config.seed=0"]))
  elif plan == "paired":
    # --imbalance / --prototypes move the pair to another cell (e.g. one the imbalance map
    # flagged); the run names then say which.
    cell, common = cell_of(args.imbalance, args.prototypes)
    name, extra = pmsn_of(args)
    for seed in range(args.seeds):
      rows.append((f"msn_{cell}s{seed}", "msn", common + [f"--config.seed={seed}"]))
      rows.append((f"{name}_{cell}s{seed}", "", extra + common + [f"--config.seed={seed}"]))
  elif plan == "minibatch":
    name, overrides = pmsn_of(args)
    for skew in (0.0, args.skew):
      for method, arg, extra in (("msn", "msn", []), (name, "", overrides)):
        rows.append((f"{method}_skew{skew}_s0", arg,
                     extra + ["--config.data.imbalance_ratio=1", "--config.seed=0",
                              f"--config.data.batch_class_skew={skew}"]))
  elif plan == "imbalance":
    # Steepest imbalance first: there the uniform prior and the class distribution differ most,
    # so a stopped map has its most informative cells.
    name, extra = pmsn_of(args)
    for ratio in (1000, 100, 10):
      for k in (16, 64, 256, 1024):
        cell, common = cell_of(ratio, k)
        common.append("--config.seed=0")
        rows.append((f"msn_{cell}".rstrip("_"), "msn", common))
        rows.append((f"{name}_{cell}".rstrip("_"), "", common + extra))
  elif plan == "long":
    if not args.steps:
      raise SystemExit("long needs --steps (the demo config's own length is 2000), e.g. "
                       "--steps=16000")
    rows.append((f"pmsn_{args.steps / 1000:g}k", "", [f"--config.total_steps={args.steps}",
                                                       f"--config.eval_every_steps="
                                                       f"{max(1, args.steps // 4)}"]))
  elif plan == "prereg":
    rows = prereg_rows()
  else:
    raise SystemExit(f"unknown plan {plan!r}; choose from {', '.join(PLANS)} (--list shows "
                     "them).")
  return rows


def length_overrides(steps: int) -> list[str]:
  """Overrides that shorten (or lengthen) a demo run to `steps`, keeping the demo's schedule
  shape (10% warm-up) and 4 checkpoints; [] for steps=0 (the config's own length)."""
  if not steps:
    return []
  return [f"--config.total_steps={steps}", f"--config.optim.warmup_steps={max(1, steps // 10)}",
          f"--config.checkpoint_every_steps={max(1, steps // 4)}",
          f"--config.log_every_steps={max(1, min(100, steps // 10))}"]


def single_threaded_env() -> dict[str, str]:
  """Environment for a run confined to one core: XLA's Eigen pool and TF's pools at 1 thread.
  On the 2-core machines of the campaign, two such runs side by side gave 1.4x the images/s of
  one 2-thread run."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
  env.update(TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1", OMP_NUM_THREADS="1")
  return env


def has_checkpoint(workdir: str) -> bool:
  """pmsn_jax.main will resume: a finished step directory exists under checkpoints/."""
  directory = os.path.join(workdir, "checkpoints")
  return os.path.isdir(directory) and any(n.isdigit() for n in os.listdir(directory))


def run_one(workdir: str, config_arg: str, overrides: list[str], dry_run: bool,
            core: int | None = None) -> str:
  """Runs one training run (skipped if done); core: pin it, single-threaded, to that CPU."""
  config = "configs/demo.py" + (f":{config_arg}" if config_arg else "")
  command = [sys.executable, "-m", "pmsn_jax.main", f"--config={config}",
             f"--workdir={workdir}", *overrides]
  if os.path.exists(os.path.join(workdir, "eval.json")):
    return f"skip (done) {workdir}"
  if _stopping.is_set():
    return f"skip (stopped by SIGTERM) {workdir}"
  if dry_run:
    return shlex.join(command)
  os.makedirs(workdir, exist_ok=True)
  pin = {} if core is None else dict(env=single_threaded_env(),
                                      preexec_fn=lambda: os.sched_setaffinity(0, {core}))
  cores = 1 if core is not None else len(os.sched_getaffinity(0))
  with open(os.path.join(workdir, "driver.log"), "a") as log:
    record = timed_call(command, os.path.join(workdir, "driver.json"), cores=cores,
                        pinned_core=core, resumes=has_checkpoint(workdir), stdout=log,
                        stderr=subprocess.STDOUT, **pin)
  return f"rc={record['returncode']} {record['wall_s']:.0f}s {workdir}"


# The runs in flight, so that a SIGTERM to the driver reaches them (they are not its process
# group's foreground: a plain `kill` of the driver would orphan them).
_running: set[subprocess.Popen] = set()
_stopping = threading.Event()


def stop_on_sigterm(signum=None, frame=None):
  """SIGTERM handler: start no more runs; each running one gets SIGTERM, saves a checkpoint and
  exits (143), and its driver.json is written as for any finished part."""
  _stopping.set()
  for proc in list(_running):
    proc.terminate()


def timed_call(command: list[str], record_path: str, *, cores: int, pinned_core: int | None,
               resumes: bool, update_every_s: float = 60.0, **popen_kwargs) -> dict:
  """Runs `command` from the repository root, keeping record_path (driver.json) up to date.

  resumes: the run continues from a checkpoint, so the time of its earlier parts (a driver
  killed at a session's end, a crash) is added; otherwise it starts from zero. wall_s and
  core_s (wall x cores of each part: what the report calls cpu_minutes) are kept to within
  update_every_s. If the driver itself is interrupted, the run gets SIGTERM (it saves a
  checkpoint and exits 143) and the record is written before the driver goes.
  """
  earlier_wall, earlier_core, parts = 0.0, 0.0, 0
  if resumes:
    earlier_wall, earlier_core, parts = _earlier_parts(record_path)
  record = {"command": " ".join(command[1:]), "wall_s": earlier_wall, "core_s": earlier_core,
            "parts": parts + 1, "cores": cores, "pinned_core": pinned_core,
            "returncode": None, "finished": None}

  def write(start):
    part = time.time() - start
    record.update(wall_s=round(earlier_wall + part, 1),
                  core_s=round(earlier_core + part * cores, 1))
    with open(record_path + ".tmp", "w") as f:
      json.dump(record, f, indent=2)
    os.replace(record_path + ".tmp", record_path)  # a killed driver never leaves half a file

  start = time.time()
  with subprocess.Popen(command, cwd=ROOT, **popen_kwargs) as proc:
    _running.add(proc)
    if _stopping.is_set():  # the signal came between run_one's check and the start
      proc.terminate()
    try:
      while record["returncode"] is None:
        try:
          record["returncode"] = proc.wait(timeout=update_every_s)
        except subprocess.TimeoutExpired:
          write(start)
    except BaseException:  # Ctrl-C, SIGTERM to the driver: stop the run cleanly, then record
      proc.terminate()
      record["returncode"] = proc.wait()
      write(start)
      raise
    finally:
      _running.discard(proc)
  if record["returncode"] == 0:  # a stopped or failed part has not finished the run
    record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
  write(start)
  return record


def _earlier_parts(record_path: str) -> tuple[float, float, int]:
  """(wall_s, core_s, parts) of an earlier driver.json; zeros (with a warning) if unusable."""
  if not os.path.exists(record_path):
    return 0.0, 0.0, 0
  try:
    with open(record_path) as f:
      previous = json.load(f)
    wall = float(previous["wall_s"])
    core = float(previous.get("core_s", wall * float(previous.get("cores", 1))))
    return wall, core, int(previous.get("parts", 1))
  except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
    print(f"warning: {record_path} unreadable ({e}); this run's earlier time is not counted",
          file=sys.stderr)
    return 0.0, 0.0, 0


def check_overrides(plan_dir: str, overrides: list[str]) -> None:
  """Run names do not show --override, so a plan directory keeps one set of overrides (in
  PLAN_DIR/.overrides.json; a dotfile, so `report PLAN_DIR/*` skips it): a later sweep with
  others would skip or resume runs made with different settings."""
  path = os.path.join(plan_dir, ".overrides.json")
  if os.path.exists(path):
    with open(path) as f:
      earlier = json.load(f)
    if earlier != overrides:
      raise SystemExit(f"{plan_dir} was swept with --override {earlier or 'none'}, not "
                       f"{overrides or 'none'}: give this sweep another --runs_dir")
    return
  if overrides and os.path.isdir(plan_dir) and os.listdir(plan_dir):
    raise SystemExit(f"{plan_dir} holds runs made without --override: give this sweep "
                     "another --runs_dir")
  os.makedirs(plan_dir, exist_ok=True)
  with open(path, "w") as f:
    json.dump(overrides, f)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("plan", nargs="?")
  parser.add_argument("--list", action="store_true", help="print every plan's runs and exit")
  parser.add_argument("--runs_dir", default=os.path.join(ROOT, "runs"))
  parser.add_argument("--parallel", type=int, default=1,
                      help="runs at a time, each using all cores")
  parser.add_argument("--single_threaded", action="store_true",
                      help="one single-threaded run per core, each pinned to its core (on 2 "
                      "cores: 1.4x the throughput of --parallel=1); overrides --parallel")
  parser.add_argument("--dry_run", action="store_true")
  parser.add_argument("--tau", type=float, default=0.25, help="PMSN tau_p (paired, ...)")
  parser.add_argument("--marginal", choices=sorted(MARGINALS), default="prior")
  parser.add_argument("--sorted_prior", action="store_true",
                      help="PMSN with loss.prior_order=sorted (docs/sorted_prior.md)")
  parser.add_argument("--kl_direction", choices=("mean_to_prior", "prior_to_mean"),
                      default="mean_to_prior",
                      help="PMSN's regulariser: KL(p̄ ‖ π) (the default) or KL(π ‖ p̄); the "
                      "run names of the second end in _prior_to_mean")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--imbalance", type=float, default=0,
                      help="paired: data.imbalance_ratio of both methods (0: the config's 100)")
  parser.add_argument("--prototypes", type=int, default=0,
                      help="paired: model.num_prototypes of both methods (0: the config's 32)")
  parser.add_argument("--skew", type=float, default=0.8, help="batch_class_skew (minibatch)")
  parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                      help="a config override for every run of the plan, e.g. "
                      "data.class_order=(0,1,3,5,7,8,9,4,2,6); run names do not show it, so "
                      "give such a sweep its own --runs_dir")
  parser.add_argument("--steps", type=int, default=0,
                      help="training steps of every run (0: the config's 2000; imbalance: 500; "
                      "prereg: 1500; long: required); use a separate --runs_dir per length")
  args = parser.parse_args()
  for name, low in (("steps", 0), ("seeds", 1), ("parallel", 1), ("prototypes", 0)):
    if getattr(args, name) < low:
      parser.error(f"--{name}={getattr(args, name)}: expected >= {low}")
  if args.imbalance and args.imbalance < 1:
    parser.error(f"--imbalance={args.imbalance:g}: expected >= 1 (or 0 for the config's)")
  bad = [o for o in args.override if "=" not in o or o.startswith(("-", "config."))]
  if bad:
    parser.error(f"--override={bad[0]}: expected KEY=VALUE with the key as in the config, "
                 "e.g. data.class_order=(0,1,3,5,7,8,9,4,2,6)")
  if args.plan == "minibatch" and any(o.startswith("data.class_order=") for o in args.override):
    # Every run would fail validation (class_order needs imbalance > 1): say so before any.
    parser.error("--override=data.class_order: minibatch runs on balanced data "
                 "(data.imbalance_ratio=1), where a class order has no tail to rearrange")
  if not 0 <= args.skew <= 1:
    parser.error(f"--skew={args.skew}: data.batch_class_skew must be in [0, 1]")
  # Ctrl-C too: the runs live in worker threads, where a KeyboardInterrupt would not reach.
  signal.signal(signal.SIGTERM, stop_on_sigterm)
  signal.signal(signal.SIGINT, stop_on_sigterm)
  plans = PLANS if args.list else (args.plan,)
  if not plans[0]:
    parser.error("name a plan, or --list")
  for plan in plans:
    if plan == "long" and args.list and not args.steps:
      print("# long: 1 run, needs --steps", flush=True)
      continue
    rows = plan_rows(plan, args)
    # A long run keeps the demo's warm-up and checkpointing; the short plans scale them.
    steps = 0 if plan == "long" else args.steps or {"imbalance": 500, "prereg": 1500}.get(plan, 0)
    if not (args.dry_run or args.list):
      check_overrides(os.path.join(args.runs_dir, plan), args.override)
    extra = length_overrides(steps) + [f"--config.{o}" for o in args.override]
    jobs = [(os.path.join(args.runs_dir, plan, name), arg, overrides + extra,
             args.dry_run or args.list) for name, arg, overrides in rows]
    print(f"# {plan}: {len(jobs)} runs", flush=True)
    cores = queue.Queue()  # Each worker takes a free core for its run and gives it back.
    for core in sorted(os.sched_getaffinity(0)):
      cores.put(core)
    workers = len(os.sched_getaffinity(0)) if args.single_threaded else max(1, args.parallel)

    def job_on_a_core(job):
      if not args.single_threaded:
        return run_one(*job)
      core = cores.get()
      try:
        return run_one(*job, core=core)
      finally:
        cores.put(core)

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      for line in pool.map(job_on_a_core, jobs):
        print(line, flush=True)
  if _stopping.is_set():
    print("stopped by SIGTERM; the same command resumes the unfinished runs", flush=True)
    sys.exit(143)


if __name__ == "__main__":
  main()
