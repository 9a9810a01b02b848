"""Low-shot logistic regression (evals/lowshot.py), the suite's class-wise and low-shot entries,
and `python -m pmsn_jax.evaluate` on an export, end to end."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from flax import nnx

from configs import demo
from pmsn_jax import checkpoint, sharding
from pmsn_jax.data import sources
from pmsn_jax.evals import lowshot, suite
from pmsn_jax.models import vit
from tests import subprocess_runs
from tests.subprocess_runs import ROOT


def blobs(rng, means, per_class, spread):
  """Gaussian clusters around `means` [C, D]: features [C * per_class, D], int32 labels."""
  labels = np.repeat(np.arange(len(means)), per_class).astype(np.int32)
  return means[labels] + spread * rng.normal(size=(len(labels), means.shape[1])), labels


def unit_rows(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def scipy_fit(x, y, num_classes, l2):
  """The same objective in float64 NumPy, minimised by SciPy's L-BFGS-B (Fortran): an
  implementation that shares no code with optax."""
  n, d = x.shape
  onehot = np.eye(num_classes)[y]

  def fun(flat):
    w, b = flat[:d * num_classes].reshape(d, num_classes), flat[d * num_classes:]
    logits = x @ w + b
    logits -= logits.max(axis=1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    loss = -np.mean(np.sum(onehot * log_p, axis=1)) + 0.5 * l2 * np.sum(w * w)
    g = (np.exp(log_p) - onehot) / n
    return loss, np.concatenate([(x.T @ g + l2 * w).ravel(), g.sum(axis=0)])

  res = scipy.optimize.minimize(fun, np.zeros(d * num_classes + num_classes), jac=True,
                                method="L-BFGS-B",
                                options={"maxiter": 20000, "gtol": 1e-10, "ftol": 0.0})
  w, b = res.x[:d * num_classes].reshape(d, num_classes), res.x[d * num_classes:]
  return w, b, fun(res.x)[0], fun


# ----------------------------------------------------------------- logistic regression
# Every fit below has 4 classes, 16 dims and is padded to 40 rows: one compile of the solver.
C, D, ROWS = 4, 16, 40


def test_separable_features_are_classified_perfectly():
  rng = np.random.default_rng(0)
  means = 3.0 * np.eye(C, D)  # Four orthogonal directions; noise 0.2 keeps them apart.
  train_x, train_y = blobs(rng, means, 2, 0.2)
  test_x, test_y = blobs(rng, means, 50, 0.2)
  pred = lowshot.logistic_regression(train_x, train_y, test_x, num_classes=C, pad_to=ROWS)
  assert pred.dtype == np.int32 and pred.shape == (200,)
  np.testing.assert_array_equal(pred, test_y)


@pytest.mark.parametrize("l2", [1e-2, lowshot.DEFAULT_L2])
def test_matches_an_independent_scipy_fit(l2):
  rng = np.random.default_rng(1)
  means = rng.normal(size=(C, D))
  train_x, train_y = blobs(rng, means, ROWS // C, 1.5)  # Overlapping clusters: not separable.
  test_x, test_y = blobs(rng, means, 50, 1.5)
  x = unit_rows(train_x)

  params, info = lowshot.fit_logistic_regression(x, train_y, num_classes=C, l2=l2)
  assert info["grad_norm"] < lowshot.DEFAULT_TOL and info["steps"] < lowshot.DEFAULT_STEPS
  w_ref, b_ref, loss_ref, fun = scipy_fit(x, train_y, C, l2)
  ours = np.concatenate([np.asarray(params["kernel"], np.float64).ravel(),
                         np.asarray(params["bias"], np.float64)])
  assert fun(ours)[0] == pytest.approx(loss_ref, abs=1e-6)
  # The kernel is unique (strongly convex in it); the bias only up to a shared constant.
  scale = np.abs(w_ref).max()
  np.testing.assert_allclose(params["kernel"], w_ref, atol=1e-2 * scale)
  np.testing.assert_allclose(params["bias"] - params["bias"].mean(), b_ref - b_ref.mean(),
                             atol=1e-2 * max(1.0, np.abs(b_ref).max()))

  pred = lowshot.logistic_regression(train_x, train_y, test_x, num_classes=C, l2=l2)
  ref_pred = np.argmax(unit_rows(test_x) @ w_ref + b_ref, axis=1)
  assert np.mean(pred == ref_pred) >= 0.99
  assert abs(np.mean(pred == test_y) - np.mean(ref_pred == test_y)) <= 0.01
  assert np.mean(pred == test_y) > 0.5  # well above chance (0.25): the fit learned something


def test_padding_rows_do_not_change_the_fit():
  rng = np.random.default_rng(2)
  x, y = blobs(rng, rng.normal(size=(C, D)), 5, 1.0)
  x = unit_rows(x)
  padded, _ = lowshot.fit_logistic_regression(x, y, num_classes=C, pad_to=ROWS)
  w_ref, _, _, _ = scipy_fit(x, y, C, lowshot.DEFAULT_L2)
  np.testing.assert_allclose(padded["kernel"], w_ref, atol=1e-2 * np.abs(w_ref).max())
  strong, _ = lowshot.fit_logistic_regression(x, y, num_classes=C, l2=1e-1, pad_to=ROWS)
  assert np.linalg.norm(padded["kernel"]) > 3 * np.linalg.norm(strong["kernel"])
  with pytest.raises(ValueError, match="l2 must be > 0"):
    lowshot.fit_logistic_regression(x, y, num_classes=C, l2=0.0)


# ----------------------------------------------------------------------- shot sampling

LABELS = np.random.default_rng(3).permutation(np.repeat(np.arange(5), [3, 4, 5, 6, 7]))


def test_sampling_takes_exactly_k_per_class_and_is_seeded():
  rows = lowshot.sample_shots(LABELS, 5, 3, seed=0, split=0)
  assert rows.shape == (15,) and len(set(rows.tolist())) == 15
  np.testing.assert_array_equal(LABELS[rows], np.repeat(np.arange(5), 3))  # class-major
  np.testing.assert_array_equal(rows, lowshot.sample_shots(LABELS, 5, 3, seed=0, split=0))
  other_split = lowshot.sample_shots(LABELS, 5, 3, seed=0, split=1)
  other_seed = lowshot.sample_shots(LABELS, 5, 3, seed=1, split=0)
  assert set(rows.tolist()) != set(other_split.tolist())
  assert set(rows.tolist()) != set(other_seed.tolist())
  # Within a split the shot levels are nested: the 1-shot image is the first of the 3.
  np.testing.assert_array_equal(lowshot.sample_shots(LABELS, 5, 1, seed=0, split=0),
                                rows.reshape(5, 3)[:, 0])


def test_sampling_a_class_with_too_few_images_is_a_one_line_error():
  with pytest.raises(ValueError, match="4 images per class.*class 0 has 3") as info:
    lowshot.sample_shots(LABELS, 5, 4, seed=0, split=0)
  assert "\n" not in str(info.value) and "lowshot_shots" in str(info.value)
  with pytest.raises(ValueError, match="positive"):
    lowshot.sample_shots(LABELS, 5, 0, seed=0, split=0)


# ----------------------------------------------------------------- aggregation, lowshot

def test_summary_is_mean_and_sample_std():
  summary = lowshot.summarize([0.5, 0.7, 0.6])
  assert summary["mean"] == pytest.approx(0.6) and summary["std"] == pytest.approx(0.1)
  assert summary["per_split"] == [0.5, 0.7, 0.6]
  assert lowshot.summarize([0.4]) == {"mean": 0.4, "std": 0.0, "per_split": [0.4]}


def test_lowshot_reports_every_k_over_the_splits():
  rng = np.random.default_rng(4)
  means = 2.0 * rng.normal(size=(C, D))
  train_x, train_y = blobs(rng, means, 12, 1.0)
  test_x, test_y = blobs(rng, means, 50, 1.0)
  kwargs = dict(num_classes=C, shots=(1, ROWS // C), splits=2, seed=0)  # padded to ROWS rows
  result = lowshot.lowshot(train_x, train_y, test_x, test_y, **kwargs)
  assert set(result) == {"1", "10"}
  for summary in result.values():
    assert len(summary["per_split"]) == 2 and all(0 <= a <= 1 for a in summary["per_split"])
    assert summary == lowshot.summarize(summary["per_split"])
  assert result["10"]["mean"] > result["1"]["mean"]  # more labels help on these clusters
  assert result == lowshot.lowshot(train_x, train_y, test_x, test_y, **kwargs)  # deterministic
  with pytest.raises(ValueError, match="13 images per class"):
    lowshot.lowshot(train_x, train_y, test_x, test_y, num_classes=C, shots=(1, 13))


# --------------------------------------------------------------------------- the suite

def suite_setup(shots):
  config = demo.get_config("smoke")
  config.eval.batch_size = 64
  config.eval.knn_k = 5
  config.eval.lowshot_shots = shots
  rng = np.random.default_rng(5)
  images = lambda n: rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)  # noqa: E731
  labels = lambda n: np.arange(n, dtype=np.int32) % 10  # noqa: E731
  data = suite.EvalSplits(sources.LabelledImages(images(80), labels(80), 10),
                          sources.LabelledImages(images(30), labels(30), 10),
                          pretrain_rows=np.arange(0, 80, 2), num_classes=10)
  return config, data, sharding.make_mesh(config.mesh)


def test_mid_training_evals_add_balanced_accuracy_but_no_probe_or_lowshot():
  config, data, mesh = suite_setup((1, 2, 9))  # 9 > the 8 train images per class: not checked
  encode = jax.jit(lambda x: jnp.reshape(x, (x.shape[0], -1))[:, ::7])  # pixels as features
  result = suite.evaluate(encode, None, data, config, mesh, linear_probe=False)
  assert "lowshot" not in result and "linear_top1" not in result
  assert 0 <= result["knn_balanced_top1"] <= 1 and len(result["per_class_top1"]) == 10


def test_shot_groups_follow_the_configured_thresholds():
  config, data, mesh = suite_setup(())
  encode = jax.jit(lambda x: jnp.reshape(x, (x.shape[0], -1))[:, ::7])
  # Pretraining rows 0, 2, ..., 78: 8 images of each even class, none of the odd ones.
  groups = suite.evaluate(encode, None, data, config, mesh, linear_probe=False)["groups"]
  assert groups["many"] is None and groups["medium"] is None and groups["few"] is not None
  config.eval.shot_thresholds = (3, 1)  # even classes many (8 > 3), odd ones few (0 < 1)
  result = suite.evaluate(encode, None, data, config, mesh, linear_probe=False)
  per_class = result["per_class_top1"]
  assert result["groups"]["many"] == pytest.approx(np.mean(per_class[0::2]))
  assert result["groups"]["few"] == pytest.approx(np.mean(per_class[1::2]))
  assert result["shot_thresholds"] == [3, 1]


def test_the_final_eval_checks_the_shots_before_extracting_features():
  config, data, mesh = suite_setup((1, 2, 9))

  def encode(images):
    raise AssertionError("features were extracted before the shot check")

  with pytest.raises(ValueError, match="9 images per class"):
    suite.evaluate(encode, None, data, config, mesh)


@pytest.mark.parametrize("key,value,match", [
    ("batch_size", 12, "eval.batch_size=12 must be a multiple of .* 8 batch shards"),
    ("linear_batch_size", 4, "eval.linear_batch_size=4 is smaller than the mesh's 8"),
])
def test_batches_the_mesh_cannot_split_fail_before_training(key, value, match):
  config, data, mesh = suite_setup(())
  config.eval[key] = value
  with pytest.raises(ValueError, match=match):
    suite.check(data, config, mesh)


def test_scalars_and_table_report_groups_balanced_and_lowshot():
  groups = {"many": 0.9, "medium": 0.6, "few": None}
  result = {"knn_top1": 0.8, "knn_lt_top1": 0.7, "knn_balanced_top1": 0.8, "groups": groups,
            "per_class_top1": [0.8] * 3, "linear_top1": 0.85, "linear_balanced_top1": 0.85,
            "linear_groups": groups,
            "lowshot": {"1": lowshot.summarize([0.4, 0.5, 0.6]), "5": lowshot.summarize([0.7])}}
  scalars = suite.scalars(result)
  assert scalars["eval/lowshot_1shot_top1"] == pytest.approx(0.5)
  assert scalars["eval/lowshot_5shot_top1"] == 0.7 and scalars["eval/linear_many_top1"] == 0.9
  assert scalars["eval/knn_balanced_top1"] == 0.8 and "eval/knn_few_top1" not in scalars
  table = suite.format_table(result)
  assert any(line.startswith("low-shot, 1 img/class (3 splits)") and "50.00±10.00%" in line
             for line in table.splitlines())
  assert "linear probe balanced accuracy" in table and "linear medium-shot classes" in table


def test_pixel_encoder_undoes_the_config_normalisation(tmp_path):
  """evaluate.py feeds the exported encoder (raw pixels) the suite's normalised images."""
  from pmsn_jax import evaluate

  cfg = vit.ViTConfig(width=32, depth=1, num_heads=2, patch_size=7, image_size=28, channels=1)
  checkpoint.export_encoder(str(tmp_path), nnx.state(vit.ViT(cfg, rngs=nnx.Rngs(0))), cfg,
                            demo.FMNIST_MEAN, demo.FMNIST_STD)
  data_cfg = demo.get_config().data
  data_cfg.mean, data_cfg.std = (0.5,), (0.25,)  # Not the export's: the adapter must not care.
  mesh = sharding.make_mesh((("data", -1),))  # 8 devices: the batch is split over them
  pixels = np.random.default_rng(6).integers(0, 256, (16, 28, 28, 1)).astype(np.float32)
  put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh))  # noqa: E731
  got = evaluate.pixel_encoder(checkpoint.load_encoder(str(tmp_path)), data_cfg, mesh)(
      put((pixels / 255 - 0.5) / 0.25))
  # The export is the seed-0 initialisation, which random_encoder rebuilds; it takes images
  # normalised with the statistics the model was exported with.
  expected = evaluate.random_encoder(cfg, 0, mesh)(
      put((pixels / 255 - demo.FMNIST_MEAN[0]) / demo.FMNIST_STD[0]))
  assert got.shape == (16, 32)
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------- the CLI

