"""The evaluation suite run at the end of training (and every `eval_every_steps`), and by
`python -m pmsn_jax.evaluate` on an export (docs/evaluation.md).

Frozen target-encoder features on:
  * the balanced train split (its first eval.max_train_examples rows): the k-NN bank, the
    linear-probe train set and the pool the low-shot images are drawn from;
  * the long-tailed pretraining rows among them: a second k-NN bank, more sensitive to tail
    classes;
  * the balanced test split (its first eval.max_test_examples rows): what every number is
    measured on.
For the k-NN and linear-probe predictions: top-1, per-class accuracy, balanced accuracy and the
many/medium/few-shot groups (by pretraining class counts). The same k-NN for a randomly
initialised encoder of the same config is reported alongside, because random ViT/CNN features
are already far above chance on small images.

The splits are sources, not pixels: evaluate() streams each one once, every process reading its
own block, and the train features stay sharded over the devices (features.py); k-NN, the linear
probe and low-shot run on them there. Nothing is held between evaluations.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pmsn_jax import sharding
from pmsn_jax.data import eval_stream
from pmsn_jax.data.interface import DataSource
from pmsn_jax.evals import classwise, features, knn, linear, lowshot


@dataclasses.dataclass(frozen=True)
class EvalSplits:
  """What the suite measures on: sources (sources.load_source's), holding one reads no image."""
  train: DataSource         # the balanced train split
  test: DataSource
  pretrain_rows: np.ndarray | None  # rows of `train` that pretraining used; None: all
  num_classes: int


def check(splits: EvalSplits, config, mesh, *, linear_probe: bool = True) -> None:
  """Raises ValueError (one line, naming the fix) if `config.eval` cannot run on `splits` and
  `mesh`: a split of unknown size, a batch the processes and devices cannot share, a class with
  fewer train images than the largest low-shot k (where the labels are known without reading
  the split: files and in-memory sources; a TFDS split is checked once its features exist).
  Reads no image: call it before training, so the final evaluation does not fail after it."""
  e = config.eval
  num_train = eval_stream.eval_split_size(splits.train, e.max_train_examples)
  eval_stream.eval_split_size(splits.test, e.max_test_examples)
  sharding.check_batch_size(e.batch_size, mesh, key="eval.batch_size")
  if linear_probe and e.linear_protocol == "msn":
    sharding.check_batch_size(e.linear_batch_size, mesh, key="eval.linear_batch_size")
  elif linear_probe:
    linear.check_batch_size(e.linear_batch_size, mesh, key="eval.linear_batch_size")
  shots = tuple(e.lowshot_shots)
  labels = splits.train.labels if splits.train.random_access else None
  if linear_probe and shots and labels is not None:
    lowshot.check_shots(labels[:num_train], splits.num_classes, max(shots))


def evaluate(encode: Callable, random_encode: Callable | None, splits: EvalSplits, config, mesh,
             *, linear_probe: bool = True) -> dict:
  """Returns the eval.json dict (without "step").

  encode / random_encode: jitted, eval_preprocess'ed (normalised) images [b,S,S,C] -> [b,D];
  random_encode may be None (no random-init reference). linear_probe=False (the mid-training
  evals) runs the k-NN only: no linear probe, no low-shot.
  """
  check(splits, config, mesh, linear_probe=linear_probe)  # Before any feature, in seconds.
  e, num_classes = config.eval, splits.num_classes
  shots = tuple(e.lowshot_shots) if linear_probe else ()
  encoders = {"trained": encode} | ({"random": random_encode} if random_encode else {})
  train = features.extract(encoders, splits.train, config, mesh, max_examples=e.max_train_examples)
  test = features.extract(encoders, splits.test, config, mesh, max_examples=e.max_test_examples)
  bank = train["trained"]
  in_pretraining = bank.host_keys >= 0
  if splits.pretrain_rows is not None:
    in_pretraining &= np.isin(bank.host_keys, splits.pretrain_rows)
  lt_keys = bank.keys_where(in_pretraining)
  pretrain_counts = np.bincount(bank.host_labels[in_pretraining], minlength=num_classes).tolist()
  if shots:  # A TFDS split's labels are known only now.
    lowshot.check_shots(bank.host_labels[bank.order], num_classes, max(shots))
  test_values, test_labels, _ = test["trained"].to_host()

  def knn_pred(split_features, keys, queries):
    return knn.knn_sharded(split_features.values, split_features.labels, keys, queries,
                           mesh=mesh, num_classes=num_classes, k=e.knn_k,
                           temperature=e.knn_temperature)[0]

  def classwise_of(pred):
    """(per-class accuracy, many/medium/few-shot group means, balanced accuracy) of `pred`."""
    per_class = classwise.per_class_accuracy(pred, test_labels, num_classes)
    many, few = e.shot_thresholds
    return (per_class, classwise.shot_groups(per_class, pretrain_counts, many, few),
            classwise.balanced_accuracy(pred, test_labels, num_classes))

  pred = knn_pred(bank, bank.keys, test_values)
  per_class, groups, balanced = classwise_of(pred)
  result = {
      "knn_top1": classwise.top1(pred, test_labels),
      "knn_lt_top1": classwise.top1(knn_pred(bank, lt_keys, test_values), test_labels),
      "knn_balanced_top1": balanced,
      # The k-NN's per-class accuracies and groups keep their first, unprefixed names.
      "per_class_top1": per_class,
      "per_class_classifier": "knn",
      "groups": groups,
      "pretrain_class_counts": pretrain_counts,
      "shot_thresholds": list(e.shot_thresholds),
      "features": e.features,  # the encoder's readout (vit.FEATURE_READOUTS)
  }
  if linear_probe:
    pred = linear.predict(_train_linear_probe(encode, bank, splits, config, mesh), test_values)
    per_class, groups, balanced = classwise_of(pred)
    result.update(linear_top1=classwise.top1(pred, test_labels),
                  linear_balanced_top1=balanced, linear_per_class_top1=per_class,
                  linear_groups=groups)
  if shots:
    pool = bank.order  # The pool in row order: the draws do not depend on the layout.
    result["lowshot"] = lowshot.lowshot_from(
        bank.host_labels[pool], lambda rows: bank.take(pool[rows]), test_values, test_labels,
        num_classes=num_classes, shots=shots, splits=e.lowshot_splits, seed=e.lowshot_seed,
        l2=e.lowshot_l2)
  if "random" in train:
    random_test, _, _ = test["random"].to_host()
    result["random_init_knn_top1"] = classwise.top1(
        knn_pred(train["random"], bank.keys, random_test), test_labels)
    result["random_init_knn_lt_top1"] = classwise.top1(
        knn_pred(train["random"], lt_keys, random_test), test_labels)
  return result


def _train_linear_probe(encode, bank: features.SplitFeatures, splits: EvalSplits, config,
                        mesh) -> dict:
  """The probe's params, by config.eval.linear_protocol (configs/common.py)."""
  e = config.eval
  if e.linear_protocol == "features":
    return linear.train_probe_sharded(
        bank.values, bank.labels, jnp.where(bank.keys >= 0, 1.0, 0.0), mesh=mesh,
        num_classes=splits.num_classes, epochs=e.linear_epochs, batch_size=e.linear_batch_size,
        learning_rate=e.linear_lr, seed=config.seed)
  processes = jax.process_count()
  steps = eval_stream.eval_num_batches(
      eval_stream.eval_split_size(splits.train, e.max_train_examples),
      e.linear_batch_size // processes, processes)
  return linear.train_probe_streamed(
      lambda epoch: features.linear_eval_epoch(encode, splits.train, config, mesh, epoch=epoch,
                                               max_examples=e.max_train_examples),
      mesh=mesh, num_classes=splits.num_classes, epochs=e.linear_epochs,
      steps_per_epoch=steps, learning_rate=e.linear_lr, seed=config.seed)


def scalars(result: dict) -> dict[str, float]:
  """The scalar entries of an evaluation result, as "eval/<name>" metrics, plus the shot-group
  means ("eval/knn_few_top1", "eval/linear_many_top1", ...) and the low-shot means
  ("eval/lowshot_1shot_top1", ...)."""
  out = {f"eval/{k}": v for k, v in result.items() if isinstance(v, float)}
  for prefix, key in (("knn", "groups"), ("linear", "linear_groups")):
    for group, acc in result.get(key, {}).items():
      if acc is not None:  # A group with no class in it.
        out[f"eval/{prefix}_{group}_top1"] = acc
  for shots, summary in result.get("lowshot", {}).items():
    out[f"eval/lowshot_{shots}shot_top1"] = summary["mean"]
  return out


def format_table(result: dict) -> str:
  rows = [("k-NN top-1 (balanced train bank)", "knn_top1", "random_init_knn_top1"),
          ("k-NN top-1 (long-tailed bank)", "knn_lt_top1", "random_init_knn_lt_top1"),
          ("linear probe top-1", "linear_top1", None),
          ("k-NN balanced accuracy", "knn_balanced_top1", None),
          ("linear probe balanced accuracy", "linear_balanced_top1", None)]
  lines = [f"{'metric':34s} {'trained':>13s} {'random init':>12s}", "-" * 61]
  for name, key, rkey in rows:
    if key not in result:  # e.g. no linear probe in the mid-training evals
      continue
    ours = result.get(key)
    rand = result.get(rkey) if rkey else None
    lines.append(f"{name:34s} {_pct(ours):>13s} {_pct(rand):>12s}")
  for name, key in (("k-NN", "groups"), ("linear", "linear_groups")):
    for group, acc in result.get(key, {}).items():
      lines.append(f"{name + ' ' + group + '-shot classes':34s} {_pct(acc):>13s}")
  for shots, summary in result.get("lowshot", {}).items():
    name = f"low-shot, {shots} img/class ({len(summary['per_split'])} splits)"
    lines.append(f"{name:34s} {_pct_std(summary['mean'], summary['std']):>13s}")
  return "\n".join(lines)


def _pct(x) -> str:
  return "-" if x is None else f"{100 * x:.2f}%"


def _pct_std(mean, std) -> str:
  return f"{100 * mean:.2f}±{100 * std:.2f}%"
