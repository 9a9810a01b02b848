"""The report's plots (pmsn_jax/analysis/report.py): one PNG each, matplotlib only, no pyplot
state.

Split from report.py so that module holds grouping, the table and the CLI (runs.py: loading).
It imports runs.py only, never report.py, so the two never import each other.
"""

from __future__ import annotations

import math

import numpy as np

from pmsn_jax.analysis.runs import Group, Run, is_number

# Logged at every step but set by the config (schedules) or the machine, not learned.
NOT_CURVES = ("step", "img_per_s", "eta_s", "skipped_images", "learning_rate", "weight_decay",
              "ema_momentum")
FIRST_CURVES = ("loss", "ce", "reg")
PROTOTYPE_KEYS = (("target_usage_sorted", "Sinkhorn targets"),
                  ("mean_prediction_sorted", "mean prediction p̄"),
                  ("prior_sorted", "prior π"))
CLASSIFIERS = {"knn": "k-NN", "linear": "linear"}  # eval.json's per_class_classifier


# ---------------------------------------------------------------------------------------- plots
# Each plot_* writes one PNG, or none when it has nothing to draw; it returns a note for the
# reader (why nothing was drawn, or what the plot lacks) or None.

def _panels(count: int, ncols: int = 3, size=(4.4, 3.2)):
  """A figure of `count` panels in a grid (pyplot-free: no backend, no global state)."""
  # Here, so that importing the report (its grouping and table) needs no matplotlib.
  from matplotlib.figure import Figure
  ncols = max(1, min(ncols, count))
  nrows = math.ceil(count / ncols)
  fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
  axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
  for ax in axes[count:]:
    ax.set_visible(False)
  return fig, axes[:count]


def _step_axes(fig, axes) -> None:
  """A few round step ticks (five-digit steps would run together) and one legend under the
  panels, where it hides no curve."""
  from matplotlib.ticker import MaxNLocator
  for ax in axes:
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
  handles, labels = axes[0].get_legend_handles_labels()
  if handles:
    fig.legend(handles, labels, loc="outside lower center", fontsize="x-small")


