"""Config validation: every bad value fails before anything compiles, in one line naming the fix.

Unknown keys are caught earlier: configs are locked, so `--config.modle.width=...` fails in
ml_collections; main.py turns that into a one-line error with the closest valid key.
"""

from __future__ import annotations

import copy
import difflib
import re

from pmsn_jax import losses, paths
from pmsn_jax.data import sampling, sources
from pmsn_jax.models import vit

SOURCE_SCHEMES = tuple(form.split(":")[0] for form in sources.SOURCE_FORMS)
PRIORS = ("power_law", "uniform", "custom", "fit")
PRIOR_FIT_SOURCES = ("labels", "clusters")  # prior_fit.FIT_SOURCES
URL_SCHEMES = (None, "gs", "s3", "az")  # None: a local path; the rest: what etils.epath writes


LINEAR_PROTOCOLS = ("features", "msn")  # evals/linear.py; configs/common.py says which is which


def _require(ok: bool, key: str, value, need: str) -> None:
  if not ok:
    raise ValueError(f"config.{key}={value!r} is invalid: {need}.")


def _positive_int(config, key: str, allow_zero=False) -> None:
  value = lookup(config, key)
  ok = isinstance(value, int) and not isinstance(value, bool) and (
      value >= 0 if allow_zero else value > 0)
  _require(ok, key, value, "expected an integer " + (">= 0" if allow_zero else "> 0"))


def _partition_rules(config) -> None:
  # Rules may name the standard axes even when the mesh lacks them (they are then ignored).
  axes = {name for name, _ in config.mesh} | {"data", "fsdp", "tensor"}
  _positive_int(config, "fsdp_min_size", allow_zero=True)
  for rule in config.partition_rules:
    ok = len(rule) == 2 and isinstance(rule[0], str)
    if ok:
      try:
        re.compile(rule[0])
      except re.error:
        ok = False
    spec = rule[1] if ok else None
    if ok and spec != "fsdp":
      names = [a for entry in spec for a in ((entry,) if isinstance(entry, str) or entry is None
                                              else entry)]
      ok = all(a is None or a in axes for a in names)
    _require(ok, "partition_rules", rule, f"expected (regex, spec) with spec 'fsdp' or a tuple "
             f"of mesh axes {sorted(axes)} / None per dimension")


def changed_keys(saved: dict, current: dict, keys) -> list[str]:
  """Dotted leaf keys under `keys` whose values differ between two config dicts (JSON)."""
  def leaves(node, prefix):
    if not isinstance(node, dict):
      return {prefix: node}
    out = {}
    for key, sub in node.items():
      out.update(leaves(sub, f"{prefix}.{key}"))
    return out

  def under(tree, dotted):
    for part in dotted.split("."):
      tree = tree.get(part, {}) if isinstance(tree, dict) else {}
    return leaves(tree, dotted)

  changed = []
  for key in keys:
    a, b = under(saved, key), under(current, key)
    changed += sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
  return changed


def lookup(config, dotted: str):
  """config["a.b.c"] for nested ConfigDicts; KeyError/AttributeError if a part is missing."""
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def _range_pair(config, key: str, low: float, high: float) -> None:
  value = lookup(config, key)
  ok = len(value) == 2 and low <= value[0] <= value[1] <= high
  _require(ok, key, value, f"expected (min, max) with {low} <= min <= max <= {high}")


def _probability(config, key: str) -> None:
  value = lookup(config, key)
  _require(0.0 <= value <= 1.0, key, value, "expected a probability in [0, 1]")


def closest_key(config, dotted: str) -> str | None:
  """The valid dotted key nearest to a misspelled one (for 'did you mean')."""
  keys = list(_flat_keys(config))
  match = difflib.get_close_matches(dotted, keys, n=1, cutoff=0.5)
  return match[0] if match else None


def _flat_keys(config, prefix=""):
  for key, value in config.items():
    path = f"{prefix}{key}"
    if hasattr(value, "items"):
      yield from _flat_keys(value, path + ".")
    else:
      yield path