def run_evaluate(*args):
  # One CPU device (the 8-device mesh is covered in-process above): faster to start.
  return subprocess.run([sys.executable, "-m", "pmsn_jax.evaluate", *args], cwd=ROOT,
                        env=dict(os.environ, XLA_FLAGS=""), capture_output=True, text=True,
                        timeout=300)


def error_lines(proc):
  return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(os.path.join(subprocess_runs.FMNIST,
                                                    "train-images-idx3-ubyte.gz")),
                    reason="needs Debian's dataset-fashion-mnist (make data)")
def test_evaluate_cli_scores_an_export(tmp_path):
  cfg = vit.ViTConfig(width=32, depth=1, num_heads=2, patch_size=7, image_size=28, channels=1)
  export = tmp_path / "export"
  checkpoint.export_encoder(str(export), nnx.state(vit.ViT(cfg, rngs=nnx.Rngs(0))), cfg,
                            demo.FMNIST_MEAN, demo.FMNIST_STD)
  proc = run_evaluate(f"--export={export}", "--config=configs/demo.py",
                      "--config.eval.max_train_examples=500",
                      "--config.eval.max_test_examples=200", "--config.eval.linear_epochs=2",
                      "--config.eval.batch_size=256", "--config.eval.lowshot_splits=2",
                      "--config.eval.features=cls_avgpool")  # the end-to-end test scores "cls"
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(export / "eval.json") as f:  # the default --out
    result = json.load(f)
  for key in ("knn_top1", "knn_lt_top1", "knn_balanced_top1", "linear_top1",
              "linear_balanced_top1"):
    assert 0 <= result[key] <= 1, key
  assert "random_init_knn_top1" not in result  # only with --random_init
  assert result["features"] == "cls_avgpool"
  assert set(result["groups"]) == set(result["linear_groups"]) == {"many", "medium", "few"}
  assert set(result["lowshot"]) == {"1", "2", "5"}
  assert all(len(s["per_split"]) == 2 for s in result["lowshot"].values())
  assert result["knn_top1"] > 0.3  # random ViT features are far above chance (0.1)
  assert "low-shot, 5 img/class" in proc.stdout and "k-NN top-1" in proc.stdout

  bad = run_evaluate(f"--export={tmp_path / 'nowhere'}", "--config=configs/demo.py")
  assert bad.returncode == 2 and "Traceback" not in bad.stderr
  assert len(error_lines(bad)) == 1 and "model_config.json" in error_lines(bad)[0]