def series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of `key`, sorted by step; a step logged twice (resumed run) keeps the
  last value."""
  points = {int(row["step"]): float(row[key]) for row in rows if is_number(row.get(key))}
  steps = np.array(sorted(points), dtype=np.int64)
  return steps, np.array([points[s] for s in steps], dtype=np.float64)


def plot_training_curves(runs: list[Run], path: str) -> str | None:
  names = {k for run in runs for row in run.metrics for k, v in row.items()
           if is_number(v) and k not in NOT_CURVES and not k.startswith("eval/")}
  if not names:
    return "no run has training metrics in metrics.jsonl"
  names = [n for n in FIRST_CURVES if n in names] + sorted(names - set(FIRST_CURVES))
  fig, axes = _panels(len(names), ncols=4)
  for ax, name in zip(axes, names):
    for run in runs:
      steps, values = series(run.metrics, name)
      if steps.size:
        ax.plot(steps, values, label=run.label, **run.style)
    ax.set_title(name)
  _step_axes(fig, axes)
  fig.savefig(path, dpi=100)
  return None


def plot_knn_over_steps(runs: list[Run], path: str) -> str | None:
  keys = (("eval/knn_top1", "k-NN top-1 (%)"), ("eval/knn_lt_top1", "k-NN top-1, long-tailed "
                                                                    "bank (%)"))
  if not any(series(run.metrics, keys[0][0])[0].size >= 2 for run in runs):
    return ("no mid-training evaluations in metrics.jsonl (train with "
            "--config.eval_every_steps=N to get them)")
  fig, axes = _panels(len(keys), ncols=2)
  for ax, (key, title) in zip(axes, keys):
    for run in runs:
      steps, values = series(run.metrics, key)
      if steps.size:
        ax.plot(steps, 100 * values, marker="o", label=run.label, **run.style)
    ax.set_title(title)
  _step_axes(fig, axes)
  fig.savefig(path, dpi=100)
  return None


def plot_prototype_usage(runs: list[Run], path: str) -> str | None:
  runs = [run for run in runs if run.prototypes]
  if not runs:
    return "no run has prototypes.jsonl"
  fig, axes = _panels(len(runs))
  for ax, run in zip(axes, runs):
    for key, name in PROTOTYPE_KEYS:
      values = run.prototypes.get(key)
      if isinstance(values, list) and values:  # zero usage has no place on a log axis: left out
        values = np.array([v if is_number(v) else np.nan for v in values], np.float64)
        ax.loglog(np.arange(1, values.size + 1), np.where(values > 0, values, np.nan),
                  label=name, linestyle="--" if key == "prior_sorted" else "-")
    ax.set(title=f"{run.label}\nstep {run.prototypes.get('step')}", xlabel="prototype rank",
           ylabel="share of assignments")
    ax.title.set_fontsize("small")
    ax.legend(fontsize="x-small")
  fig.savefig(path, dpi=100)
  return None


def _per_class(runs: list[Run]):
  """-> (mean, std or None, counts or None) per class over the runs with per-class data."""
  tables = [run.eval["per_class_top1"] for run in runs
            if run.eval and isinstance(run.eval.get("per_class_top1"), list)]
  tables = [t for t in tables if len(t) == len(tables[0])] if tables else []
  if not tables:
    return None, None, None
  acc = np.array([[a if is_number(a) else np.nan for a in t] for t in tables], np.float64)
  present = np.isfinite(acc)
  n = present.sum(axis=0)
  mean = np.where(n > 0, np.where(present, acc, 0).sum(axis=0) / np.maximum(n, 1), np.nan)
  std = None
  if len(tables) > 1:
    dev = np.where(present, acc - mean, 0) ** 2
    std = np.where(n > 1, np.sqrt(dev.sum(axis=0) / np.maximum(n - 1, 1)), np.nan)
  counts = next((run.eval.get("pretrain_class_counts") for run in runs if run.eval), None)
  ok = (isinstance(counts, list) and len(counts) == len(mean)
        and all(is_number(c) for c in counts))
  return mean, std, np.asarray(counts, np.float64) if ok else None


def plot_per_class(groups: list[Group], path: str) -> str | None:
  """Accuracy per class, head to tail, with the pretraining counts above; one line per group
  (mean over seeds, shaded ± std)."""
  curves = [(g, group.label, *_per_class(group.runs)) for g, group in enumerate(groups)]
  curves = [curve for curve in curves if curve[2] is not None]
  if not curves:
    return "no eval.json holds per_class_top1"
  unsorted = [label for _, label, _, _, counts in curves if counts is None]
  with_counts = len(unsorted) < len(curves)
  fig, axes = _panels(2 if with_counts else 1, ncols=1, size=(9.0, 3.2))
  orders = []
  for g, label, mean, std, counts in curves:
    order = np.arange(len(mean)) if counts is None else np.argsort(-counts, kind="stable")
    orders.append(order)
    rank = np.arange(len(mean))
    style = {"color": f"C{g % 10}", "marker": "o" if len(mean) <= 30 else None, "label": label}
    if counts is not None:  # an empty class has no log: left out
      axes[0].plot(rank, np.where(counts > 0, counts, np.nan)[order], **style)
    axes[-1].plot(rank, 100 * mean[order], **style)
    if std is not None:
      axes[-1].fill_between(rank, 100 * (mean - std)[order], 100 * (mean + std)[order],
                            color=style["color"], alpha=0.2)
  if len(orders[0]) <= 30 and all(np.array_equal(o, orders[0]) for o in orders):
    for ax in axes:
      ax.set_xticks(np.arange(len(orders[0])), [str(c) for c in orders[0]])
  if with_counts:
    axes[0].set(title="pretraining images per class", yscale="log")
  classifier = next((r.eval.get("per_class_classifier") for g in groups for r in g.runs
                     if r.eval and r.eval.get("per_class_classifier")), "knn")
  axes[-1].set(title=f"per-class top-1 of the {CLASSIFIERS.get(classifier, classifier)} "
                     f"classifier (%)", ylim=(-2, 102),
               xlabel=("class, from most to fewest pretraining images" if with_counts
                       else "class, in index order (pretraining counts missing)"))
  axes[-1].legend(fontsize="x-small")
  fig.savefig(path, dpi=100)
  return (f"pretraining class counts missing for {', '.join(unsorted)}: classes in index order"
          if unsorted else None)
