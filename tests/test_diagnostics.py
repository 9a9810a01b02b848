"""Prototype diagnostics (diagnostics.py) and prior fitting (prior_fit.py, prior = "fit").

Hand-computed NMI / purity, entropy limits, exponent recovery from exact and sampled power-law
histograms, the prior tracker in both fit modes, config validation, a train step whose prior is
an input (one trace for two prior values) and, with the demo data, a short training run.
"""

import json
import logging
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo
from pmsn_jax import diagnostics, losses, prior_fit, step, validation
from pmsn_jax.models import vit
from tests import subprocess_runs


# ------------------------------------------------------------------------------ diagnostics
def test_purity_and_nmi_match_hand_computed_values():
  # Contingency [[2, 1, 0], [0, 1, 2]] (clusters x classes), 6 images.
  assignments = [5, 5, 5, 9, 9, 9]
  labels = [0, 0, 1, 1, 2, 2]
  assert diagnostics.purity(assignments, labels) == pytest.approx(4 / 6)
  # p(a) = (1/2, 1/2), p(y) = (1/3, 1/3, 1/3); I = 2 * (1/3) log((1/3) / (1/6)) = (2/3) log 2;
  # NMI = I / ((log 2 + log 3) / 2) = 4 log 2 / (3 log 6).
  expected = 4 * math.log(2) / (3 * math.log(6))
  assert diagnostics.normalized_mutual_info(assignments, labels) == pytest.approx(expected)
  assert expected == pytest.approx(0.515803, abs=1e-6)
  # Symmetric, and blind to how clusters and classes are numbered.
  assert diagnostics.normalized_mutual_info(labels, assignments) == pytest.approx(expected)
  assert diagnostics.normalized_mutual_info([1, 1, 1, 0, 0, 0], [7, 7, 3, 3, 4, 4]) == (
      pytest.approx(expected))
  # Independent: I = 0; a relabelled copy: 1; one cluster and one class: 1 (scikit-learn's
  # convention); one cluster, two classes: 0.
  assert diagnostics.normalized_mutual_info([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(0.0)
  assert diagnostics.purity([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(0.5)
  assert diagnostics.normalized_mutual_info([3, 3, 8, 1], [0, 0, 1, 2]) == pytest.approx(1.0)
  assert diagnostics.purity([3, 3, 8, 1], [0, 0, 1, 2]) == 1.0
  assert diagnostics.normalized_mutual_info([0, 0], [4, 4]) == 1.0
  assert diagnostics.normalized_mutual_info([0, 0], [4, 5]) == 0.0
  with pytest.raises(ValueError, match="one label per assignment"):
    diagnostics.purity([0, 1], [0])


def test_entropy_and_effective_number_of_uniform_and_one_hot_usage():
  k = 64
  uniform = np.full(k, 1 / k)
  assert diagnostics.entropy(uniform) == pytest.approx(math.log(k))
  assert diagnostics.effective_number(uniform) == pytest.approx(k)
  one_hot = np.eye(k)[3]
  assert diagnostics.entropy(one_hot) == 0.0
  assert diagnostics.effective_number(one_hot) == 1.0
  # Unnormalised counts are normalised; two equal prototypes count as two.
  assert diagnostics.effective_number([0, 5, 5, 0]) == pytest.approx(2.0)
  assert diagnostics.kl_divergence(uniform, uniform) == pytest.approx(0.0, abs=1e-12)
  assert diagnostics.kl_divergence(one_hot, uniform) == pytest.approx(math.log(k))
  assert diagnostics.kl_divergence([1, 0], [0, 1]) == math.inf
  np.testing.assert_allclose(diagnostics.sorted_desc([1, 3, 2, 2]), [3 / 8, 2 / 8, 2 / 8, 1 / 8])
  with pytest.raises(ValueError, match="non-negative"):
    diagnostics.entropy([0.5, -0.5, 1.0])


def test_summarize_gives_scalars_and_the_documented_jsonl_record():
  k, b = 8, 12
  rng = np.random.default_rng(0)
  prior = np.asarray(losses.power_law_prior(k, 1.0))
  aux = {"target_usage": rng.dirichlet(np.ones(k)), "raw_target_usage": np.eye(k)[0],
         "mean_prediction": np.full(k, 1 / k), "assignments": rng.integers(0, k, b),
         "labels": rng.integers(0, 3, b)}
  scalars, record = diagnostics.summarize(7, aux, prior)
  assert set(record) == {"step", "target_usage_sorted", "raw_target_usage_sorted",
                         "mean_prediction_sorted", "prior_sorted"}
  assert record["step"] == 7
  for key in set(record) - {"step"}:
    values = np.asarray(record[key])
    assert values.shape == (k,) and np.all(np.diff(values) <= 0), key
    assert values.sum() == pytest.approx(1.0, abs=1e-5), key
  json.loads(json.dumps(record))  # plain JSON
  assert scalars["proto/raw_target_usage_effective"] == pytest.approx(1.0)
  assert scalars["proto/mean_prediction_effective"] == pytest.approx(k)
  assert scalars["proto/mean_prediction_kl_prior"] == pytest.approx(
      diagnostics.kl_divergence(np.full(k, 1 / k), prior))
  assert scalars["proto/prior_effective"] == pytest.approx(diagnostics.effective_number(prior))
  assert scalars["proto/purity"] == diagnostics.purity(aux["assignments"], aux["labels"])
  assert 0 <= scalars["proto/nmi"] <= 1
  assert all(isinstance(v, float) for v in scalars.values())
  # Without labels there is no purity / NMI.
  scalars, _ = diagnostics.summarize(7, {k_: v for k_, v in aux.items() if k_ != "labels"},
                                     prior)
  assert "proto/nmi" not in scalars and "proto/purity" not in scalars


# ------------------------------------------------------------------------------ estimator
@pytest.mark.parametrize("exponent", [0.0, 0.25, 0.5, 1.0, 2.0])
def test_exact_power_law_counts_give_back_their_exponent(exponent):
  counts = 1e6 * np.asarray(losses.power_law_prior(1000, exponent), np.float64)
  shuffled = np.random.default_rng(1).permutation(counts)  # order does not matter
  fitted, quality = prior_fit.fit_power_law_exponent(shuffled)
  # float32 prior values: exact up to their rounding.
  assert fitted == pytest.approx(exponent, abs=1e-5)
  assert quality["kl"] == pytest.approx(0.0, abs=1e-9)
  assert quality["r2"] == pytest.approx(1.0, abs=1e-6)
  assert quality["num_ranks"] == 1000 and quality["total"] == pytest.approx(1e6)


def test_integer_counts_and_samples_of_a_power_law_are_within_tolerance():
  exponent, k = 0.7, 100
  pi = np.arange(1, k + 1) ** -exponent
  pi /= pi.sum()
  rounded = np.round(1_000_000 * pi)
  assert prior_fit.fit_power_law_exponent(rounded)[0] == pytest.approx(exponent, abs=1e-3)
  rng = np.random.default_rng(0)
  fits = [prior_fit.fit_power_law_exponent(rng.multinomial(100_000, pi))[0] for _ in range(5)]
  assert np.all(np.abs(np.asarray(fits) - exponent) < 0.02), fits
  # Few images per class: sorting noisy counts biases the fit up, but not wildly.
  few = prior_fit.fit_power_law_exponent(rng.multinomial(2_000, pi))[0]
  assert abs(few - exponent) < 0.15, few


def test_estimator_edge_cases():
  assert prior_fit.fit_power_law_exponent([5, 5, 5, 5]) == (0.0, pytest.approx(
      {"log_likelihood": -math.log(4), "kl": 0.0, "r2": 1.0, "num_ranks": 4.0, "total": 20.0}))
  assert prior_fit.fit_power_law_exponent([0, 0, 9])[0] == prior_fit.MAX_EXPONENT
  for bad in ([3], [1, -1], [0, 0], [1, np.nan]):
    with pytest.raises(ValueError, match="power-law fit needs"):
      prior_fit.fit_power_law_exponent(bad)


# ------------------------------------------------------------------------------ the tracker
def fit_config(source="labels", k=32, warmup=3, total=6):
  c = demo.get_config("smoke")
  c.model.num_prototypes = k
  c.total_steps = total
  c.loss.prior = "fit"
  c.loss.prior_fit_source = source
  c.loss.prior_fit_warmup_steps = warmup
  return c


def test_labels_fit_resolves_the_prior_before_training():
  # 10 classes from a power law of exponent 1, one class without images; K = 32 prototypes.
  counts = np.round(5000 * np.arange(1, 11) ** -1.0)
  calls = []
  tracker = prior_fit.PriorTracker(
      fit_config("labels"), start_step=0,
      class_counts=lambda: calls.append(1) or np.concatenate([counts, [0]]))
  assert calls == [1] and not tracker.pending
  assert tracker.fit.source == "labels" and tracker.fit.step == 0
  assert tracker.fit.exponent == pytest.approx(1.0, abs=0.01)
  assert tracker.fit.quality["num_ranks"] == 10  # the empty class is not a rank
  np.testing.assert_allclose(tracker.prior, losses.power_law_prior(32, tracker.fit.exponent))
  losses.validate_prior(tracker.prior, 32)
  assert not tracker.observe(1, {})  # nothing left to fit
  line = tracker.fit.describe(32)
  assert f"tau_p = {tracker.fit.exponent:.4f}" in line and "K=32" in line
  assert set(tracker.fit.scalars()) == {"prior_fit/exponent", "prior_fit/r2", "prior_fit/kl",
                                        "prior_fit/log_likelihood"}
  with pytest.raises(ValueError, match="needs >= 2 classes"):
    prior_fit.PriorTracker(fit_config("labels"), start_step=0,
                           class_counts=lambda: np.array([0, 7, 0]))
  with pytest.raises(ValueError, match="prior_fit.PriorTracker"):
    step.prior_from_config(fit_config("labels"))


def test_clusters_fit_after_warmup_and_resume(tmp_path):
  k = 16
  sizes = np.asarray(losses.power_law_prior(k, 0.5))
  tracker = prior_fit.PriorTracker(fit_config("clusters", k=k), start_step=0,
                                   class_counts=None)
  assert tracker.pending and tracker.fit is None
  np.testing.assert_allclose(tracker.prior, 1 / k, rtol=1e-6)
  permuted = [jnp.asarray(np.random.default_rng(i).permutation(sizes)) for i in range(3)]
  assert not tracker.observe(1, {prior_fit.CLUSTER_SIZES: permuted[0]})
  assert not tracker.observe(2, {prior_fit.CLUSTER_SIZES: permuted[1]})
  np.testing.assert_allclose(tracker.prior, 1 / k, rtol=1e-6)  # still the warm-up prior
  # The last warm-up step fits the sizes averaged over the warm-up (prototype by prototype,
  # then sorted: prototypes keep their identity across steps).
  assert tracker.observe(3, {prior_fit.CLUSTER_SIZES: permuted[2]})
  mean = np.mean([np.asarray(p) for p in permuted], axis=0)
  assert tracker.fit.exponent == pytest.approx(prior_fit.fit_power_law_exponent(mean)[0],
                                               abs=1e-5)
  assert tracker.fit.exponent < 0.5  # averaging unaligned permutations flattens the sizes
  assert tracker.fit.source == "clusters" and tracker.fit.step == 3 and not tracker.pending
  np.testing.assert_allclose(tracker.prior, losses.power_law_prior(k, tracker.fit.exponent))
  assert not tracker.observe(4, {prior_fit.CLUSTER_SIZES: permuted[0]})

  prior_fit.save(str(tmp_path), tracker.fit)
  saved = prior_fit.load(str(tmp_path))
  assert saved == tracker.fit
  resumed = prior_fit.PriorTracker(fit_config("clusters", k=k), start_step=4, saved=saved,
                                   class_counts=None)
  np.testing.assert_array_equal(resumed.prior, tracker.prior)
  assert prior_fit.load(str(tmp_path / "nothing")) is None
  with pytest.raises(ValueError, match="prior_fit.json"):
    prior_fit.PriorTracker(fit_config("clusters", k=k), start_step=4, saved=None,
                           class_counts=None)


def test_validation_accepts_fit_and_rejects_bad_values_in_one_line():
  assert validation.PRIOR_FIT_SOURCES == prior_fit.FIT_SOURCES
  for source in prior_fit.FIT_SOURCES:
    validation.validate(fit_config(source))
  bad = [({"loss.prior_fit_source": "histogram"}, "loss.prior_fit_source"),
         ({"loss.prior_fit_warmup_steps": -1}, "loss.prior_fit_warmup_steps"),
         ({"loss.prior_fit_source": "clusters", "loss.prior_fit_warmup_steps": 6},
          "loss.prior_fit_warmup_steps=6 is invalid: expected 0 < steps < total_steps=6"),
         ({"loss.prior_fit_source": "clusters", "loss.prior_fit_warmup_steps": 0},
          "loss.prior_fit_warmup_steps"),
         ({"diagnostics.prototypes_every_steps": 6}, "diagnostics.prototypes_every_steps"),
         ({"diagnostics.prototypes_every_steps": -4}, "diagnostics.prototypes_every_steps")]
  for overrides, match in bad:
    config = fit_config()
    for key, value in overrides.items():
      section, name = key.split(".")
      config[section][name] = value
    with pytest.raises(ValueError, match=match) as error:
      validation.validate(config)
    assert "\n" not in str(error.value)
  config = fit_config()
  config.diagnostics.prototypes_every_steps = 8  # a multiple of log_every_steps = 4
  validation.validate(config)


# ------------------------------------------------------------------- the step, compiled once
def tiny_config():
  c = demo.get_config("smoke")
  c.model.width, c.model.depth, c.model.num_heads = 32, 2, 2
  c.model.hidden_dim, c.model.output_dim, c.model.num_prototypes = 32, 16, 8
  c.batch_size, c.data.num_focal = 8, 1
  return c


def test_a_jitted_step_with_the_prior_as_input_is_traced_once_for_two_priors():
  # A tiny SGD step on the prototypes through the real loss: the prior is an argument.
  k, b, v, d = 8, 16, 3, 4
  rng = np.random.default_rng(0)
  anchors, targets = rng.standard_normal((b, v, d)), rng.standard_normal((b, d))
  traces = []

  @jax.jit
  def tiny_step(prototypes, prior):
    traces.append(1)  # runs once per trace, i.e. per compilation
    def loss(q):
      value, metrics, aux = losses.pmsn_loss_with_aux(anchors, targets, q, prior)
      return value, (metrics, aux)
    (_, (metrics, aux)), grad = jax.value_and_grad(loss, has_aux=True)(prototypes)
    return prototypes - 0.1 * grad, metrics, aux

  prototypes = jnp.asarray(rng.standard_normal((k, d)), jnp.float32)
  out = [tiny_step(prototypes, losses.power_law_prior(k, e)) for e in (0.0, 1.0)]
  assert len(traces) == 1
  assert float(out[0][1]["reg"]) != pytest.approx(float(out[1][1]["reg"]))  # value was used
  aux = out[0][2]
  for name in diagnostics.USAGE_VECTORS:
    assert aux[name].shape == (k,) and float(aux[name].sum()) == pytest.approx(1.0, abs=1e-5)
  assert aux["assignments"].shape == (b,) and aux["assignments"].dtype == jnp.int32


def test_train_step_reads_the_prior_from_the_batch_and_returns_aux():
  # Traced only (eval_shape): compiling this step is the training test's job below.
  config = tiny_config()
  k, b, d = config.model.num_prototypes, config.batch_size, config.data
  graphdef, tx, scheds, create_state = step.build(config, vit.vit_config_from(config))
  inner = step.make_train_step(graphdef, tx, scheds, config)
  batch = step.abstract_batch(config)
  prior = batch.pop("prior")
  state = jax.eval_shape(create_state)
  _, metrics, aux = jax.eval_shape(inner, state, dict(batch, prior=prior))
  assert all(m.shape == () for m in metrics.values())
  assert {n: (a.shape, a.dtype) for n, a in aux.items()} == {
      "target_usage": ((k,), jnp.float32), "raw_target_usage": ((k,), jnp.float32),
      "mean_prediction": ((k,), jnp.float32), "assignments": ((b,), jnp.int32),
      "labels": ((b,), jnp.int32)}
  with pytest.raises(KeyError, match='batch\\["prior"\\]'):
    jax.eval_shape(inner, state, batch)


# ------------------------------------------------------------------- a short training run
@pytest.mark.slow  # ~35 s on 2 idle cores: TensorFlow, the data, one step compile
@pytest.mark.skipif(not os.path.exists(os.path.join(subprocess_runs.FMNIST,
                                                    "train-images-idx3-ubyte.gz")),
                    reason="needs Debian's dataset-fashion-mnist (make data)")
def test_training_logs_diagnostics_and_fits_the_prior_after_warmup(tmp_path, caplog):
  from pmsn_jax import train  # TensorFlow and the data pipeline: only for this test
  config = tiny_config()
  config.batch_size = 16
  config.total_steps, config.log_every_steps, config.checkpoint_every_steps = 6, 2, 6
  config.loss.prior, config.loss.prior_fit_source = "fit", "clusters"
  config.loss.prior_fit_warmup_steps = 3
  config.eval.enabled = False
  workdir = str(tmp_path)
  with jax.log_compiles(True), caplog.at_level(logging.WARNING):
    train.train_and_evaluate(config, workdir)
  # One compile, although the step's prior changed value after step 3.
  compiles = [r for r in caplog.records if "Compiling jit(train_step)" in r.getMessage()]
  assert len(compiles) == 1

  with open(os.path.join(workdir, diagnostics.PROTOTYPES_FILE)) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == [2, 4, 6]
  k = config.model.num_prototypes
  np.testing.assert_allclose(records[0]["prior_sorted"], 1 / k, rtol=1e-5)  # warm-up: uniform
  fit = prior_fit.load(workdir)
  assert fit.source == "clusters" and fit.step == 3 and fit.exponent > 0
  np.testing.assert_allclose(records[1]["prior_sorted"],
                             np.asarray(losses.power_law_prior(k, fit.exponent)), rtol=1e-5)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  logged = [r for r in rows if "loss" in r]
  assert [r["step"] for r in logged] == [2, 4, 6]
  for key in ("proto/target_usage_effective", "proto/mean_prediction_kl_prior",
              "proto/raw_target_usage_entropy", "proto/purity", "proto/nmi"):
    assert all(key in r for r in logged), key
  assert [r["step"] for r in rows if "prior_fit/exponent" in r] == [3]
