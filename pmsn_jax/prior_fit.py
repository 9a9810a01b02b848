"""config.loss.prior = "fit": estimate the power-law exponent of the cluster prior from data.

None of the reference implementations choose τ_p for you; this fits it, in the loss's own
parameterisation (losses.power_law_prior): π_k = k^-τ / Σ_{j=1..K} j^-τ.
Two sources (config.loss.prior_fit_source), details and limits in docs/prior_fit.md:

  "labels":   the class histogram of the pretraining rows, before the first step.
  "clusters": the model's own cluster sizes, the pre-Sinkhorn target usage averaged over the
              first config.loss.prior_fit_warmup_steps steps, trained with the uniform prior;
              every later step uses the fitted power law.

The exponent is fitted on the C ranks of the histogram and reused for the K prototypes: a power
law's rank-frequency curve keeps its exponent when every category is split into (or merged
from) equal parts, so τ is the one number that transfers between C classes and K prototypes.

The prior reaches the train step as an input (batch["prior"]), not as a constant, so the
switch after the warm-up does not recompile the step.
The fit is written to WORKDIR/prior_fit.json, which is also how a run resumed after its warm-up
gets the fitted prior back.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable, Mapping

import jax
import numpy as np

from pmsn_jax import losses, paths, step

FIT_SOURCES = ("labels", "clusters")
FIT_FILE = "prior_fit.json"
# Which train-step aux vector is "the model's cluster sizes". Not the Sinkhorn-balanced
# target_usage: Sinkhorn rescales it to its marginal, uniform during the warm-up, so a fit to it
# measures Sinkhorn's residual, not the clusters.
CLUSTER_SIZES = "raw_target_usage"
# π_1/π_2 = 2^10: beyond this the prior is one prototype; the fit stops there.
MAX_EXPONENT = 10.0


def _mean_log_rank(exponent: float, log_ranks: np.ndarray) -> float:
  """E_π[log k] under the power law of `exponent` (float64, shifted exponent: no overflow)."""
  a = -exponent * log_ranks
  w = np.exp(a - a.max())
  return float(np.dot(w, log_ranks) / w.sum())


def fit_power_law_exponent(counts) -> tuple[float, dict[str, float]]:
  """Maximum-likelihood τ of π_k ∝ k^-τ, k = 1..len(counts), from a histogram.

  counts: non-negative sizes of the categories (class counts, or cluster masses at any
  scale) in any order; sorted descending, the r-th largest is rank r. Zero entries stay in as
  ranks with no observations: drop categories that should not count before calling.

  Why maximum likelihood rather than least squares on the log-log plot: the prior is a
  distribution over a finite number of ranks, and the MLE is the τ whose prior is closest to
  the observed frequencies in KL(observed ‖ π_τ), the divergence the loss's default regulariser
  measures. It weighs ranks by their mass, so a long tail of tiny, noisy counts (where log
  counts are least reliable) does not steer it, it needs no special case for zero counts,
  and it is scale-free (only frequencies matter). Least squares on log-log weighs every rank
  equally and is the classic biased estimator for rank-frequency data; its R² is still
  reported, as the fit's visual quality on a log-log plot.

  The score equation is E_τ[log k] = Σ_k f_k log k (f the observed frequencies). E_τ[log k]
  falls strictly as τ grows (its derivative is -Var_τ[log k]), and a descending histogram's
  mean log-rank is at most the uniform one, so the root is unique, >= 0, and found by
  bisection; it is capped at MAX_EXPONENT (e.g. everything in one category).

  Returns:
    (exponent, quality): quality holds "log_likelihood" (mean per item, nats), "kl" (KL of
    the observed frequencies to the fitted prior, nats; 0 is a perfect fit), "r2" (of log
    frequency against log π on the non-zero ranks), "num_ranks" and "total" (sum of counts).
  """
  c = np.asarray(counts, np.float64).ravel()
  if c.size < 2 or not np.all(np.isfinite(c)) or np.any(c < 0) or c.sum() <= 0:
    raise ValueError(f"a power-law fit needs >= 2 finite, non-negative counts with a positive "
                     f"total, got {c.size} counts summing to {c.sum() if c.size else 0}")
  c = np.sort(c)[::-1]
  freq = c / c.sum()
  log_ranks = np.log(np.arange(1, c.size + 1, dtype=np.float64))
  observed = float(np.dot(freq, log_ranks))
  if _mean_log_rank(0.0, log_ranks) <= observed:
    exponent = 0.0  # flat (up to rounding): the uniform prior
  elif _mean_log_rank(MAX_EXPONENT, log_ranks) >= observed:
    exponent = MAX_EXPONENT
  else:
    low, high = 0.0, MAX_EXPONENT
    while high - low > 1e-12:
      mid = 0.5 * (low + high)
      low, high = (mid, high) if _mean_log_rank(mid, log_ranks) > observed else (low, mid)
    exponent = 0.5 * (low + high)

  scaled = -exponent * log_ranks
  log_prior = scaled - (scaled.max() + np.log(np.sum(np.exp(scaled - scaled.max()))))
  nz = freq > 0
  log_freq = np.log(freq[nz])
  ss_res = float(np.sum((log_freq - log_prior[nz]) ** 2))
  ss_tot = float(np.sum((log_freq - log_freq.mean()) ** 2))
  r2 = 1.0 - ss_res / ss_tot if ss_tot > 1e-12 else (1.0 if ss_res < 1e-12 else 0.0)
  quality = {"log_likelihood": float(np.dot(freq[nz], log_prior[nz])),
             "kl": float(np.dot(freq[nz], log_freq - log_prior[nz])),
             "r2": r2, "num_ranks": float(c.size), "total": float(c.sum())}
  return float(exponent), quality


@dataclasses.dataclass(frozen=True)
class Fit:
  """One fitted exponent and where it came from (what prior_fit.json holds)."""
  source: str                 # "labels" or "clusters"
  step: int                   # last step trained with the warm-up prior (0: before training)
  exponent: float
  quality: dict[str, float]
  sizes_sorted: list[float]   # the histogram fitted, as frequencies, descending

  def scalars(self) -> dict[str, float]:
    """For the metric writer: "prior_fit/exponent", "prior_fit/r2", "prior_fit/kl", ..."""
    return {"prior_fit/exponent": self.exponent,
            **{f"prior_fit/{k}": v for k, v in self.quality.items()
               if k in ("r2", "kl", "log_likelihood")}}

  def describe(self, num_prototypes: int) -> str:
    """The say() line: the exponent, the fit's quality and the prior it gives."""
    what = ("the pretraining class histogram" if self.source == "labels" else
            f"the model's cluster sizes over steps 1-{self.step}")
    ratio = float(num_prototypes) ** self.exponent
    return (f"prior fit from {what} ({self.quality['num_ranks']:.0f} ranks): tau_p = "
            f"{self.exponent:.4f}, log-log R^2 = {self.quality['r2']:.3f}, KL(observed||fit) = "
            f"{self.quality['kl']:.4f} nats; power-law prior over K={num_prototypes} "
            f"prototypes, pi_1/pi_K = {ratio:.3g}")