def _init_from(config) -> None:
  """config.init_from: "" or a file / export directory that exists (read by warm_start.py)."""
  source = config.init_from
  _require(isinstance(source, str) and source == source.strip(), "init_from", source,
           "expected '' or the path of an MSN checkpoint (.pth.tar) or an export directory")
  if not source:
    return
  where = paths.path(source)
  fix = ("pass an official MSN checkpoint (.pth.tar) or a pmsn_jax export directory (WORKDIR/"
         "export, or one written by python -m pmsn_jax.convert from-msn --checkpoint=FILE "
         "--out=DIR), or '' for a random initialisation")
  if not where.exists():
    raise ValueError(f"config.init_from={source!r} does not exist: {fix}.")
  if where.is_dir() and not (where / "model_config.json").exists():
    raise ValueError(f"config.init_from={source!r} is a directory without model_config.json, "
                     f"not an export: {fix}.")


def validate(config) -> None:
  """Raises ValueError on the first invalid value (one line naming the key and the fix)."""
  _validate_run(config)
  _init_from(config)
  _validate_model(config)
  _validate_data(config)
  _validate_loss(config)
  _validate_diagnostics(config)
  _validate_optim(config)
  _validate_eval(config)


def _validate_run(config) -> None:
  for key in ("batch_size", "total_steps", "log_every_steps", "checkpoint_every_steps",
              "keep_checkpoints"):
    _positive_int(config, key)
  _positive_int(config, "eval_every_steps", allow_zero=True)
  _positive_int(config, "profile_steps", allow_zero=True)
  _positive_int(config, "seed", allow_zero=True)
  cache = config.compilation_cache_dir
  scheme = cache.split("://", 1)[0] if isinstance(cache, str) and "://" in cache else None
  _require(isinstance(cache, str) and cache == cache.strip() and scheme in URL_SCHEMES,
           "compilation_cache_dir", cache, "expected '' (WORKDIR/compilation_cache), 'none' "
           "(off), a directory, or a gs://, s3:// or az:// URL")


def _validate_model(config) -> None:
  m = config.model
  vit.parse_variant(m.variant)
  for key in ("hidden_dim", "output_dim", "num_prototypes"):
    _positive_int(config, f"model.{key}")
  _require(0.0 <= m.mask_ratio < 1.0, "model.mask_ratio", m.mask_ratio, "expected 0 <= r < 1")
  vit.vit_config_from(config)

  _partition_rules(config)


def _validate_data(config) -> None:
  m = config.model
  d = config.data
  _require(isinstance(d.source, str) and ":" in d.source, "data.source", d.source,
           "expected '<scheme>:<location>', e.g. 'idx:' or 'tfds:fashion_mnist'")
  for key in ("image_size", "focal_size", "channels"):
    _positive_int(config, f"data.{key}")
  _positive_int(config, "data.num_focal", allow_zero=True)
  patch = vit.parse_variant(m.variant)[1]
  _require(d.focal_size % patch == 0, "data.focal_size", d.focal_size,
           f"expected a multiple of the patch size {patch}")
  _range_pair(config, "data.target_scale", 1e-4, 1.0)
  _range_pair(config, "data.focal_scale", 1e-4, 1.0)
  _range_pair(config, "data.blur_sigma", 0.0, 100.0)
  for key in ("color_jitter_prob", "grayscale_prob", "blur_prob"):
    _probability(config, f"data.{key}")
  _require(d.color_jitter_strength >= 0, "data.color_jitter_strength", d.color_jitter_strength,
           "expected >= 0")
  for key in ("mean", "std"):
    _require(len(d[key]) == d.channels, f"data.{key}", d[key],
             f"expected {d.channels} values (one per channel)")
  _require(all(s > 0 for s in d.std), "data.std", d.std, "expected positive values")
  _require(d.imbalance_ratio >= 1.0, "data.imbalance_ratio", d.imbalance_ratio,
           "expected >= 1 (1: no long tail)")
  _require(d.max_per_class >= 0, "data.max_per_class", d.max_per_class,
           "expected >= 0 (0 with data.imbalance_ratio=1: no cap)")
  _require(d.imbalance_ratio == 1.0 or d.max_per_class > 0, "data.max_per_class",
           d.max_per_class, "expected > 0 when data.imbalance_ratio > 1")
  _require(d.imbalance_profile in sampling.PROFILES, "data.imbalance_profile",
           d.imbalance_profile, f"expected one of {sampling.PROFILES}")
  _require(all(isinstance(c, int) and not isinstance(c, bool) and c >= 0
               for c in d.class_order) and len(set(d.class_order)) == len(d.class_order),
           "data.class_order", d.class_order, "expected distinct class ids >= 0, head first")
  _require(not d.class_order or d.imbalance_ratio > 1, "data.class_order", d.class_order,
           "it orders a long tail: set data.imbalance_ratio > 1 or leave it ()")
  _probability(config, "data.batch_class_skew")
  _require(0 < d.eval_crop_fraction <= 1, "data.eval_crop_fraction", d.eval_crop_fraction,
           "expected a value in (0, 1] (MSN's 224/256 = 0.875)")
  _require(d.source.split(":", 1)[0] in SOURCE_SCHEMES, "data.source", d.source,
           f"expected one of {', '.join(sources.SOURCE_FORMS)}")


