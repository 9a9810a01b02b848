"""Every shipped config builds and validates; bad values and unknown keys fail clearly."""

import glob
import importlib
import os
import subprocess
import sys

import jax
import pytest

from pmsn_jax import step, validation
from pmsn_jax.models import vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if not p.endswith(("__init__.py", "common.py")))
ARGS = {"demo": [None, "smoke", "msn", "smoke,msn"], "pmsn_vits16_inat18": [None, "msn"],
        "pmsn_vitb16_inat18": [None, "msn"], "pmsn_vitl16_inat18": [None, "msn"]}
REQUIRED = ["seed", "batch_size", "total_steps", "log_every_steps", "checkpoint_every_steps",
            "mesh", "model", "data", "loss.prior", "loss.prior_exponent", "loss.sinkhorn_iters",
            "loss.sinkhorn_marginal", "loss.kl_direction", "loss.prior_order", "loss.reg_weight"]


def load(name, arg=None):
  return importlib.import_module(f"configs.{name}").get_config(arg)


def test_the_required_configs_exist():
  assert {"demo", "msn_vits16_in1k", "pmsn_vits16_inat18"} <= set(CONFIGS)


@pytest.mark.parametrize("name,arg", [(n, a) for n in CONFIGS for a in ARGS.get(n, [None])])
def test_config_builds_validates_and_its_train_state_has_shapes(name, arg):
  config = load(name, arg)
  for key in REQUIRED:
    validation.lookup(config, key)
  validation.validate(config)
  vit_cfg = vit.vit_config_from(config)
  _, _, _, create_state = step.build(config, vit_cfg)
  abstract = jax.eval_shape(create_state)  # whole model + optimizer, nothing allocated
  assert abstract.params["prototypes"]["vectors"].shape == (config.model.num_prototypes,
                                                           config.model.output_dim)
  assert "run" in importlib.import_module(f"configs.{name}").__doc__.lower()


def test_official_recipes_match_method_md():
  c = load("pmsn_vits16_inat18")
  assert (c.model.variant, c.batch_size, c.model.num_prototypes, c.model.mask_ratio) == (
      "S/16", 1024, 1024, 0.15)
  assert (c.optim.start_lr, c.optim.lr, c.optim.final_lr) == (2e-4, 1e-3, 1e-6)
  assert (c.optim.weight_decay, c.optim.final_weight_decay, c.optim.grad_clip) == (0.04, 0.4, 3.0)
  assert (c.data.num_focal, c.data.image_size, c.data.focal_size) == (10, 224, 96)
  assert c.loss.prior == "power_law" and load("msn_vits16_in1k").loss.prior == "uniform"
  assert load("pmsn_vits16_inat18", "msn").loss.sinkhorn_marginal == "uniform"


@pytest.mark.parametrize("key,value,match", [
    ("batch_size", 0, "config.batch_size"),
    ("total_steps", -5, "config.total_steps"),
    ("model.variant", "Q/16", "model.variant"),
    ("model.mask_ratio", 1.0, "model.mask_ratio"),
    ("model.num_prototypes", 0, "model.num_prototypes"),
    ("data.image_size", 30, "image_size"),
    ("data.focal_size", 15, "data.focal_size"),
    ("data.target_scale", (0.5, 0.2), "data.target_scale"),
    ("data.blur_prob", 1.5, "data.blur_prob"),
    ("data.mean", (0.1, 0.2), "data.mean"),
    ("data.imbalance_ratio", 0.5, "data.imbalance_ratio"),
    ("data.source", "fashion", "data.source"),
    ("data.source", "s3:bucket", "data.source"),
    ("data.imbalance_profile", "zipf", "data.imbalance_profile"),
    ("data.batch_class_skew", 1.5, "data.batch_class_skew"),
    ("data.class_order", (0, 0, 1), "data.class_order"),
    ("data.class_order", (-1, 0), "data.class_order"),
    ("data.eval_crop_fraction", 0.0, "data.eval_crop_fraction"),
    ("fsdp_min_size", -1, "fsdp_min_size"),
    ("partition_rules", (("(", "fsdp"),), "partition_rules"),
    ("loss.prior", "zipf", "loss.prior"),
    ("loss.prior_exponent", -1.0, "loss.prior_exponent"),
    ("loss.sinkhorn_marginal", "off", "loss.sinkhorn_marginal"),
    ("loss.kl_direction", "forward", "loss.kl_direction"),
    ("loss.prior_order", "ranked", "loss.prior_order"),
    ("loss.temperature", 0.0, "loss.temperature"),
    ("loss.sinkhorn_iters", -1, "loss.sinkhorn_iters"),
    ("optim.ema_momentum", 1.5, "optim.ema_momentum"),
    ("optim.schedule_horizon_factor", 0.5, "optim.schedule_horizon_factor"),
    ("eval.knn_k", 0, "eval.knn_k"),
    ("eval.features", "mean", "eval.features"),
    ("eval.lowshot_shots", (0, 2), "eval.lowshot_shots"),
    ("eval.shot_thresholds", (20, 100), "few <= many"),
    ("eval.shot_thresholds", (100,), "eval.shot_thresholds"),
    ("eval.lowshot_l2", 0.0, "eval.lowshot_l2"),
    ("eval.linear_protocol", "dino", "eval.linear_protocol"),
    ("profile_steps", -1, "profile_steps"),
    ("compute_dtype", "float16", "compute_dtype"),
    ("loss.prior_fit_source", "guess", "loss.prior_fit_source"),
    ("diagnostics.prototypes_every_steps", 150, "diagnostics.prototypes_every_steps"),
])
def test_bad_values_fail_with_the_key_named(key, value, match):
  config = load("demo")
  parent, _, leaf = key.rpartition(".")
  (validation.lookup(config, parent) if parent else config)[leaf] = value
  with pytest.raises(ValueError, match=match.replace(".", r"\.")):
    validation.validate(config)