def fit_histogram(source: str, sizes, step_: int = 0) -> Fit:
  """Fits a histogram and keeps it (as frequencies, descending) with the result."""
  exponent, quality = fit_power_law_exponent(sizes)
  sizes = np.sort(np.asarray(sizes, np.float64))[::-1]
  return Fit(source, int(step_), exponent, quality,
             [float(f"{x:.6g}") for x in sizes / sizes.sum()])


def fit_class_counts(class_counts) -> Fit:
  """The "labels" fit: classes without pretraining images are not part of the histogram."""
  counts = np.asarray(class_counts, np.float64).ravel()
  present = counts[counts > 0]
  if present.size < 2:
    raise ValueError(f"config.loss.prior_fit_source='labels' needs >= 2 classes with "
                     f"pretraining images, got {present.size}; use prior_fit_source='clusters' "
                     f"or a fixed prior_exponent")
  return fit_histogram("labels", present)


def save(workdir, fit: Fit) -> None:
  """Writes WORKDIR/prior_fit.json (callers write from process 0 only); WORKDIR may be a URL."""
  paths.write_text(paths.path(workdir) / FIT_FILE, json.dumps(dataclasses.asdict(fit), indent=2))


def load(workdir) -> Fit | None:
  """The fit a previous run wrote to WORKDIR/prior_fit.json, if any."""
  path = paths.path(workdir) / FIT_FILE
  if not path.exists():
    return None
  return Fit(**json.loads(path.read_text()))


class PriorTracker:
  """The cluster prior of a run, step by step: fixed, or fitted once (prior = "fit").

  `prior` is the [K] float32 NumPy prior the next step must use; `fit` the fit in use (None
  for fixed priors and during the warm-up). Feed every step's aux to `observe`: in "clusters"
  mode it sums the cluster sizes on device (no host sync) and fits at the last warm-up step.
  """

  def __init__(self, config, *, start_step: int, class_counts: Callable[[], np.ndarray],
               saved: Fit | None = None):
    """class_counts: called once, only for the "labels" fit (it may read every label).
    saved: prior_fit.load(workdir), what a resumed "clusters" run continues with."""
    loss = config.loss
    self.num_prototypes = int(config.model.num_prototypes)
    self.fit: Fit | None = None
    self.warmup_steps = 0
    self._sizes_sum, self._steps = None, 0
    if loss.prior != "fit":
      self.prior = step.prior_from_config(config)
    elif loss.prior_fit_source == "labels":
      self._use(fit_class_counts(class_counts()))
    elif loss.prior_fit_source == "clusters":
      self.warmup_steps = int(loss.prior_fit_warmup_steps)
      self.prior = np.asarray(losses.uniform_prior(self.num_prototypes))
      if start_step >= self.warmup_steps:
        if saved is None or saved.source != "clusters":
          raise ValueError(f"resuming at step {start_step}, after the prior-fit warm-up "
                           f"({self.warmup_steps} steps), needs the {FIT_FILE} the warm-up "
                           f"wrote beside the checkpoints; it is missing: use a fresh --workdir")
        self._use(saved)
    else:
      raise ValueError(f"config.loss.prior_fit_source={loss.prior_fit_source!r} is invalid: "
                       f"expected one of {FIT_SOURCES}.")

  def _use(self, fit: Fit) -> None:
    self.fit = fit
    self.prior = np.asarray(losses.power_law_prior(self.num_prototypes, fit.exponent))

  @property
  def pending(self) -> bool:
    """True while a "clusters" warm-up is still collecting cluster sizes."""
    return self.warmup_steps > 0 and self.fit is None

  def observe(self, current: int, aux: Mapping[str, jax.Array]) -> bool:
    """Feeds step `current`'s aux; True when it ended the warm-up and `prior` changed.

    A run resumed inside the warm-up averages over the warm-up steps it still runs.
    """
    if not self.pending:
      return False
    sizes = aux[CLUSTER_SIZES]
    self._sizes_sum = sizes if self._sizes_sum is None else self._sizes_sum + sizes
    self._steps += 1
    if current < self.warmup_steps:
      return False
    mean = np.asarray(jax.device_get(self._sizes_sum), np.float64) / self._steps
    self._sizes_sum = None
    self._use(fit_histogram("clusters", mean, current))
    return True