def _validate_loss(config) -> None:
  m = config.model
  loss = config.loss
  _require(loss.prior in PRIORS, "loss.prior", loss.prior, f"expected one of {PRIORS}")
  _require(loss.prior_exponent >= 0, "loss.prior_exponent", loss.prior_exponent,
           "expected >= 0 (0 is the uniform prior)")
  if loss.prior == "custom":
    _require(len(loss.custom_prior) == m.num_prototypes, "loss.custom_prior",
             f"<{len(loss.custom_prior)} values>",
             f"expected model.num_prototypes={m.num_prototypes} values")
    try:  # the one check of its values: the step takes the prior as given
      losses.validate_prior(tuple(loss.custom_prior), m.num_prototypes)
    except (TypeError, ValueError) as e:
      _require(False, "loss.custom_prior", f"<{len(loss.custom_prior)} values>",
               str(e).rstrip("."))
  _require(loss.prior_fit_source in PRIOR_FIT_SOURCES, "loss.prior_fit_source",
           loss.prior_fit_source, f"expected one of {PRIOR_FIT_SOURCES}")
  _positive_int(config, "loss.prior_fit_warmup_steps", allow_zero=True)
  if loss.prior == "fit" and loss.prior_fit_source == "clusters":
    _require(0 < loss.prior_fit_warmup_steps < config.total_steps,
             "loss.prior_fit_warmup_steps", loss.prior_fit_warmup_steps,
             f"expected 0 < steps < total_steps={config.total_steps} with prior_fit_source="
             f"'clusters' (the uniform warm-up must end before training does)")
  # The loss's own lists of accepted values: one source for the loss and for this check.
  _require(loss.sinkhorn_marginal in losses.SINKHORN_MARGINALS, "loss.sinkhorn_marginal",
           loss.sinkhorn_marginal, f"expected one of {losses.SINKHORN_MARGINALS}")
  _require(loss.kl_direction in losses.KL_DIRECTIONS, "loss.kl_direction", loss.kl_direction,
           f"expected one of {losses.KL_DIRECTIONS}")
  _require(loss.prior_order in losses.PRIOR_ORDERS, "loss.prior_order", loss.prior_order,
           f"expected one of {losses.PRIOR_ORDERS}")
  _positive_int(config, "loss.sinkhorn_iters", allow_zero=True)
  for key in ("temperature", "target_temperature"):
    _require(loss[key] > 0, f"loss.{key}", loss[key], "expected > 0")
  _require(loss.reg_weight >= 0, "loss.reg_weight", loss.reg_weight, "expected >= 0")


