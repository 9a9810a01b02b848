"""Shared defaults: the official MSN ViT-S/16 recipe. Experiments override these.

Every key scripts and launchers rely on is defined here, so every config has it.
"""

import ml_collections

from pmsn_jax import sharding
from pmsn_jax.data import view_format

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def get_base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 1024            # global, across all devices and hosts
  # Matmul dtype: "auto" = bfloat16 on TPU/GPU (params, optimizer, loss and Sinkhorn stay
  # float32), float32 on CPUs, where bfloat16 gains nothing (docs/performance.md).
  c.compute_dtype = "auto"
  c.total_steps = 100_000
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.eval_every_steps = 0         # 0: evaluate only at the end of training
  # > 0: a jax.profiler trace of this many steps (from the second step of the run on, once
  # the step is warm) goes to WORKDIR/plugins/profile, TensorBoard's Profile tab.
  c.profile_steps = 0
  # JAX's persistent compilation cache, so a restarted run loads its compiled step instead of
  # compiling it again: "" = WORKDIR/compilation_cache (local or gs://), "none" = off, else a
  # directory or URL (one cache may serve many runs of a sweep).
  c.compilation_cache_dir = ""
  # Warm start (pmsn_jax/warm_start.py): "" = random initialisation; else an official MSN
  # checkpoint (.pth.tar) or a pmsn_jax export directory, loaded into a run that starts without
  # checkpoints: encoders, head, prototypes (the optimizer and schedules start fresh).
  c.init_from = ""
  # (axis name, size); -1 takes the remaining devices. data: replicate parameters; fsdp: shard
  # big parameters and optimizer state too; tensor: Megatron-split the ViT blocks (sharding.py).
  c.mesh = (("data", -1), ("fsdp", 1), ("tensor", 1))
  # (regex on the leaf path, spec) pairs, first match wins; "fsdp" = largest divisible dim
  # of leaves with >= fsdp_min_size elements over the fsdp axis. Axes of size 1 are ignored.
  c.partition_rules = sharding.DEFAULT_RULES
  c.fsdp_min_size = 2 ** 14

  c.model = ml_collections.ConfigDict()
  c.model.variant = "S/16"       # <size>/<patch>: size in mu, Ti, S, B, L, H
  c.model.width = 0              # 0: from the variant; set to override
  c.model.depth = 0
  c.model.num_heads = 0
  c.model.hidden_dim = 2048      # projection head
  c.model.output_dim = 256
  c.model.num_prototypes = 1024
  c.model.mask_ratio = 0.15      # patch drop on the masked anchor view
  c.model.remat = False          # recompute each block in backward: less memory, more FLOPs

  c.data = ml_collections.ConfigDict()
  # tfds:<name>[:<split>] | inat_json:<root> | folder:<root> | idx:<dir> (docs/data.md)
  c.data.source = "tfds:imagenet2012"
  c.data.data_dir = ""           # TFDS data_dir (local or gs://); "" = TFDS's default
  c.data.train_split = "train"
  c.data.test_split = "validation"
  c.data.channels = 3
  c.data.image_size = 224
  c.data.focal_size = 96
  c.data.num_focal = 10
  # MSN's views, written once in view_format.VIEW_DEFAULTS: target_scale (0.3, 1.0),
  # focal_scale (0.05, 0.3), flip True, color_jitter_prob 0.8, color_jitter_strength 0.5,
  # grayscale_prob 0.2, blur_prob 0.5, blur_sigma (0.1, 2.0), and eval_crop_fraction 0.875
  # (evaluation: the centre 224 of the image resized to 256).
  c.data.update(view_format.VIEW_DEFAULTS)
  c.data.mean = IMAGENET_MEAN
  c.data.std = IMAGENET_STD
  # Long-tailed subsampling of the pretraining split: n_c = floor(max_per_class * IR^(-c/(C-1))).
  # imbalance_ratio = 1: max_per_class caps every class (a balanced subsample when all reach
  # it); 0 keeps the split as it is.
  c.data.imbalance_ratio = 1.0
  c.data.max_per_class = 0
  c.data.imbalance_profile = "exponential"  # exponential | power_law (sampling.py)
  # The classes from head to tail, e.g. (0, 1, 3, 5, 7, 8, 9, 4, 2, 6); (): 0, 1, ..., C-1.
  c.data.class_order = ()
  c.data.subsample_seed = 0
  # 0: random batches. In (0, 1]: each batch dominated by a few classes while every epoch
  # stays balanced (the paper's imbalanced mini-batch study; imbalanced.py).
  c.data.batch_class_skew = 0.0

  c.loss = ml_collections.ConfigDict()
  c.loss.prior = "power_law"     # power_law | uniform | custom | fit (docs/prior_fit.md)
  c.loss.prior_exponent = 0.25   # tau_p of the power law
  c.loss.custom_prior = ()       # K positive values summing to 1, for prior = "custom"
  # prior = "fit": tau_p from the pretraining class histogram ("labels", before training) or
  # from the model's own cluster sizes ("clusters") over a warm-up with the uniform prior.
  c.loss.prior_fit_source = "labels"        # labels | clusters
  c.loss.prior_fit_warmup_steps = 1000      # "clusters" only; < total_steps
  c.loss.sinkhorn_iters = 3
  c.loss.sinkhorn_marginal = "prior"        # prior | uniform
  c.loss.kl_direction = "mean_to_prior"     # mean_to_prior | prior_to_mean
  c.loss.prior_order = "fixed"              # fixed | sorted (docs/sorted_prior.md)
  c.loss.reg_weight = 1.0
  c.loss.temperature = 0.1
  c.loss.target_temperature = 0.25

  # Prototype usage vs the prior (diagnostics.py): scalars at every log step; the sorted usage
  # vectors go to WORKDIR/prototypes.jsonl every this many steps (0: every log step; else a
  # multiple of log_every_steps; K floats each, so thin it out for K = 1024 and long runs).
  c.diagnostics = ml_collections.ConfigDict()
  c.diagnostics.prototypes_every_steps = 0

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-3
  c.optim.start_lr = 2e-4
  c.optim.final_lr = 1e-6
  c.optim.warmup_steps = 2000
  c.optim.weight_decay = 0.04
  c.optim.final_weight_decay = 0.4
  c.optim.ema_momentum = 0.996
  c.optim.final_ema_momentum = 1.0
  c.optim.grad_clip = 3.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.schedule_horizon_factor = 1.25   # official MSN quirk; see schedules.py

  c.eval = ml_collections.ConfigDict()
  c.eval.enabled = True
  c.eval.batch_size = 512
  # 0 = all. Caps on the balanced train / test splits (their first N rows) for quick runs
  # such as smoke tests; the long-tailed bank keeps the pretraining rows among them.
  c.eval.max_train_examples = 0
  c.eval.max_test_examples = 0
  # Readout of the frozen target encoder for every evaluator: "cls" (MSN's protocol),
  # "avgpool" (mean patch token) or "cls_avgpool" (both concatenated, DINO's linear eval).
  c.eval.features = "cls"
  c.eval.knn_k = 20
  c.eval.knn_temperature = 0.07
  # Linear probe (evals/linear.py): "features" trains on the frozen features of the centre
  # crops, computed once (minutes at iNat18 scale; the default); "msn" is MSN's linear_eval.py:
  # every epoch, a fresh RandomResizedCrop(0.08-1) + flip of each train image goes through the
  # frozen encoder (linear_epochs forward passes over the train split; MSN: 100 epochs, lr 6.4,
  # 256 images per accelerator).
  c.eval.linear_protocol = "features"
  c.eval.linear_epochs = 100
  c.eval.linear_lr = 6.4
  c.eval.linear_batch_size = 256
  # Shot groups by pretraining images per class: many > shot_thresholds[0] >= medium >=
  # shot_thresholds[1] > few. (100, 20) is the OLTR / ImageNet-LT / iNat18 convention; small
  # datasets whose rarest class has >= 20 images need their own (the demo uses (1000, 200)).
  c.eval.shot_thresholds = (100, 20)
  # Low-shot (evals/lowshot.py): logistic regression on k labelled train images per class, k in
  # lowshot_shots (() turns it off), over lowshot_splits label splits. The splits are seeded by
  # lowshot_seed, not c.seed, so runs with different training seeds are scored on the same
  # labelled images. lowshot_l2 is lambda of mean CE + (lambda/2)||W||^2 on unit-norm features:
  # 1e-3 keeps the separable few-shot problem well posed (a finite optimum L-BFGS reaches in
  # < 100 steps) and lies in the range where accuracy does not depend on it (1e-5 to 1e-2 on
  # Fashion-MNIST pixels; >= 0.1 costs 5 points at 5 shots); see lowshot.py's DEFAULT_L2.
  c.eval.lowshot_shots = (1, 2, 5)
  c.eval.lowshot_splits = 3
  c.eval.lowshot_seed = 0
  c.eval.lowshot_l2 = 1e-3
  return c


def msn(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Turns a PMSN config into plain MSN: uniform prior, uniform Sinkhorn marginal."""
  config.loss.prior = "uniform"
  config.loss.sinkhorn_marginal = "uniform"
  return config


def epochs_to_steps(epochs: float, num_examples: int, batch_size: int) -> int:
  return max(1, int(round(epochs * num_examples / batch_size)))