def test_a_negative_class_cap_is_refused():
  config = load("demo")
  config.data.imbalance_ratio, config.data.max_per_class = 1.0, -5
  with pytest.raises(ValueError, match=r"data\.max_per_class.*expected >= 0"):
    validation.validate(config)


def test_class_order_needs_a_long_tail():
  config = load("demo")
  config.data.class_order = (1, 0)
  config.data.imbalance_ratio = 1.0
  with pytest.raises(ValueError, match=r"data\.class_order.*imbalance_ratio > 1"):
    validation.validate(config)


def test_custom_prior_needs_one_value_per_prototype():
  config = load("demo")
  config.loss.prior = "custom"
  config.loss.custom_prior = (0.5, 0.5)
  with pytest.raises(ValueError, match=r"loss\.custom_prior"):
    validation.validate(config)


@pytest.mark.parametrize("values,match", [((0.5,) + (0.5 / 31,) * 30 + (0.1,), "sum to 1"),
                                          ((1.0,) + (0.0,) * 31, "strictly positive")])
def test_custom_prior_values_are_checked_with_the_config(values, match):
  config = load("demo")  # 32 prototypes
  config.loss.prior = "custom"
  config.loss.custom_prior = values
  with pytest.raises(ValueError, match=rf"config\.loss\.custom_prior=.*{match}"):
    validation.validate(config)


def test_closest_key_suggestion():
  config = load("demo")
  assert validation.closest_key(config, "model.num_prototype") == "model.num_prototypes"
  assert validation.closest_key(config, "lsos.prior") == "loss.prior"


def run_main(*args, cwd=ROOT):
  return subprocess.run([sys.executable, "-m", "pmsn_jax.main", *args], cwd=cwd,
                        capture_output=True, text=True, timeout=300)


def test_unknown_override_key_is_one_line_with_a_suggestion(tmp_path):
  proc = run_main("--config=configs/demo.py:smoke", f"--workdir={tmp_path}",
                  "--config.model.num_prototype=10")
  assert proc.returncode == 2
  assert "did you mean 'model.num_prototypes'" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_bad_value_from_the_command_line_is_one_line(tmp_path):
  proc = run_main("--config=configs/demo.py:smoke", f"--workdir={tmp_path}",
                  "--config.loss.kl_direction=sideways")
  assert proc.returncode == 2
  assert proc.stderr.strip().startswith("error: config.loss.kl_direction='sideways'")
  assert "Traceback" not in proc.stderr


def test_missing_data_says_how_to_get_it(tmp_path):
  proc = run_main("--config=configs/demo.py:smoke", f"--workdir={tmp_path}",
                  "--config.data.source=idx:/nonexistent/fmnist")
  assert proc.returncode == 2
  assert "/nonexistent/fmnist" in proc.stderr and "apt-get install" in proc.stderr
  assert "Traceback" not in proc.stderr