def _validate_diagnostics(config) -> None:
  _positive_int(config, "diagnostics.prototypes_every_steps", allow_zero=True)
  every = config.diagnostics.prototypes_every_steps
  _require(every % config.log_every_steps == 0, "diagnostics.prototypes_every_steps", every,
           f"expected 0 or a multiple of log_every_steps={config.log_every_steps} (the vectors "
           f"are fetched at log steps)")


def _validate_optim(config) -> None:
  o = config.optim
  for key in ("lr", "start_lr", "final_lr", "weight_decay", "final_weight_decay", "grad_clip"):
    _require(o[key] >= 0, f"optim.{key}", o[key], "expected >= 0")
  _require(o.lr > 0, "optim.lr", o.lr, "expected > 0")
  _positive_int(config, "optim.warmup_steps", allow_zero=True)
  for key in ("ema_momentum", "final_ema_momentum", "b1", "b2"):
    _require(0.0 <= o[key] <= 1.0, f"optim.{key}", o[key], "expected a value in [0, 1]")
  _require(o.schedule_horizon_factor >= 1.0, "optim.schedule_horizon_factor",
           o.schedule_horizon_factor, "expected >= 1 (schedules must cover the whole run)")


def _validate_eval(config) -> None:
  e = config.eval
  for key in ("batch_size", "knn_k", "linear_epochs", "linear_batch_size"):
    _positive_int(config, f"eval.{key}")
  for key in ("max_train_examples", "max_test_examples"):
    _positive_int(config, f"eval.{key}", allow_zero=True)
  _require(e.features in vit.FEATURE_READOUTS, "eval.features",
           e.features, f"expected one of {vit.FEATURE_READOUTS}")
  _require(e.knn_temperature > 0, "eval.knn_temperature", e.knn_temperature, "expected > 0")
  _require(e.linear_lr > 0, "eval.linear_lr", e.linear_lr, "expected > 0")
  _require(e.linear_protocol in LINEAR_PROTOCOLS, "eval.linear_protocol",
           e.linear_protocol, f"expected one of {LINEAR_PROTOCOLS}")
  thresholds = tuple(e.shot_thresholds)
  _require(len(thresholds) == 2 and all(isinstance(t, int) and t >= 0 for t in thresholds)
           and thresholds[1] <= thresholds[0], "eval.shot_thresholds", thresholds,
           "expected (many_threshold, few_threshold) image counts with few <= many, e.g. "
           "(100, 20)")
  shots = tuple(e.lowshot_shots)
  _require(all(isinstance(k, int) and k > 0 for k in shots), "eval.lowshot_shots", shots,
           "expected positive images-per-class counts, e.g. (1, 2, 5), or () for none")
  if shots:
    _positive_int(config, "eval.lowshot_splits")
    _require(e.lowshot_l2 > 0, "eval.lowshot_l2", e.lowshot_l2, "expected > 0")


# ------------------------------------------------------------------- configs saved by older runs

# Config keys added after runs were made, with the value older runs behaved as. A run's
# config.json is read back by core (evaluate.py checks a checkpoint against it) and by
# pmsn_jax.analysis (grouping seeds): both fill in these defaults here, so an old run and a new
# one with the same settings compare as equal in either place.
ADDED_CONFIG_KEYS = {("loss", "prior_order"): "fixed", ("loss", "kl_direction"): "mean_to_prior",
                     ("data", "class_order"): [], ("eval", "features"): "cls",
                     ("eval", "linear_protocol"): "features",
                     ("init_from",): "", ("profile_steps",): 0}


def with_added_keys(config: dict) -> dict:
  """A run's config.json dict with ADDED_CONFIG_KEYS filled in where it predates them."""
  for (*sections, key), value in ADDED_CONFIG_KEYS.items():
    parent = config
    for section in sections:
      parent = parent.get(section) if isinstance(parent, dict) else None
    if isinstance(parent, dict):
      parent.setdefault(key, copy.deepcopy(value))
  return config