@pytest.mark.slow
def test_evaluate_cli_flag_mistakes_are_one_line_errors(tmp_path):
  proc = run_evaluate(f"--export={tmp_path}", "--config=configs/demo.py",
                      "--config.eval.lowshot_shot=1")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert error_lines(proc) == ["error: unknown config key 'eval.lowshot_shot'; did you mean "
                               "'eval.lowshot_shots'?"]
  both = run_evaluate(f"--export={tmp_path}", f"--checkpoint={tmp_path}",
                      "--config=configs/demo.py")
  assert both.returncode == 2 and len(error_lines(both)) == 1
  assert "Exactly one of (export, checkpoint)" in error_lines(both)[0]
  (tmp_path / "checkpoints" / "6").mkdir(parents=True)
  missing = run_evaluate(f"--checkpoint={tmp_path}/checkpoints/7", "--config=configs/demo.py")
  assert missing.returncode == 2 and error_lines(missing) == [
      f"error: {tmp_path}/checkpoints has no step 7; its saved steps are [6]"]
  nowhere = run_evaluate(f"--checkpoint={tmp_path}/nowhere", "--config=configs/demo.py")
  assert nowhere.returncode == 2 and error_lines(nowhere) == [
      f"error: --checkpoint={tmp_path}/nowhere is neither a training WORKDIR (with "
      "checkpoints/) nor one of its steps, WORKDIR/checkpoints/STEP"]
  unsaved = run_evaluate(f"--checkpoint={tmp_path}", "--config=configs/demo.py")
  assert unsaved.returncode == 2 and error_lines(unsaved) == [
      f"error: {tmp_path}/config.json not found: --checkpoint needs a pmsn_jax.main workdir, "
      "which saves its config there"]
